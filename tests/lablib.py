"""Helpers for tests that bring labs up on the real libvirtd: free subnets, lab files, and an
environment that keeps test state, pools and names apart from a user's (``lbtest`` prefix)."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from pathlib import Path

from labbuilder.adapters import libvirt as lv
from labbuilder.host.facts import read_routes

TEST_POOL = "lbtest-pool"
TEST_CACHE = Path(os.environ.get("LABBUILDER_TEST_CACHE") or "/var/cache/labbuilder-test")


def run_labbuilder(
    *args: str, env: dict[str, str], timeout: float = 3600
) -> subprocess.CompletedProcess[str]:
    """The labbuilder command line, as a user runs it, with the test's environment."""
    return subprocess.run(
        [sys.executable, "-m", "labbuilder", *args],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def free_subnets(count: int, start: str = "10.240.0.0/12") -> list[str]:
    """``count`` /24 subnets that nothing on this host routes or holds."""
    taken = [
        ipaddress.ip_network(r.destination) for r in read_routes() if r.destination != "0.0.0.0/0"
    ]
    conn = lv.connect("qemu:///system", readonly=True)
    try:
        taken += [ipaddress.ip_network(c) for n in lv.network_facts(conn) for c in n.cidrs]
    finally:
        conn.close()
    found = []
    for candidate in ipaddress.ip_network(start).subnets(new_prefix=24):
        if not any(candidate.overlaps(other) for other in taken):
            found.append(str(candidate))
            taken.append(candidate)
            if len(found) == count:
                return found
    raise RuntimeError("no free subnets for the test lab")


# The test labs' controller gets both of the host's cores: under emulation its services and
# the install's steps run in parallel threads, while the other nodes mostly idle.
CONTROLLER_VCPUS = 2


def three_node_lab(name: str, *, extra: str = "", role_images: bool = False) -> str:
    """The guide's three-node lab on free subnets (the guide's 203.0.113.0/24 may hold the
    host's package mirror), with egress confined to the lab itself. ``extra`` goes into its
    ``[options]`` table; ``role_images`` boots nodes from their recipe's role images."""
    management, tunnel, external = free_subnets(3)
    m, t, e = (s.rsplit(".", 1)[0] for s in (management, tunnel, external))
    return f"""
name = "{name}"
[networks.management]
cidr = "{management}"
gateway = "{m}.1"
[networks.tunnel]
cidr = "{tunnel}"
[networks.external]
cidr = "{external}"
gateway = "{e}.1"
floating_range = "{e}.101-{e}.200"
[nodes.controller]
addresses = {{ management = "{m}.11" }}
vcpus = {CONTROLLER_VCPUS}
[nodes.network]
addresses = {{ management = "{m}.21", tunnel = "{t}.21" }}
[nodes.compute1]
addresses = {{ management = "{m}.31", tunnel = "{t}.31" }}
[options]
isolated = false
egress = "none"
role_images = {"true" if role_images else "false"}
{extra}
"""


def one_node_lab(name: str) -> str:
    management, external = free_subnets(2)
    m, e = (s.rsplit(".", 1)[0] for s in (management, external))
    return f"""
name = "{name}"
[networks.management]
cidr = "{management}"
gateway = "{m}.1"
[networks.external]
cidr = "{external}"
gateway = "{e}.1"
floating_range = "{e}.101-{e}.200"
[networks.tunnel]
cidr = "10.239.254.0/24"
[nodes.controller]
vcpus = {CONTROLLER_VCPUS}
[nodes.network]
count = 0
[nodes.compute]
count = 0
[options]
isolated = false
egress = "none"
role_images = false
"""


def lab_environment(state_dir: Path, pool: str = TEST_POOL) -> dict[str, str]:
    return {
        "LABBUILDER_STATE_DIR": str(state_dir),
        "LABBUILDER_POOL": pool,
        "LABBUILDER_CACHE_DIR": str(TEST_CACHE),
    }


def remove_test_pool(name: str = TEST_POOL) -> None:
    """Remove the test pool (or the pool ``name``) with its (shared base) volumes, as a test
    or bench run ends."""
    from labbuilder.adapters import storage

    conn = lv.connect("qemu:///system")
    try:
        pool = storage.find_pool(conn, name)
        if pool is not None:
            storage.remove_pool(pool)
    finally:
        conn.close()


def two_node_lab(name: str) -> str:
    """The guide's controller and network node (no compute node) on free subnets, at the
    guide's minimum sizes (the controller with two vCPUs), with egress confined to the lab."""
    management, tunnel, external = free_subnets(3)
    m, t, e = (s.rsplit(".", 1)[0] for s in (management, tunnel, external))
    return f"""
name = "{name}"
[networks.management]
cidr = "{management}"
gateway = "{m}.1"
[networks.tunnel]
cidr = "{tunnel}"
[networks.external]
cidr = "{external}"
gateway = "{e}.1"
floating_range = "{e}.101-{e}.200"
[nodes.controller]
addresses = {{ management = "{m}.11" }}
vcpus = {CONTROLLER_VCPUS}
[nodes.network]
addresses = {{ management = "{m}.21", tunnel = "{t}.21" }}
[nodes.compute]
count = 0
[options]
isolated = false
egress = "none"
role_images = false
"""


def lab_leftovers(lab: str, pool_name: str = TEST_POOL) -> dict[str, list[str]]:
    """What the host still holds of ``lab``: domains, networks and volumes named after it."""
    from labbuilder.adapters import storage

    conn = lv.connect("qemu:///system", readonly=True)
    try:
        pool = storage.find_pool(conn, pool_name)
        return {
            "domains": [d.name() for d in conn.listAllDomains() if d.name().startswith(lab)],
            "networks": [n.name() for n in conn.listAllNetworks() if n.name().startswith(lab)],
            "volumes": [v.name() for v in storage.lab_volumes(pool, lab)] if pool else [],
        }
    finally:
        conn.close()


def remove_labs(labs: list[str], environment: dict[str, str]) -> None:
    """Remove everything of ``labs`` and the storage pool of ``environment`` (a test's
    ``lab_environment``), whatever state a failed test left them in."""
    from labbuilder.adapters import storage
    from labbuilder.lifecycle import registry
    from labbuilder.lifecycle.teardown import remove_lab_objects

    old = {key: os.environ.get(key) for key in environment}
    os.environ.update(environment)
    conn = lv.connect("qemu:///system")
    try:
        for lab in labs:
            remove_lab_objects(lv.LibvirtHypervisor(conn), lab)
            registry.unregister(lab)
        pool = storage.find_pool(conn, environment["LABBUILDER_POOL"])
        if pool is not None:
            storage.remove_pool(pool)
    finally:
        conn.close()
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def full_lab(name: str, *, extra: str = "", core: bool = False, isolated: bool = False) -> str:
    """The built-in lab ``zed-full`` (the guide's five nodes sized for recipe zed-debian-12, with
    every optional chapter) on free subnets, with egress confined to the lab and role images.
    ``extra`` goes into its ``[options]`` table. ``core``: only the guide's three nodes, with no
    size of their own (so each gets the smallest its recipe declares for its role, the recipe's
    minimum) and no optional chapter (the core path to a launched instance). ``isolated``: the
    guide's own networks and addresses, the lab's gateways in a namespace of its own."""
    import json
    import tomllib

    builtin = tomllib.loads((Path(__file__).parent.parent / "labs" / "zed-full.toml").read_text())
    if isolated:
        management, tunnel, external = "10.0.0.0/24", "10.0.1.0/24", "203.0.113.0/24"
    else:
        management, tunnel, external = free_subnets(3)
    m, t, e = (s.rsplit(".", 1)[0] for s in (management, tunnel, external))
    addresses = {
        "controller": f'{{ management = "{m}.11" }}',
        "network": f'{{ management = "{m}.21", tunnel = "{t}.21" }}',
        "compute1": f'{{ management = "{m}.31", tunnel = "{t}.31" }}',
    }
    if not core:
        addresses["block1"] = f'{{ management = "{m}.41" }}'
        addresses["object1"] = f'{{ management = "{m}.51" }}'
    nodes = ""
    for node, address in addresses.items():
        nodes += f"[nodes.{node}]\naddresses = {address}\n"
        if not core:
            sizes = builtin["nodes"][node]
            nodes += "".join(f"{key} = {json.dumps(value)}\n" for key, value in sizes.items())
    chapters = [] if core else builtin["options"]["stages"]
    stages = ", ".join(f'"{stage}"' for stage in chapters)
    return f"""
name = "{name}"
recipe = "{builtin["recipe"]}"
[networks.management]
cidr = "{management}"
gateway = "{m}.1"
[networks.tunnel]
cidr = "{tunnel}"
[networks.external]
cidr = "{external}"
gateway = "{e}.1"
floating_range = "{e}.101-{e}.200"
{nodes}[options]
isolated = {"true" if isolated else "false"}
egress = "none"
role_images = true
stages = [{stages}]
{extra}
"""


def isolated_lab(name: str, *, egress: str = "none") -> str:
    """The guide's own networks and addresses (controller 10.0.0.11, external 203.0.113.0/24)
    with the controller alone, isolated: its gateways in a namespace of its own, so any number
    of these labs fit on one host whatever its routes."""
    return f"""
name = "{name}"
[nodes.controller]
vcpus = 1
memory = "1 GiB"
[nodes.network]
count = 0
[nodes.compute]
count = 0
[options]
isolated = true
egress = "{egress}"
role_images = false
"""


def gateway_leftovers(lab: str) -> dict[str, list[str]]:
    """What the host still holds of an isolated lab's gateway: its namespace, its veths (host
    ends) and its uplink's processes."""
    from labbuilder.adapters import netns
    from labbuilder.lab.planner import lab_tag, namespace_name

    veths = [
        entry.name for entry in Path("/sys/class/net").iterdir()
        if entry.name.startswith(f"lbg{lab_tag(lab)}")
    ]  # fmt: skip
    namespace = namespace_name(lab)
    return {
        "namespaces": [ns for ns in netns.namespaces(namespace) if ns == namespace],
        "veths": veths,
        "uplinks": [str(pid) for pid in netns.uplink_pids(namespace)],
    }
