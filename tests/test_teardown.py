"""`gc` and `down` find a lab's objects through libvirt's own state (metadata, volume names),
with no side database: here for objects whose lab has no state directory at all."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lablib import TEST_POOL

from labbuilder.adapters import libvirt as lv
from labbuilder.adapters import storage
from labbuilder.common.paths import pool_dir
from labbuilder.lifecycle.teardown import gc, labs_on_host

pytestmark = pytest.mark.integration
ORPHAN = "lbtest-orphan"


@pytest.fixture
def environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setenv("LABBUILDER_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("LABBUILDER_POOL", TEST_POOL)
    conn = lv.connect("qemu:///system")
    pool = storage.ensure_pool(conn, TEST_POOL, str(pool_dir()))
    yield conn, pool
    for network in lv.owned_networks(conn, ORPHAN):
        lv.remove_network(network)
    for volume in storage.lab_volumes(pool, ORPHAN):
        storage.delete_volume(volume)
    if not pool.listAllVolumes(0):
        storage.remove_pool(pool)
    conn.close()


def test_gc_removes_tagged_objects_of_a_lab_without_state(environment: Any) -> None:
    conn, pool = environment
    xml = f"""<network><name>{ORPHAN}-management</name>
      <metadata><lb:lab xmlns:lb="{lv.METADATA_NS}" name="{ORPHAN}" network="management"/></metadata>
      <bridge name="lbtestorph0"/></network>"""
    conn.networkDefineXML(xml)
    storage.upload(
        conn,
        pool,
        storage.lab_volume_name(ORPHAN, "controller", "seed.iso"),
        io.BytesIO(b"x" * 512),
        512,
    )
    assert labs_on_host(lv.LibvirtHypervisor(conn))[ORPHAN] == {
        "domains": 0,
        "networks": 1,
        "volumes": 1,
        "state": 0,
    }
    assert gc("qemu:///system", match="lbtest-nothing-*") == {}
    # The pattern names this test's lab only: other test labs may be up meanwhile.
    removed = gc("qemu:///system", match=f"{ORPHAN}*")
    assert removed[ORPHAN].networks == [f"{ORPHAN}-management"]
    assert removed[ORPHAN].volumes == [f"{ORPHAN}__controller__seed.iso"]
    assert ORPHAN not in labs_on_host(lv.LibvirtHypervisor(conn))


def test_gc_keeps_a_lab_that_has_state(environment: Any) -> None:
    conn, _ = environment
    state = Path(os.environ["LABBUILDER_STATE_DIR"]) / "labs" / ORPHAN
    state.mkdir(parents=True)
    (state / "lab.json").write_text("{}")
    xml = f"""<network><name>{ORPHAN}-management</name>
      <metadata><lb:lab xmlns:lb="{lv.METADATA_NS}" name="{ORPHAN}"/></metadata>
      <bridge name="lbtestorph0"/></network>"""
    conn.networkDefineXML(xml)
    assert ORPHAN not in gc("qemu:///system", match=f"{ORPHAN}*")
    assert labs_on_host(lv.LibvirtHypervisor(conn))[ORPHAN]["networks"] == 1
