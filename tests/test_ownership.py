"""labbuilder touches only what it made for a lab: foreign networks, domains, pools, firewall
rules and files are refused or left alone, and `gc` decides from host-wide facts (the lab's
lock, the host's registry, libvirt metadata), whatever state directory its caller uses.

The adapter tests run on libvirt's test driver; the ``integration`` tests on the real libvirtd
define objects without booting any guest."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lablib import TEST_POOL, lab_environment, one_node_lab, remove_labs, run_labbuilder

from labbuilder.adapters import firewall, storage
from labbuilder.adapters import libvirt as lv
from labbuilder.common.errors import PlanError
from labbuilder.common.filelock import is_locked
from labbuilder.common.paths import lab_lock_path, pool_dir
from labbuilder.lifecycle import registry
from labbuilder.lifecycle.teardown import remove_state_files

PREFIX = "lbtest-own-"
URI = "qemu:///system"


def lab_network_xml(name: str, lab: str | None, bridge: str, **attributes: str) -> str:
    extra = "".join(f' {key}="{value}"' for key, value in attributes.items())
    metadata = (
        f'<metadata><lb:lab xmlns:lb="{lv.METADATA_NS}" name="{lab}"{extra}/></metadata>'
        if lab
        else ""
    )
    return f"<network><name>{name}</name>{metadata}<bridge name='{bridge}'/></network>"


def lab_domain_xml(name: str, lab: str | None, **attributes: str) -> str:
    extra = "".join(f' {key}="{value}"' for key, value in attributes.items())
    metadata = (
        f'<metadata><lb:lab xmlns:lb="{lv.METADATA_NS}" name="{lab}"{extra}/></metadata>'
        if lab
        else ""
    )
    return (
        f"<domain type='qemu'><name>{name}</name>{metadata}<memory unit='MiB'>64</memory>"
        "<os><type arch='x86_64'>hvm</type></os></domain>"
    )


# --- adapters, on libvirt's test driver -----------------------------------------------------


@pytest.fixture
def test_conn() -> Iterator[Any]:
    conn = lv.connect("test:///default")
    yield conn
    for network in conn.listAllNetworks():
        if network.name().startswith(PREFIX):
            lv.remove_network(network)
    for domain in conn.listAllDomains():
        if domain.name().startswith(PREFIX):  # the test driver knows no undefine flags
            if domain.isActive():
                domain.destroy()
            domain.undefine()
    conn.close()


def test_ensure_network_refuses_a_network_without_metadata(test_conn: Any) -> None:
    foreign = test_conn.networkLookupByName("default")  # the test driver's, active
    before = foreign.XMLDesc(0)
    mine = lab_network_xml("default", f"{PREFIX}a", "lbtownd0")
    with pytest.raises(PlanError, match="network default exists and is not labbuilder's lab"):
        lv.ensure_network(test_conn, "default", mine)
    assert foreign.XMLDesc(0) == before
    assert foreign.isActive()


def test_ensure_network_refuses_another_labs_network_and_keeps_its_own(test_conn: Any) -> None:
    name = f"{PREFIX}a-management"
    theirs = test_conn.networkDefineXML(lab_network_xml(name, f"{PREFIX}b", "lbtownb0"))
    with pytest.raises(PlanError, match=f"its owner is labbuilder's lab {PREFIX}b"):
        lv.ensure_network(test_conn, name, lab_network_xml(name, f"{PREFIX}a", "lbtowna0"))
    assert not theirs.isActive()  # not started either
    own = lv.ensure_network(test_conn, name, "", lab=f"{PREFIX}b")
    assert own.isActive()


def test_ensure_domain_refuses_a_foreign_domain(test_conn: Any) -> None:
    foreign = test_conn.lookupByName("test")  # the test driver's running domain, no metadata
    before = foreign.XMLDesc(0)
    with pytest.raises(PlanError, match="domain test exists and is not labbuilder's lab"):
        lv.ensure_domain(test_conn, "test", lab_domain_xml("test", f"{PREFIX}a"))
    with pytest.raises(PlanError, match="domain test exists"):
        lv.ensure_domain(test_conn, "test", "", lab=f"{PREFIX}a")
    assert foreign.XMLDesc(0) == before


def test_ensure_domain_does_not_start_another_labs_domain(test_conn: Any) -> None:
    name = f"{PREFIX}a-controller"
    theirs = test_conn.defineXML(lab_domain_xml(name, f"{PREFIX}b"))
    with pytest.raises(PlanError, match=f"lab {PREFIX}b"):
        lv.ensure_domain(test_conn, name, "", lab=f"{PREFIX}a")
    assert not theirs.isActive()
    assert lv.ensure_domain(test_conn, name, "", lab=f"{PREFIX}b").isActive()


def test_an_object_without_a_lab_is_never_made() -> None:
    conn = lv.connect("test:///default")
    try:
        with pytest.raises(ValueError, match="name its lab"):
            lv.ensure_network(conn, f"{PREFIX}x", "<network><name>x</name></network>")
    finally:
        conn.close()


def test_a_pool_of_labbuilders_name_elsewhere_is_refused(test_conn: Any) -> None:
    pool = test_conn.storagePoolLookupByName("default-pool")  # a dir pool at /default-pool
    with pytest.raises(PlanError, match="storage pool default-pool exists and is not"):
        storage.ensure_pool(test_conn, "default-pool", "/var/lib/labbuilder/pools/x")
    assert storage.find_owned_pool(test_conn, "default-pool", "/elsewhere") is None
    assert storage.ensure_pool(test_conn, "default-pool", "/default-pool").name() == pool.name()


def test_an_object_removed_meanwhile_is_left_out_of_listings(test_conn: Any) -> None:
    name = f"{PREFIX}gone"
    network = test_conn.networkDefineXML(lab_network_xml(name, f"{PREFIX}g", "lbtowng0"))
    listed = test_conn.listAllNetworks()
    network.undefine()  # another program removes it between the listing and the read
    assert name not in [item.name() for item, _ in lv._existing(listed)]
    assert "default" in [item.name() for item, _ in lv._existing(listed)]


def test_metadata_gets_the_state_directory_and_lock() -> None:
    xml = lv.with_metadata(lab_network_xml("n", "lab", "br0"), state="/s", lock="/l")
    assert lv.lab_metadata(xml) == {"name": "lab", "state": "/s", "lock": "/l"}
    with pytest.raises(ValueError):
        lv.with_metadata("<network><name>n</name></network>", state="/s")


# --- firewall: only rules tagged for the lab ------------------------------------------------


def test_firewall_removal_leaves_rules_labbuilder_did_not_tag() -> None:
    lab = f"{PREFIX}fw"
    chain = firewall.chain_name(lab)
    tag = f'-m comment --comment "labbuilder:{lab}"'
    table = firewall.parse_save(
        f"*mangle\n:FORWARD ACCEPT [0:0]\n:{chain} - [0:0]\n"
        f"-A FORWARD -i lbx0 {tag} -j {chain}\n"
        f"-A FORWARD -i eth9 -j {chain}\n"  # someone else's jump to the chain
        f"-A {chain} {tag} -j DROP\nCOMMIT\n"
    )
    script = firewall._remove_script(lab, table)
    assert script is not None
    assert f"-D FORWARD -i lbx0 {tag} -j {chain}" in script
    assert "eth9" not in script
    assert f"-X {chain}" not in script  # still referenced by a rule that is not the lab's
    with pytest.raises(PlanError, match="not labbuilder"):
        firewall._ensure_script(lab, table, ["lbx0"], [])


def test_firewall_never_flushes_a_chain_with_untagged_rules() -> None:
    lab = f"{PREFIX}fw"
    chain = firewall.chain_name(lab)
    table = firewall.parse_save(f"*mangle\n:{chain} - [0:0]\n-A {chain} -j ACCEPT\nCOMMIT\n")
    assert firewall._remove_script(lab, table) is None
    with pytest.raises(PlanError, match=f"chain {chain}"):
        firewall._ensure_script(lab, table, ["lbx0"], [])


# --- the state directory --------------------------------------------------------------------


def test_down_removes_only_labbuilders_files_and_follows_no_link(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep")
    state = tmp_path / "state"
    (state / "host-keys").mkdir(parents=True)
    (state / "reports").mkdir()
    for name in ("lab.json", "secrets.json", "id_ed25519", "id_ed25519.pub", "known_hosts"):
        (state / name).write_text("x")
    (state / ".secrets.json.0123abcd.new").write_text("x")
    (state / "host-keys" / "controller").write_text("x")
    (state / "reports" / "install-1.json").write_text("{}")
    (state / "reports" / "latest.json").symlink_to(outside / "precious")
    # Tempest's workspaces (`verify`): their tempest.conf holds the admin password
    (state / "verify" / "20261206T131948" / "etc").mkdir(parents=True)
    (state / "verify" / "20261206T131948" / "etc" / "tempest.conf").write_text("x")
    (state / "console").symlink_to(outside)  # where labbuilder keeps a folder: not followed
    (state / "notes.txt").write_text("the user's")
    left = remove_state_files(state)
    assert left == ["console", "notes.txt"]
    assert sorted(p.name for p in state.iterdir()) == ["console", "notes.txt"]
    assert (outside / "precious").read_text() == "keep"
    assert (state / "console").is_symlink()


# --- the real libvirtd ----------------------------------------------------------------------


@pytest.fixture
def host(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A test environment on the real libvirtd; removes every ``lbtest-own-`` object, registry
    entry and the test pool when the test ends, whatever happened."""
    env = lab_environment(tmp_path / "state")
    conn = lv.connect(URI)
    labs: list[str] = []
    info = {"env": env, "conn": conn, "labs": labs, "tmp": tmp_path}
    try:
        yield info
    finally:
        for domain in conn.listAllDomains():
            if domain.name().startswith(PREFIX):
                lv.remove_domain(domain)
        for network in conn.listAllNetworks():
            if network.name().startswith(PREFIX):
                lv.remove_network(network)
        conn.close()
        remove_labs(labs, env)


def unique(label: str) -> str:
    return f"{PREFIX}{label}{os.getpid() % 1000}"


def lab_objects(conn: Any, lab: str) -> list[str]:
    names = [d.name() for d in lv.owned_domains(conn, lab)]
    names += [n.name() for n in lv.owned_networks(conn, lab)]
    pool = storage.find_owned_pool(conn, TEST_POOL, str(pool_dir_for_tests()))
    if pool is not None:
        names += [v.name() for v in storage.lab_volumes(pool, lab)]
    return sorted(names)


def pool_dir_for_tests() -> Path:
    return pool_dir({"LABBUILDER_POOL": TEST_POOL})


def assert_nothing_made(host: dict[str, Any], lab: str) -> None:
    assert lab_objects(host["conn"], lab) == []
    assert registry.registration(lab) is None
    assert not (Path(host["env"]["LABBUILDER_STATE_DIR"]) / "labs" / lab / "lab.json").exists()


@pytest.mark.integration
@pytest.mark.parametrize("owner", [None, "other"])
def test_up_refuses_a_foreign_network_and_leaves_it_alone(
    host: dict[str, Any], owner: str | None
) -> None:
    conn = host["conn"]
    lab = unique("n")
    host["labs"].append(lab)
    name = f"{lab}-management"
    other = f"{PREFIX}other" if owner else None
    network = conn.networkDefineXML(lab_network_xml(name, other, "lbtownfn0"))
    if owner:
        network.create()  # another lab's running network
    before, active = network.XMLDesc(0), network.isActive()
    lab_file = host["tmp"] / "lab.toml"
    lab_file.write_text(one_node_lab(lab))
    result = run_labbuilder("up", str(lab_file), env=host["env"], timeout=600)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"network {name} exists and is not labbuilder's lab {lab}" in result.stderr
    assert ("lab lbtest-own-other" if owner else "not labbuilder") in result.stderr
    assert "Traceback" not in result.stderr
    assert network.XMLDesc(0) == before and network.isActive() == active
    assert_nothing_made(host, lab)


@pytest.mark.integration
def test_up_refuses_a_foreign_domain_and_leaves_it_alone(host: dict[str, Any]) -> None:
    conn = host["conn"]
    lab = unique("d")
    host["labs"].append(lab)
    name = f"{lab}-controller"
    domain = conn.defineXML(lab_domain_xml(name, None))
    before = domain.XMLDesc(0)
    lab_file = host["tmp"] / "lab.toml"
    lab_file.write_text(one_node_lab(lab))
    result = run_labbuilder("up", str(lab_file), env=host["env"], timeout=600)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"domain {name} exists and is not labbuilder's lab {lab}" in result.stderr
    assert domain.XMLDesc(0) == before and not domain.isActive()
    assert_nothing_made(host, lab)


def make_lab_objects(
    host: dict[str, Any], lab: str, state_dir: Path, *, running: bool = False
) -> list[str]:
    """What `up` leaves on the host, made through labbuilder's own adapters: a network, a
    domain (defined; ``running``: started, a diskless guest idling in its firmware) and a
    volume, with the lab's metadata."""
    conn = host["conn"]
    attributes = {"state": str(state_dir), "lock": str(lab_lock_path(lab))}
    bridge = f"lbtown{lab[-4:]}".replace("-", "")[:15]
    xml = lab_network_xml(f"{lab}-management", lab, bridge, **attributes)
    lv.ensure_network(conn, f"{lab}-management", xml)
    domain_xml = lab_domain_xml(f"{lab}-controller", lab, **attributes)
    if running:
        lv.ensure_domain(conn, f"{lab}-controller", domain_xml)
    else:
        conn.defineXML(domain_xml)
    pool = storage.ensure_pool(conn, TEST_POOL, str(pool_dir_for_tests()))
    volume = storage.lab_volume_name(lab, "controller", "seed.iso")
    storage.upload(conn, pool, volume, io.BytesIO(b"x" * 512), 512)
    return sorted([f"{lab}-controller", f"{lab}-management", volume])


def gc_elsewhere(host: dict[str, Any], lab: str) -> str:
    """`labbuilder gc` with another state directory, for this lab only; its output."""
    env = {**host["env"], "LABBUILDER_STATE_DIR": str(host["tmp"] / "another-state")}
    result = run_labbuilder("gc", "--match", lab, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.integration
def test_gc_with_another_state_directory_keeps_a_lab_that_is_up(host: dict[str, Any]) -> None:
    lab = unique("u")
    host["labs"].append(lab)
    state_dir = Path(host["env"]["LABBUILDER_STATE_DIR"]) / "labs" / lab
    state_dir.mkdir(parents=True)
    (state_dir / "lab.json").write_text("{}")
    registry.register(lab, state_dir, URI)
    made = make_lab_objects(host, lab, state_dir, running=True)
    gc_elsewhere(host, lab)
    assert lab_objects(host["conn"], lab) == made
    assert host["conn"].lookupByName(f"{lab}-controller").isActive()
    assert registry.registration(lab) is not None
    # `list` from another state directory sees the lab's state too.
    env = {**host["env"], "LABBUILDER_STATE_DIR": str(host["tmp"] / "another-state")}
    listed = run_labbuilder("list", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)[lab] == {"domains": 1, "networks": 1, "volumes": 1, "state": 1}
    # Without the registry entry, the state directory named in the metadata still counts.
    registry.unregister(lab)
    gc_elsewhere(host, lab)
    assert lab_objects(host["conn"], lab) == made


@pytest.mark.integration
def test_gc_keeps_a_lab_in_the_middle_of_up_and_removes_it_once_abandoned(
    host: dict[str, Any],
) -> None:
    lab = unique("m")
    host["labs"].append(lab)
    state_dir = Path(host["env"]["LABBUILDER_STATE_DIR"]) / "labs" / lab
    # `up` holds the lab's lock, has registered the lab, and has no lab.json yet.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys\n"
            "from pathlib import Path\n"
            "from labbuilder.lifecycle.state import lab_lock, lab_state\n"
            f"with lab_lock(lab_state({lab!r}, Path({str(state_dir)!r})), 'labbuilder up'):\n"
            "    print('held', flush=True)\n"
            "    sys.stdin.read()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **host["env"]},
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert is_locked(lab_lock_path(lab))
        registry.register(lab, state_dir, URI)
        made = make_lab_objects(host, lab, state_dir)
        gc_elsewhere(host, lab)
        assert lab_objects(host["conn"], lab) == made
        assert registry.registration(lab) is not None
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)
    # The `up` is gone (killed): no lock, no lab.json. Now the lab is an orphan.
    output = gc_elsewhere(host, lab)
    assert lab_objects(host["conn"], lab) == []
    assert registry.registration(lab) is None
    assert f"lab {lab}" in output


@pytest.mark.integration
def test_gc_removes_a_real_orphan(host: dict[str, Any]) -> None:
    lab = unique("o")
    host["labs"].append(lab)
    gone = host["tmp"] / "deleted-state"
    make_lab_objects(host, lab, gone)
    gc_elsewhere(host, lab)
    assert lab_objects(host["conn"], lab) == []


@pytest.mark.integration
def test_down_leaves_a_foreign_file_and_follows_no_link(host: dict[str, Any]) -> None:
    lab = unique("f")
    host["labs"].append(lab)
    state_dir = Path(host["env"]["LABBUILDER_STATE_DIR"]) / "labs" / lab
    (state_dir / "reports").mkdir(parents=True, mode=0o700)
    state_dir.chmod(0o700)
    outside = host["tmp"] / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep")
    (state_dir / "lab.json").write_text("{}")
    (state_dir / "reports" / "latest.json").symlink_to(outside / "precious")
    (state_dir / "logs").symlink_to(outside)
    (state_dir / "mine.txt").write_text("the user's")
    registry.register(lab, state_dir, URI)
    made = make_lab_objects(host, lab, state_dir)
    assert made
    lab_file = host["tmp"] / "lab.toml"
    lab_file.write_text(one_node_lab(lab))
    # Another state directory: `down` finds the lab's own through the host's registry.
    env = {**host["env"], "LABBUILDER_STATE_DIR": str(host["tmp"] / "another-state")}
    result = run_labbuilder("down", str(lab_file), env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert lab_objects(host["conn"], lab) == []
    assert sorted(p.name for p in state_dir.iterdir()) == ["logs", "mine.txt"]
    assert (outside / "precious").read_text() == "keep"
    assert registry.registration(lab) is None


@pytest.mark.integration
def test_down_finds_a_lab_made_before_the_registry(host: dict[str, Any]) -> None:
    lab = unique("l")
    host["labs"].append(lab)
    state_dir = Path(host["env"]["LABBUILDER_STATE_DIR"]) / "labs" / lab
    state_dir.mkdir(parents=True, mode=0o700)
    (state_dir / "lab.json").write_text("{}")
    conn = host["conn"]
    xml = lab_network_xml(f"{lab}-management", lab, f"lbtownl{os.getpid() % 1000}")
    lv.ensure_network(conn, f"{lab}-management", xml)  # old metadata: no state, no lock
    assert run_labbuilder("list", "--json", env=host["env"]).returncode == 0
    lab_file = host["tmp"] / "lab.toml"
    lab_file.write_text(one_node_lab(lab))
    result = run_labbuilder("down", str(lab_file), env=host["env"], timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert lab_objects(conn, lab) == []
    assert not state_dir.exists()


@pytest.mark.integration
def test_up_refuses_a_pool_of_labbuilders_name_elsewhere(host: dict[str, Any]) -> None:
    conn = host["conn"]
    lab = unique("p")
    host["labs"].append(lab)
    name = f"{PREFIX}pool{os.getpid() % 1000}"
    target = host["tmp"] / "their-pool"
    xml = f"<pool type='dir'><name>{name}</name><target><path>{target}</path></target></pool>"
    pool = conn.storagePoolDefineXML(xml, 0)
    try:
        before = pool.XMLDesc(0)
        lab_file = host["tmp"] / "lab.toml"
        lab_file.write_text(one_node_lab(lab))
        env = {**host["env"], "LABBUILDER_POOL": name}
        result = run_labbuilder("up", str(lab_file), env=env, timeout=600)
        assert result.returncode == 2, result.stdout + result.stderr
        assert f"storage pool {name} exists and is not labbuilder's" in result.stderr
        assert pool.XMLDesc(0) == before and not pool.isActive() and not target.exists()
        assert_nothing_made(host, lab)
    finally:
        pool.undefine()


@pytest.mark.integration
def test_up_refuses_a_host_interface_with_the_labs_bridge_name(host: dict[str, Any]) -> None:
    from labbuilder.api.facade import load_lab, plan_lab

    lab = unique("i")
    host["labs"].append(lab)
    lab_file = host["tmp"] / "lab.toml"
    lab_file.write_text(one_node_lab(lab))
    bridge = plan_lab(load_lab(lab_file), host_check=False).plan.networks[0].bridge
    subprocess.run(["ip", "link", "add", bridge, "type", "bridge"], check=True)
    try:
        result = run_labbuilder("up", str(lab_file), env=host["env"], timeout=600)
        assert result.returncode == 2, result.stdout + result.stderr
        assert f"bridge {bridge}" in result.stderr and "no libvirt network made it" in result.stderr
        assert Path("/sys/class/net", bridge).exists()
        assert_nothing_made(host, lab)
    finally:
        subprocess.run(["ip", "link", "del", bridge], check=False)


@pytest.mark.integration
def test_up_refuses_a_lab_that_is_up_with_another_state_directory(host: dict[str, Any]) -> None:
    lab = unique("s")
    host["labs"].append(lab)
    elsewhere = host["tmp"] / "first-state" / "labs" / lab
    elsewhere.mkdir(parents=True)
    (elsewhere / "lab.json").write_text("{}")
    registry.register(lab, elsewhere, URI)
    lab_file = host["tmp"] / "lab.toml"
    lab_file.write_text(one_node_lab(lab))
    result = run_labbuilder("up", str(lab_file), env=host["env"], timeout=600)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"lab {lab} is up on this host with its state in {elsewhere}" in result.stderr
    entry = registry.registration(lab)
    assert entry is not None and entry.state_dir == elsewhere
    assert lab_objects(host["conn"], lab) == []


@pytest.mark.integration
def test_up_refuses_a_firewall_chain_of_the_labs_name_with_foreign_rules(
    host: dict[str, Any],
) -> None:
    lab = unique("c")
    host["labs"].append(lab)
    chain = firewall.chain_name(lab)
    subprocess.run(["iptables", "-w", "-t", "mangle", "-N", chain], check=True)
    try:
        subprocess.run(["iptables", "-w", "-t", "mangle", "-A", chain, "-j", "RETURN"], check=True)
        before = firewall.read_table(firewall.IPV4)
        lab_file = host["tmp"] / "lab.toml"
        lab_file.write_text(one_node_lab(lab))
        result = run_labbuilder("up", str(lab_file), env=host["env"], timeout=600)
        assert result.returncode == 2, result.stdout + result.stderr
        assert f"the firewall chain {chain} of lab {lab}" in result.stderr
        assert "not labbuilder" in result.stderr
        after = firewall.read_table(firewall.IPV4)
        assert [r for r in after.rules if r.chain == chain] == [
            r for r in before.rules if r.chain == chain
        ]
        assert_nothing_made(host, lab)
        assert lab not in firewall.owned_labs()
    finally:
        subprocess.run(["iptables", "-w", "-t", "mangle", "-F", chain], check=False)
        subprocess.run(["iptables", "-w", "-t", "mangle", "-X", chain], check=False)
