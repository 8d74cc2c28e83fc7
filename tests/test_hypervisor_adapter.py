"""The libvirt adapter against libvirt's own test driver (``test:///default``: a running domain
"test", a network "default", a pool "default-pool"; no daemon, each test in milliseconds): the
``Hypervisor`` protocol's records and actions, and libvirt's errors as ``HypervisorError`` with
libvirt's code."""

from __future__ import annotations

import io
import secrets
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from labbuilder.adapters import firewall, storage
from labbuilder.adapters import libvirt as lv
from labbuilder.adapters.hypervisor import Domain, Hypervisor, Network, Volume
from labbuilder.adapters.libvirterrors import ErrorCode, hypervisor_error
from labbuilder.cli.main import handle
from labbuilder.common.errors import HypervisorError, PlanError
from labbuilder.lifecycle import teardown
from labbuilder.lifecycle.state import lab_state
from labbuilder.lifecycle.status import lab_status

URI = "test:///default"
POOL, POOL_PATH = "default-pool", "/default-pool"


def metadata(lab: str, **attributes: str) -> str:
    more = "".join(f' {key}="{value}"' for key, value in attributes.items())
    return f'<metadata><lb:lab xmlns:lb="{lv.METADATA_NS}" name="{lab}"{more}/></metadata>'


@pytest.fixture
def hypervisor() -> Iterator[lv.LibvirtHypervisor]:
    """The test driver's default host; what a test makes there is removed after it."""
    with lv.LibvirtHypervisor.open(URI) as opened:
        yield opened


@pytest.fixture
def lab(hypervisor: lv.LibvirtHypervisor) -> Iterator[str]:
    """A lab with two nodes (n1 running, n2 defined), a network and a volume on the test host."""
    name = f"lbtest{secrets.token_hex(3)}"
    conn = hypervisor.connection
    for node, start in (("n1", True), ("n2", False)):
        domain = conn.defineXML(
            f'<domain type="test"><name>{name}-{node}</name>'
            f"{metadata(name, node=node, role='controller', plan='p1')}"
            '<memory unit="MiB">64</memory><os><type>hvm</type></os></domain>'
        )
        if start:
            domain.create()
    network = conn.networkDefineXML(
        f"<network><name>{name}-mgmt</name>{metadata(name)}"
        f'<bridge name="{name[:10]}br0"/><ip address="10.77.1.1" prefix="24"/></network>'
    )
    network.create()
    pool = storage.find_pool(conn, POOL)
    storage.ensure_empty_disk(pool, storage.lab_volume_name(name, "n1", "vda.qcow2"), 2**20)
    yield name
    _remove(hypervisor, name)


def _remove(hypervisor: lv.LibvirtHypervisor, lab: str) -> None:
    for domain in hypervisor.domains(lab):
        hypervisor.remove_domain(domain.name)
    for network in hypervisor.networks(lab):
        hypervisor.remove_network(network.name)
    for volume in hypervisor.lab_volumes(POOL, POOL_PATH, lab):
        hypervisor.delete_volume(volume)


def test_the_libvirt_adapter_is_a_hypervisor(hypervisor: lv.LibvirtHypervisor) -> None:
    implementation: Hypervisor = hypervisor
    assert implementation.domain("test") is not None


def test_domains_are_records_of_their_lab(hypervisor: lv.LibvirtHypervisor, lab: str) -> None:
    domains = sorted(hypervisor.domains(lab), key=lambda d: d.name)
    assert [(d.name, d.node, d.state, d.active, d.lab) for d in domains] == [
        (f"{lab}-n1", "n1", "running", True, lab),
        (f"{lab}-n2", "n2", "shut off", False, lab),
    ]
    first = domains[0]
    assert isinstance(first, Domain) and first.memory == 64 * 2**20
    assert first.metadata == {"name": lab, "node": "n1", "role": "controller", "plan": "p1"}
    assert first.domain_type == "test"
    with pytest.raises(AttributeError):
        first.state = "paused"  # type: ignore[misc]
    # Only labbuilder's objects are listed; the host's own are found by name, owned by nobody.
    assert "test" not in {d.name for d in hypervisor.domains()}
    unowned = hypervisor.domain("test")
    assert unowned is not None and unowned.lab is None and unowned.node == "test"
    assert hypervisor.domain("nosuchdomain") is None


def test_networks_and_volumes_are_records(hypervisor: lv.LibvirtHypervisor, lab: str) -> None:
    assert hypervisor.networks(lab) == [
        Network(f"{lab}-mgmt", True, hypervisor.networks(lab)[0].xml)
    ]
    default = hypervisor.network("default")
    assert default is not None and default.lab is None and default.active
    assert hypervisor.network("nosuchnetwork") is None
    (volume,) = hypervisor.lab_volumes(POOL, POOL_PATH, lab)
    assert volume == Volume(f"{lab}__n1__vda.qcow2", POOL, f"{POOL_PATH}/{lab}__n1__vda.qcow2")
    assert volume.lab == lab
    # A pool of that name elsewhere is not labbuilder's: nothing of it is listed.
    assert hypervisor.lab_volumes(POOL, "/elsewhere", lab) == []
    facts = {fact.name: fact for fact in hypervisor.network_facts()}
    assert facts[f"{lab}-mgmt"].cidrs == ("10.77.1.0/24",) and facts[f"{lab}-mgmt"].lab == lab


def test_what_each_lab_takes_counts_running_nodes_and_disk_headroom(
    hypervisor: lv.LibvirtHypervisor, lab: str
) -> None:
    uses = {use.lab: use for use in hypervisor.lab_uses(POOL, POOL_PATH)}
    use = uses[lab]
    # n1 runs (1 vCPU, 64 MiB at full size); n2 is shut off and takes nothing
    assert (use.vcpus, use.memory) == (1, 64 * 2**20)
    # its 1 MiB volume: the test driver allocates it whole, so nothing is left to grow
    assert 0 <= use.disk_growth <= 2**20
    assert "test" not in uses  # the host's own domain belongs to no lab
    hypervisor.suspend_domain(f"{lab}-n1")  # paused still holds its memory
    assert {u.lab: u for u in hypervisor.lab_uses(POOL, POOL_PATH)}[lab].vcpus == 1
    hypervisor.resume_domain(f"{lab}-n1")


def test_state_changes_by_name(hypervisor: lv.LibvirtHypervisor, lab: str) -> None:
    name = f"{lab}-n1"
    hypervisor.suspend_domain(name)
    assert hypervisor.domain_state(name) == "paused" and hypervisor.is_active(name)
    hypervisor.resume_domain(name)
    assert hypervisor.domain_state(name) == "running"
    assert hypervisor.running_memory(lab) == 64 * 2**20  # n2 is shut off
    hypervisor.remove_domain(name)
    hypervisor.remove_domain(name)  # already gone: nothing to do
    assert hypervisor.domain(name) is None


def test_snapshots_by_name(hypervisor: lv.LibvirtHypervisor, lab: str) -> None:
    name = f"{lab}-n1"
    hypervisor.create_snapshot(name, "<domainsnapshot><name>lb-one</name></domainsnapshot>")
    (snapshot,) = hypervisor.snapshots(name)
    assert (snapshot.domain, snapshot.name) == (name, "lb-one")
    assert "<domainsnapshot>" in snapshot.xml
    hypervisor.suspend_domain(name)
    hypervisor.revert_snapshot(name, "lb-one")
    assert hypervisor.domain_state(name) == "running"
    assert hypervisor.delete_snapshot(name, "lb-one") is True
    assert hypervisor.delete_snapshot(name, "lb-one") is False
    assert hypervisor.snapshots(name) == []


def test_libvirt_errors_keep_their_code(hypervisor: lv.LibvirtHypervisor) -> None:
    with pytest.raises(HypervisorError) as missing:
        hypervisor.suspend_domain("nosuchdomain")
    assert missing.value.code == ErrorCode.NO_DOMAIN
    assert missing.value.message.startswith("domain nosuchdomain: ")
    assert missing.value.detail and missing.value.detail in missing.value.message
    assert missing.value.hint and "labbuilder status" in missing.value.hint
    with pytest.raises(HypervisorError) as twice:
        hypervisor.revert_snapshot("test", "lb-nosuchsnapshot")
    assert twice.value.code == ErrorCode.NO_DOMAIN_SNAPSHOT
    assert twice.value.hint and "snapshot list" in twice.value.hint


def test_a_connection_that_fails_is_a_hypervisor_error_with_a_hint(tmp_path: Path) -> None:
    with pytest.raises(HypervisorError) as failed:
        lv.LibvirtHypervisor.open(f"test://{tmp_path}/missing.xml")
    assert failed.value.message.startswith(f"cannot connect to libvirt at test://{tmp_path}")
    assert failed.value.hint and "libvirtd" in failed.value.hint
    assert failed.value.code is not None


def test_an_untranslated_libvirt_error_is_reported_in_one_line() -> None:
    conn = libvirt.open(URI)
    try:
        with pytest.raises(libvirt.libvirtError) as raw:
            conn.lookupByName("nosuchdomain")
    finally:
        conn.close()
    translated = hypervisor_error(raw.value)
    assert translated is not None and translated.code == ErrorCode.NO_DOMAIN
    assert hypervisor_error(ValueError("x")) is None
    reported: list[tuple[str, str | None, int]] = []

    def report(message: str, hint: str | None, code: int) -> int:
        reported.append((message, hint, code))
        return code

    assert handle(raw.value, report) == 1
    assert reported == [
        (
            f"libvirt: {raw.value.get_error_message()}",
            "run again with --debug to see where it happened",
            1,
        )
    ]


def test_a_failed_upload_leaves_no_volume(hypervisor: lv.LibvirtHypervisor, lab: str) -> None:
    # The test driver cannot upload: the error keeps libvirt's code, and the volume made for
    # the upload is deleted again (a half-written base never serves an overlay).
    pool = storage.find_pool(hypervisor.connection, POOL)
    name = storage.lab_volume_name(lab, "n2", "seed.raw")
    with pytest.raises(HypervisorError) as failed:
        storage.upload(hypervisor.connection, pool, name, io.BytesIO(b"x" * 4096), 4096)
    assert failed.value.message.startswith(f"cannot upload volume {name}: ")
    assert failed.value.code == ErrorCode.NO_SUPPORT
    assert name not in {volume.name for volume in hypervisor.lab_volumes(POOL, POOL_PATH, lab)}


def test_status_and_teardown_read_the_hypervisor(
    hypervisor: lv.LibvirtHypervisor,
    lab: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    status = lab_status(lab, URI, lab_state(lab, tmp_path / "state"))
    assert [(n.name, n.role, n.state, n.acceleration) for n in status.nodes] == [
        ("n1", "controller", "running", "tcg"),
        ("n2", "controller", "shut off", "tcg"),
    ]
    assert status.networks == ((f"{lab}-mgmt", True),)
    monkeypatch.setenv("LABBUILDER_POOL", POOL)
    monkeypatch.setenv("LABBUILDER_POOL_DIR", POOL_PATH)
    counts = teardown.labs_on_host(hypervisor)[lab]
    assert (counts["domains"], counts["networks"], counts["volumes"]) == (2, 1, 1)
    monkeypatch.setattr(firewall, "owned_labs", lambda: set())
    removed = teardown.remove_lab_objects(hypervisor, lab)
    assert sorted(removed.domains) == [f"{lab}-n1", f"{lab}-n2"]
    assert removed.networks == [f"{lab}-mgmt"]
    assert removed.volumes == [f"{lab}__n1__vda.qcow2"]
    assert lab not in teardown.labs_on_host(hypervisor)


def test_making_keeps_the_labs_own_objects_and_refuses_others(
    hypervisor: lv.LibvirtHypervisor, lab: str
) -> None:
    domain_xml = (
        f'<domain type="test"><name>{lab}-n3</name>{metadata(lab, node="n3")}'
        '<memory unit="MiB">32</memory><os><type>hvm</type></os></domain>'
    )
    made = hypervisor.ensure_domain(f"{lab}-n3", domain_xml)
    assert (made.name, made.node, made.state) == (f"{lab}-n3", "n3", "running")
    hypervisor.suspend_domain(made.name)
    kept = hypervisor.ensure_domain(f"{lab}-n2", "", lab=lab)  # exists: started, not redefined
    assert kept.active and kept.node == "n2"
    with pytest.raises(PlanError, match="domain test exists and is not labbuilder's lab"):
        hypervisor.ensure_domain("test", "", lab=lab)
    network = hypervisor.ensure_network(f"{lab}-mgmt", "", lab=lab)
    assert network.active and network.lab == lab
    with pytest.raises(PlanError, match="network default exists"):
        hypervisor.ensure_network("default", "", lab=lab)


def test_making_volumes(hypervisor: lv.LibvirtHypervisor, lab: str) -> None:
    base = hypervisor.ensure_empty_disk(POOL, storage.lab_volume_name(lab, "n1", "base"), 2**20)
    assert hypervisor.ensure_empty_disk(POOL, base.name, 2**21) == base  # kept
    overlay = hypervisor.ensure_overlay(POOL, f"{lab}__n1__overlay.qcow2", base, 2**22)
    assert overlay.pool == POOL and overlay.lab == lab
    assert hypervisor.find_volume(POOL, overlay.name) == overlay
    hypervisor.delete_volume(overlay)
    assert hypervisor.find_volume(POOL, overlay.name) is None
    with pytest.raises(HypervisorError) as gone:
        hypervisor.find_volume("nosuchpool", "x")
    assert gone.value.code == ErrorCode.NO_STORAGE_POOL
    hypervisor.refuse_foreign_pool("nosuchpool", "/x")  # no pool of that name: nothing to refuse
    with pytest.raises(PlanError, match="storage pool default-pool exists and is not"):
        hypervisor.refuse_foreign_pool(POOL, "/var/lib/labbuilder/pool")
