"""The planner, pyinfra-style: ``tests/plans/<case>/lab.toml`` (+ optional ``host.json``) →
``expected.json`` (the plan, or ``{"error": ..., "hint": ...}``). One test per folder.

After a deliberate change, regenerate with ``LABBUILDER_UPDATE_GOLDEN=1 pytest tests/test_planner.py``
and review the diff like code.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from labbuilder.adapters import storage
from labbuilder.common.errors import LabFileError, PlanError
from labbuilder.lab.files import load_builtin_lab, parse_lab
from labbuilder.lab.planner import derive_mac, lab_tag, plan
from labbuilder.lab.view import plan_as_dict
from labbuilder.model.lab import (
    GiB,
    HostFacts,
    HostRoute,
    Lab,
    LabUse,
    LibvirtNetworkFact,
    Plan,
)
from labbuilder.recipe.files import load_recipe
from labbuilder.recipe.sizes import fit_lab

CASES = Path(__file__).parent / "plans"
UPDATE = os.environ.get("LABBUILDER_UPDATE_GOLDEN") == "1"


def host_from_json(data: dict[str, Any]) -> HostFacts:
    return HostFacts(
        routes=tuple(HostRoute(*route) for route in data.get("routes", [])),
        libvirt_networks=tuple(
            LibvirtNetworkFact(n["name"], n["bridge"], tuple(n["cidrs"]), n["lab"])
            for n in data.get("libvirt_networks", [])
        ),
        protected_addresses=tuple(tuple(p) for p in data.get("protected_addresses", [])),  # type: ignore[misc]
        used_macs=tuple(tuple(m) for m in data.get("used_macs", [])),  # type: ignore[misc]
        cpus=data.get("cpus"),
        memory_available=data.get("memory_available"),
        disk_free=data.get("disk_free"),
        memory_total=data.get("memory_total"),
        labs=tuple(LabUse(**use) for use in data.get("labs", [])),
        ksm=data.get("ksm", False),
    )


def run_case(case: Path) -> dict[str, Any]:
    host_file = case / "host.json"
    host_data = json.loads(host_file.read_text()) if host_file.exists() else {}
    lab = parse_lab((case / "lab.toml").read_text(), source="lab.toml")
    lab = fit_lab(lab, load_recipe(lab.recipe))  # as `plan` does: sizes raised to the recipe's
    try:
        result = plan(
            lab, host_from_json(host_data), auto_subnets=host_data.get("auto_subnets", False)
        )
    except PlanError as err:
        return {"error": err.message, "hint": err.hint}
    return plan_as_dict(result)


@pytest.mark.parametrize("case", sorted(p.name for p in CASES.iterdir() if p.is_dir()))
def test_golden_plan(case: str) -> None:
    got = run_case(CASES / case)
    expected_file = CASES / case / "expected.json"
    if UPDATE:
        expected_file.write_text(json.dumps(got, indent=1) + "\n")
    assert got == json.loads(expected_file.read_text())


def test_default_plan_has_the_guides_addresses_nics_and_sizes() -> None:
    result = plan(load_builtin_lab("guide-3node"), HostFacts())
    addresses = {
        node.name: [(nic.device, nic.network, nic.address) for nic in node.nics]
        for node in result.nodes
    }
    assert addresses == {
        "controller": [("eth0", "management", "10.0.0.11")],
        "network": [
            ("eth0", "management", "10.0.0.21"),
            ("eth1", "tunnel", "10.0.1.21"),
            ("eth2", "external", None),
        ],
        "compute1": [("eth0", "management", "10.0.0.31"), ("eth1", "tunnel", "10.0.1.31")],
    }
    assert result.hosts == (
        ("10.0.0.11", "controller"),
        ("10.0.0.21", "network"),
        ("10.0.0.31", "compute1"),
    )
    assert [(n.vcpus, n.memory, n.disks[0].size) for n in result.nodes] == [
        (1, 2 * GiB, 5 * GiB), (1, GiB // 2, 5 * GiB), (1, 2 * GiB, 10 * GiB)
    ]  # fmt: skip
    # only the management NIC carries the default route
    gateways = [nic.gateway for node in result.nodes for nic in node.nics]
    assert gateways == ["10.0.0.1", "10.0.0.1", None, None, "10.0.0.1", None]


def test_plan_is_deterministic() -> None:
    lab = load_builtin_lab("guide-full")
    assert plan(lab, HostFacts()) == plan(lab, HostFacts())


def test_several_labs_get_disjoint_names_bridges_and_macs() -> None:
    plans = [
        plan(parse_lab(f'name = "class-{i}"', source=f"lab{i}.toml"), HostFacts())
        for i in range(40)
    ]
    names = [net.libvirt_name for p in plans for net in p.networks]
    bridges = [net.bridge for p in plans for net in p.networks]
    domains = [node.domain for p in plans for node in p.nodes]
    macs = [nic.mac for p in plans for node in p.nodes for nic in node.nics]
    for items in (names, bridges, domains, macs):
        assert len(items) == len(set(items))
    assert all(len(bridge) <= 15 for bridge in bridges)


def test_a_mac_used_on_the_host_is_derived_again() -> None:
    lab = load_builtin_lab("guide-3node")
    first = derive_mac("guide-3node", "controller", lab.nodes[0].nics[0])
    host = HostFacts(used_macs=(("someone-else", first),))
    mac = plan(lab, host).nodes[0].nics[0].mac
    assert mac != first
    assert mac == derive_mac("guide-3node", "controller", lab.nodes[0].nics[0], 1)
    # the lab's own domains (left from an earlier `up`) keep their MACs
    assert plan(lab, HostFacts(used_macs=(("guide-3node", first),))).nodes[0].nics[0].mac == first


def test_isolated_networks_may_overlap_host_routes() -> None:
    lab = load_builtin_lab("guide-3node")
    host = HostFacts(routes=(HostRoute("10.0.1.0/24", "eth9"),))
    assert plan(lab, host).network("tunnel").cidr == "10.0.1.0/24"


def host_gateways(lab: Lab) -> Lab:
    """``lab`` with its gateways on the host (``options.isolated = false``)."""
    return replace(lab, options=replace(lab.options, isolated=False))


def test_auto_subnets_keeps_addresses_in_place_and_avoids_everything_taken() -> None:
    lab = host_gateways(load_builtin_lab("guide-3node"))
    host = HostFacts(
        routes=(HostRoute("10.0.0.0/23", "eth1"), HostRoute("10.0.2.0/24", "eth2")),
        protected_addresses=(("mirror", "203.0.113.80"),),
    )
    result = plan(lab, host, auto_subnets=True)
    management, external = result.network("management"), result.network("external")
    assert management.remapped_from == "10.0.0.0/24"
    assert management.cidr == "10.0.3.0/24" and management.gateway == "10.0.3.1"
    assert external.cidr == "10.0.4.0/24"
    assert external.floating_range == ("10.0.4.101", "10.0.4.200")
    assert result.node("controller").nics[0].address == "10.0.3.11"
    assert result.hosts[0] == ("10.0.3.11", "controller")
    assert len(result.warnings) == 2


# --- two labs never plan the same object name --------------------------------------------------

lab_names = st.from_regex(r"\A[a-z][a-z0-9-]{0,12}[a-z0-9]\Z").filter(
    lambda name: not name.startswith(("lbbake", "lbprobe"))
)
node_names = st.from_regex(r"\A[a-z]{1,10}\Z")


def lab_with_node(lab: str, node: str) -> Plan:
    """A lab with one extra node named ``node`` (at its own addresses), planned."""
    text = (
        f'name = "{lab}"\n[nodes.{node}]\nrole = "compute"\n'
        'addresses = { management = "10.0.0.99", tunnel = "10.0.1.99" }\n'
    )
    return plan(parse_lab(text, source="lab.toml"), HostFacts())


def object_names(result: Plan) -> set[tuple[str, str]]:
    names = {("domain", node.domain) for node in result.nodes}
    names |= {("network", net.libvirt_name) for net in result.networks}
    names |= {
        ("volume", storage.lab_volume_name(result.lab, node.name, f"{disk.device}.qcow2"))
        for node in result.nodes
        for disk in node.disks
    }
    return names


@settings(max_examples=150, deadline=None)
@given(lab_names, node_names, lab_names, node_names)
def test_two_labs_never_plan_the_same_domain_network_or_volume(
    lab_a: str, node_a: str, lab_b: str, node_b: str
) -> None:
    assume(lab_a != lab_b)
    first, second = lab_with_node(lab_a, node_a), lab_with_node(lab_b, node_b)
    assert not object_names(first) & object_names(second)


@given(lab_names, node_names, lab_names, node_names)
def test_a_name_splits_back_into_its_lab_and_node(
    lab_a: str, node_a: str, lab_b: str, node_b: str
) -> None:
    """Node and network names have no '-': the part after a domain's last '-' is its node."""
    assume((lab_a, node_a) != (lab_b, node_b))
    assert f"{lab_a}-{node_a}" != f"{lab_b}-{node_b}"
    assert f"{lab_a}-{node_a}".rsplit("-", 1) == [lab_a, node_a]


def test_the_collision_of_the_issue_is_refused() -> None:
    """Lab a-b with node c and lab a with node b-c would both be domain a-b-c."""
    assert lab_with_node("a-b", "c").node("c").domain == "a-b-c"
    with pytest.raises(LabFileError, match=r'nodes.b-c = "b-c" is not a valid name'):
        parse_lab('name = "a"\n[nodes.b-c]\nrole = "compute"\n', source="x.toml")


def test_a_bridge_name_shared_through_the_hash_is_refused_when_the_other_lab_has_it() -> None:
    """Bridge names hold 6 hex digits of the lab's name (Linux allows 15 characters): two labs
    can share them, and the planner refuses the second while the first has its bridge."""
    seen: dict[str, str] = {}
    for i in range(100_000):
        name = f"lbtest-in-{i}"
        tag = lab_tag(name)
        if tag in seen:
            break
        seen[tag] = name
    first, second = seen[tag], name
    owner = plan(parse_lab(f'name = "{first}"', source="a.toml"), HostFacts())
    host = HostFacts(
        libvirt_networks=tuple(
            LibvirtNetworkFact(net.libvirt_name, net.bridge, (), first) for net in owner.networks
        )
    )
    with pytest.raises(PlanError, match="is already used by libvirt network"):
        plan(parse_lab(f'name = "{second}"', source="b.toml"), host)


def test_free_subnets_jump_past_what_is_taken() -> None:
    """A /30 lab network on a host that routes 10.0.0.0/8 and 172.16.0.0/12: the suggestion
    comes at once (it used to try four million candidates)."""
    lab = parse_lab(
        'name = "x"\n[networks.management]\ncidr = "10.0.0.0/30"\ngateway = "10.0.0.1"\n'
        '[nodes.controller]\naddresses = { management = "10.0.0.2" }\n'
        "[nodes.compute]\ncount = 0\n[nodes.network]\ncount = 0\n[options]\nisolated = false\n",
        source="lab.toml",
    )
    host = HostFacts(routes=(HostRoute("10.0.0.0/8", "eth1"), HostRoute("172.16.0.0/12", "eth2")))
    started = time.monotonic()
    with pytest.raises(PlanError, match=r'set networks.management.cidr = "192.168.0.0/30"'):
        plan(lab, host)
    assert plan(lab, host, auto_subnets=True).network("management").cidr == "192.168.0.0/30"
    assert time.monotonic() - started < 1
