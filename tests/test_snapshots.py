"""Live snapshots of a whole lab on the real libvirtd (qemu:///system, TCG): a file written and
a process started in a guest come back with a restore, the guest runs and answers; `list`
shows what libvirt holds; replacing, deleting and refusing work; a failed take leaves nothing;
`down` and `gc` remove domains that have snapshots, leaving nothing behind.

The lab is one node on free subnets with its own state directory and storage pool; every name
starts with ``lbtest-``, and everything is removed even when a test fails.
"""

from __future__ import annotations

import contextlib
import io
import json
import secrets
import shutil
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lablib import lab_environment, lab_leftovers, one_node_lab, remove_labs
from lablib import run_labbuilder as labbuilder
from pyroute2 import IPRoute

from labbuilder.adapters import libvirt as lv
from labbuilder.adapters import storage
from labbuilder.adapters.ssh import SSHSession
from labbuilder.api import install as installer
from labbuilder.common.errors import DiskSpaceError, HypervisorError, LabbuilderError
from labbuilder.common.paths import pool_dir
from labbuilder.install.engine import StageOutcome, Status, StepOutcome
from labbuilder.lab.files import load_lab_file
from labbuilder.lifecycle import snapshots
from labbuilder.lifecycle.teardown import gc
from labbuilder.recipe.files import load_recipe

pytestmark = [pytest.mark.integration, pytest.mark.slow]
LAB = "lbtest-snap"
ORPHAN = "lbtest-snaporphan"  # cheap domains that never boot, for failures and gc
POOL = "lbtest-snap-pool"  # its own pool: other tests remove theirs when they end
URI = "qemu:///system"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    environment = {**lab_environment(tmp_path_factory.mktemp("state")), "LABBUILDER_POOL": POOL}
    remove_labs([LAB, ORPHAN], environment)  # what an interrupted earlier run left
    yield environment
    remove_labs([LAB, ORPHAN], environment)


@pytest.fixture(scope="module")
def lab(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    lab_file = tmp_path_factory.mktemp("lab") / "lab.toml"
    lab_file.write_text(one_node_lab(LAB))
    result = labbuilder("up", str(lab_file), "--json", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    state = Path(env["LABBUILDER_STATE_DIR"]) / "labs" / LAB
    record = json.loads((state / "lab.json").read_text())
    yield {
        "file": str(lab_file),
        "address": record["plan"]["nodes"][0]["nics"][0]["address"],
        "user": record["user"],
        "key": state / "id_ed25519",
    }
    labbuilder("down", str(lab_file), env=env)


@pytest.fixture
def conn() -> Iterator[Any]:
    connection = lv.connect(URI)
    yield connection
    connection.close()


@pytest.fixture
def hv(conn: Any) -> lv.LibvirtHypervisor:
    return lv.LibvirtHypervisor(conn)


def ssh(lab: dict[str, Any], command: str) -> str:
    with SSHSession(lab["address"], lab["user"], lab["key"]) as session:
        return session.run(command, timeout=120).check("controller").stdout


def cli_json(*args: str, env: dict[str, str]) -> Any:
    result = labbuilder(*args, "--json", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def lab_bytes() -> int:
    """Bytes the host has allocated for the lab's volumes."""
    connection = lv.connect(URI, readonly=True)
    try:
        pool = storage.find_pool(connection, POOL)
        assert pool is not None
        return sum(int(v.info()[2]) for v in storage.lab_volumes(pool, LAB))
    finally:
        connection.close()


def test_restore_brings_back_files_and_processes_running(
    lab: dict[str, Any], env: dict[str, str]
) -> None:
    token = secrets.token_hex(8)
    pid = ssh(lab, f"echo {token} > marker && (nohup sleep 100000 >/dev/null 2>&1 & echo $!)")
    pid = pid.strip()

    taken = cli_json("snapshot", "take", "stage1", lab["file"], env=env)
    assert taken["complete"] and taken["memory"] and taken["nodes"] == ["controller"]

    ssh(lab, f"echo changed > marker && rm marker && touch later && kill {pid}")
    assert "gone" in ssh(lab, f"kill -0 {pid} 2>/dev/null || echo gone")
    time.sleep(8)  # so that the guest's clock is visibly behind after the restore

    restored = cli_json("snapshot", "restore", "stage1", lab["file"], env=env)
    assert restored["snapshot"] == "stage1" and restored["nodes"] == ["controller"]
    assert restored["clock_seconds"]["controller"] > 5  # it was at the snapshot's time

    assert ssh(lab, "cat marker").strip() == token
    assert ssh(lab, "test -e later && echo there || echo absent").strip() == "absent"
    assert ssh(lab, f"kill -0 {pid} && echo alive").strip() == "alive"
    assert ssh(lab, "hostname").strip() == "controller"
    # set from its offset measured around quick round trips, not from a time sent late
    sent = time.time()
    guest = float(ssh(lab, "date +%s.%N"))
    assert sent - 0.5 < guest < time.time() + 0.5, (sent, guest)
    status = cli_json("status", lab["file"], env=env)
    assert [node["state"] for node in status["nodes"]] == ["running"]


def test_list_shows_the_snapshot_complete_with_its_cost(
    lab: dict[str, Any], env: dict[str, str]
) -> None:
    listed = cli_json("snapshot", "list", lab["file"], env=env)
    assert [entry["name"] for entry in listed] == ["stage1"]
    entry = listed[0]
    assert entry["complete"] and entry["missing"] == [] and entry["memory"]
    assert time.time() - 3600 < entry["created"] <= time.time()
    assert entry["disk_bytes"]["controller"] > 50 * 2**20  # the guest's memory in use
    table = labbuilder("snapshot", "list", lab["file"], env=env)
    assert table.returncode == 0 and "stage1" in table.stdout, table.stderr


def test_restoring_an_unknown_snapshot_is_refused_clearly(
    lab: dict[str, Any], env: dict[str, str]
) -> None:
    result = labbuilder("snapshot", "restore", "nope", lab["file"], env=env)
    assert result.returncode == 2
    assert "lab lbtest-snap has no snapshot 'nope' (it has: stage1)" in result.stderr
    assert "hint: `labbuilder snapshot list`" in result.stderr
    bad = labbuilder("snapshot", "take", "no/slashes", lab["file"], env=env)
    assert bad.returncode == 2 and "not a valid snapshot name" in bad.stderr


def test_a_snapshot_without_memory_of_a_running_lab_is_refused(
    lab: dict[str, Any], conn: Any, hv: lv.LibvirtHypervisor
) -> None:
    with pytest.raises(HypervisorError, match="without memory: controller running"):
        snapshots.take_snapshot(hv, LAB, "nomem", memory=False)
    assert [info.name for info in snapshots.list_snapshots(hv, LAB)] == ["stage1"]
    assert hv.domain_state(snapshots.lab_nodes(hv, LAB)[0][1]) == "running"


def test_a_take_that_would_fill_the_disk_is_refused_before_pausing(
    lab: dict[str, Any],
    env: dict[str, str],
    conn: Any,
    hv: lv.LibvirtHypervisor,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    directory = pool_dir(env)
    nodes = snapshots.lab_nodes(hv, LAB)
    memory = int(conn.lookupByName(nodes[0][1]).info()[2]) * 1024
    needs = snapshots._space_needs(hv, nodes, snapshots.libvirt_name("fresh"))
    assert [(n.node, n.directory, n.size) for n in needs] == [("controller", directory, memory)]
    # Replacing a snapshot reuses its memory state's clusters: less is needed.
    (again,) = snapshots._space_needs(hv, nodes, snapshots.libvirt_name("stage1"))
    assert 0 <= again.size < memory - 50 * 2**20

    # Filling this host's disk for real would harm it: the margin that must stay free is
    # raised above the free space instead, so the real needs and free space refuse the take.
    free = shutil.disk_usage(directory).free
    monkeypatch.setattr(snapshots, "SPACE_MARGIN", free)
    with pytest.raises(
        DiskSpaceError, match=r"snapshot full of lab lbtest-snap needs about"
    ) as err:
        snapshots.take_snapshot(hv, LAB, "full")
    assert f"at {directory} for the memory of controller" in err.value.message
    assert "labbuilder snapshot delete NAME" in (err.value.hint or "")
    assert [info.name for info in snapshots.list_snapshots(hv, LAB)] == ["stage1"]
    assert hv.domain_state(nodes[0][1]) == "running"

    # An install skips that stage's snapshot, says why in the stage's report, and goes on.
    outcome = StageOutcome("environment", "t", "g", 1.0, [])
    outcome.steps.append(StepOutcome("environment", "hosts", "controller", "t", "g", Status.OK))
    lab_obj = load_lab_file(Path(lab["file"]))
    assert installer.snapshot_stage(lab_obj, outcome, load_recipe("zed-debian-12")) is None
    assert outcome.snapshot_note.startswith(
        "snapshot skipped: snapshot environment of lab lbtest-snap needs about"
    )
    assert [info.name for info in snapshots.list_snapshots(hv, LAB)] == ["stage1"]


def test_a_node_silent_after_a_stage_snapshot_is_brought_back_from_it(
    lab: dict[str, Any],
    env: dict[str, str],
    conn: Any,
    hv: lv.LibvirtHypervisor,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A node that does not answer once the lab resumes from a stage's snapshot (here its
    host-side link is taken down as the take ends) fails the clock sync; the install brings
    the lab back from the snapshot just taken, says so in the stage's report, and goes on."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(snapshots, "CLOCK_SYNC_TIMEOUT", 10.0)
    ((node, domain),) = snapshots.lab_nodes(hv, LAB)
    devices = [
        target.get("dev")
        for target in ET.fromstring(conn.lookupByName(domain).XMLDesc()).iterfind(
            "devices/interface/target"
        )
    ]
    assert devices and all(devices), devices
    real_take = snapshots.take_snapshot

    def take_then_cut(*args: Any, **kwargs: Any) -> snapshots.SnapshotInfo:
        info = real_take(*args, **kwargs)
        with IPRoute() as ip:
            for device in devices:
                ip.link("set", index=ip.link_lookup(ifname=device)[0], state="down")
        return info

    monkeypatch.setattr(snapshots, "take_snapshot", take_then_cut)
    token = secrets.token_hex(8)
    ssh(lab, f"echo {token} > silent-marker")
    outcome = StageOutcome("identity", "t", "g", 1.0, [])
    outcome.steps.append(StepOutcome("identity", "bootstrap", node, "t", "g", Status.OK))
    try:
        seconds = installer.snapshot_stage(
            load_lab_file(Path(lab["file"])), outcome, load_recipe("zed-debian-12")
        )
        assert seconds is not None
        assert f"cannot set the clock of node {node}" in outcome.snapshot_note
        assert outcome.snapshot_note.endswith("the lab was brought back from snapshot identity")
        assert ssh(lab, "cat silent-marker").strip() == token  # the lab as it was, answering
        assert hv.domain_state(domain) == "running"
    finally:
        with contextlib.suppress(LabbuilderError):
            snapshots.delete_snapshot(hv, LAB, "identity")
        with IPRoute() as ip:  # still down only if the restore did not make the node anew
            for device in devices:
                for index in ip.link_lookup(ifname=device):
                    ip.link("set", index=index, state="up")


def test_take_again_replaces_and_delete_after_and_all(
    lab: dict[str, Any], env: dict[str, str], conn: Any, hv: lv.LibvirtHypervisor
) -> None:
    snapshots.take_snapshot(hv, LAB, "stage2", meta={"recipe": "abc"})
    snapshots.take_snapshot(hv, LAB, "stage3")
    first = snapshots.list_snapshots(hv, LAB)
    replaced = snapshots.take_snapshot(hv, LAB, "stage2", description="again")
    infos = snapshots.list_snapshots(hv, LAB)
    assert [i.name for i in first] == ["stage1", "stage2", "stage3"]
    assert [i.name for i in infos] == ["stage1", "stage3", "stage2"]  # in the order taken
    assert infos[2].created == replaced.created > first[1].created
    assert infos[2].description == "again" and infos[2].meta == {}
    assert all(info.complete for info in infos)

    result = labbuilder("snapshot", "delete", "--after", "stage1", lab["file"], env=env)
    assert result.returncode == 0, result.stderr
    assert "deleted snapshots stage2, stage3" in result.stdout
    assert [i.name for i in snapshots.list_snapshots(hv, LAB)] == ["stage1"]

    snapshots.take_snapshot(hv, LAB, "stage4")
    with_snapshots = lab_bytes()
    result = labbuilder("snapshot", "delete", "stage4", lab["file"], env=env)
    assert result.returncode == 0, result.stderr
    result = labbuilder("snapshot", "delete", "--all", lab["file"], env=env)
    assert result.returncode == 0, result.stderr
    assert snapshots.list_snapshots(hv, LAB) == []
    assert lab_bytes() < with_snapshots  # the disk goes back to the host
    assert labbuilder("snapshot", "delete", lab["file"], env=env).returncode == 2


def test_create_and_restore_times_and_disk_cost(
    lab: dict[str, Any], conn: Any, hv: lv.LibvirtHypervisor
) -> None:
    before = lab_bytes()
    started = time.monotonic()
    info = snapshots.take_snapshot(hv, LAB, "measured")
    create = time.monotonic() - started
    after = lab_bytes()
    restore = snapshots.restore_snapshot(hv, LAB, "measured")
    print(  # noqa: T201  (shown with pytest -s; bench/snapshots.py measures a 2-node lab)
        f"\nsnapshot of a 1-node lab: create {create:.1f} s, restore {restore:.1f} s, "
        f"memory state {info.disk_bytes['controller'] / 2**20:.0f} MB, pool +{(after - before) / 2**20:.0f} MB"
    )
    assert create < 60 and restore < 120
    assert info.disk_bytes["controller"] > 50 * 2**20  # the memory state, in the qcow2 disk
    # The pool grows by less when the disk reuses space of deleted snapshots.
    assert after - before <= info.disk_bytes["controller"] + 64 * 2**20
    assert ssh(lab, "hostname").strip() == "controller"


def test_a_failed_take_leaves_the_snapshot_on_no_node_and_gc_removes_them(
    env: dict[str, str], conn: Any, hv: lv.LibvirtHypervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    pool = storage.ensure_pool(conn, POOL, str(pool_dir()))
    # Two shut-off nodes: n1's disk is qcow2, n2's a writable raw disk (no internal snapshots).
    good = storage.ensure_empty_disk(
        pool, storage.lab_volume_name(ORPHAN, "n1", "vda.qcow2"), 2**26
    )
    raw = storage.upload(
        conn,
        pool,
        storage.lab_volume_name(ORPHAN, "n2", "vda.raw"),
        io.BytesIO(bytes(2**20)),
        2**20,
    )
    for node, volume, kind in (("n1", good, "qcow2"), ("n2", raw, "raw")):
        conn.defineXML(f"""<domain type="qemu"><name>{ORPHAN}-{node}</name>
          <metadata><lb:lab xmlns:lb="{lv.METADATA_NS}" name="{ORPHAN}" node="{node}"/></metadata>
          <memory unit="MiB">64</memory><vcpu>1</vcpu><os><type arch="x86_64">hvm</type></os>
          <devices><disk type="volume" device="disk"><driver name="qemu" type="{kind}"/>
          <source pool="{POOL}" volume="{volume.name()}"/><target dev="vda" bus="virtio"/></disk>
          </devices></domain>""")

    with pytest.raises(HypervisorError) as failure:
        snapshots.take_snapshot(hv, ORPHAN, "broken")
    assert "snapshot broken of lab lbtest-snaporphan failed on n2" in str(failure.value)
    assert "removed it again from n1" in str(failure.value)
    assert snapshots.list_snapshots(hv, ORPHAN) == []
    assert all(hv.snapshots(domain) == [] for _, domain in snapshots.lab_nodes(hv, ORPHAN))

    # Without n2, shut-off nodes get disk-only snapshots; gc removes domains that have them.
    lv.remove_domain(conn.lookupByName(f"{ORPHAN}-n2"))
    info = snapshots.take_snapshot(hv, ORPHAN, "disks", memory=False)
    assert info.nodes == ("n1",) and not info.memory
    assert [i.name for i in snapshots.list_snapshots(hv, ORPHAN)] == ["disks"]
    removed = gc(URI, match=ORPHAN)
    assert removed[ORPHAN].domains == [f"{ORPHAN}-n1"]
    assert lab_leftovers(ORPHAN, POOL) == {"domains": [], "networks": [], "volumes": []}


def test_down_removes_a_lab_that_has_snapshots(
    lab: dict[str, Any], env: dict[str, str], conn: Any, hv: lv.LibvirtHypervisor
) -> None:
    snapshots.take_snapshot(hv, LAB, "last")
    assert len(snapshots.list_snapshots(hv, LAB)) == 2  # "measured" and "last"
    result = labbuilder("down", lab["file"], env=env)
    assert result.returncode == 0, result.stderr
    assert lab_leftovers(LAB, POOL) == {"domains": [], "networks": [], "volumes": []}
    assert not (Path(env["LABBUILDER_STATE_DIR"]) / "labs" / LAB).exists()
    result = labbuilder("snapshot", "list", lab["file"], env=env)
    assert result.returncode == 2 and "has no nodes on this host" in result.stderr
