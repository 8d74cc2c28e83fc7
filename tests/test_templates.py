"""Templates' parts: libvirt's save-image format, a saved node's XML as another lab's node, the
plan comparison that refuses a lab unlike its template, and restoring a saved domain under new
names through a FIFO on the real libvirtd (a small diskless guest; no OS needed).

The whole path (``template save``, ``up --from-template``, ``install``) runs on the suite's
three-node lab in test_install_e2e.py.
"""

from __future__ import annotations

import struct
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from labbuilder.adapters import libvirt as lv
from labbuilder.adapters import savefile
from labbuilder.common.errors import HypervisorError
from labbuilder.lab.files import load_lab_file as load_lab
from labbuilder.lab.planner import plan
from labbuilder.lab.stamp import template_differences, with_template_macs
from labbuilder.libvirtxml.restamp import Restamp, RestampError, restamp_domain_xml
from labbuilder.model.lab import HostFacts

PREFIX = "lbtest-tpl-"


# --- the save image's header ------------------------------------------------------------------


def _image_file(path: Path, xml: str, cookie: bytes, stream: bytes) -> None:
    data = xml.encode() + b"\0" + cookie + b"\0" * 37  # libvirt pads the data
    header = savefile.HEADER.pack(
        savefile.MAGIC, 2, len(data), 1, 0, len(xml.encode()) + 1 if cookie else 0
    )
    path.write_bytes(header + data + stream)


def test_a_save_image_is_read_and_written_with_a_new_xml(tmp_path: Path) -> None:
    assert savefile.HEADER.size == 92  # libvirt's virQEMUSaveHeader: 16 bytes + 19 words
    path = tmp_path / "node.save"
    _image_file(path, "<domain><name>a</name></domain>", b"<cookie/>\0", b"QEVM" + b"x" * 100)
    image = savefile.read_image(path)
    assert image.xml == "<domain><name>a</name></domain>"
    assert image.cookie == b"<cookie/>\0"
    assert image.was_running and image.compressed == 0
    assert image.stream_size == 104
    assert path.read_bytes()[image.stream_offset :].startswith(b"QEVM")

    again = tmp_path / "again.save"
    again.write_bytes(savefile.header_for(image, "<domain><name>b</name></domain>") + b"QEVM")
    read = savefile.read_image(again)
    assert read.xml == "<domain><name>b</name></domain>" and read.cookie == image.cookie
    assert again.read_bytes()[read.stream_offset :] == b"QEVM"


def test_what_is_not_a_whole_save_image_is_refused(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_bytes(b"LibvirtQemudSave")
    with pytest.raises(HypervisorError, match="too short"):
        savefile.read_image(short)
    partial = tmp_path / "partial"
    partial.write_bytes(savefile.HEADER.pack(savefile.PARTIAL, 2, 0, 0, 0, 0))
    with pytest.raises(HypervisorError, match="unfinished"):
        savefile.read_image(partial)
    other = tmp_path / "other"
    other.write_bytes(struct.pack("<16s5I56x", b"SomethingElse!!!", 2, 0, 0, 0, 0))
    with pytest.raises(HypervisorError, match="not a libvirt save image"):
        savefile.read_image(other)
    truncated = tmp_path / "truncated"
    truncated.write_bytes(savefile.HEADER.pack(savefile.MAGIC, 2, 500, 0, 0, 0) + b"<domain")
    with pytest.raises(HypervisorError, match="truncated"):
        savefile.read_image(truncated)


# --- the saved XML as another lab's node ------------------------------------------------------

SAVED = """<domain type='qemu'>
  <name>lab-a-controller</name>
  <uuid>0b3c5d43-6a93-4ba6-9a4e-7f1a5b1f0c11</uuid>
  <metadata><lb:lab xmlns:lb="urn:labbuilder:lab:1" name="lab-a" node="controller" role="controller" plan="abc" state="/s/lab-a" lock="/l/lab-a.lock"/></metadata>
  <memory unit='KiB'>1048576</memory>
  <devices>
    <disk type='volume' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source pool='labbuilder' volume='lab-a__controller__vda.qcow2' index='2'/>
      <backingStore type='file' index='3'><format type='qcow2'/><source file='/p/base.qcow2'/></backingStore>
      <target dev='vda' bus='virtio'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x04' function='0x0'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/p/lab-a__controller__seed.iso'/>
      <target dev='vdb' bus='virtio'/>
      <readonly/>
    </disk>
    <interface type='network'>
      <mac address='52:54:00:AA:00:01'/>
      <source network='lab-a-management' portid='1234' bridge='lbr-a-mgmt'/>
      <target dev='vnet3'/>
      <model type='virtio'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x03' function='0x0'/>
    </interface>
    <serial type='pty'><log file='/s/lab-a/console/controller.log' append='on'/><target port='0'/></serial>
    <console type='pty'><log file='/s/lab-a/console/controller.log' append='on'/><target type='serial' port='0'/></console>
  </devices>
</domain>"""


def _restamp() -> Restamp:
    return Restamp(
        name="lab-b-controller",
        uuid="7c0bd3a8-2f6e-4bd4-a1b0-6e0fd1b3a222",
        metadata={"name": "lab-b", "node": "controller", "plan": "def"},
        disks={"vda": ("pool", "lab-b__controller__vda.qcow2"), "vdb": ("pool", "seed-b")},
        networks={"52:54:00:aa:00:01": "lab-b-management"},
        console_log="/s/lab-b/console/controller.log",
    )


def test_a_saved_node_becomes_another_labs_node_with_its_devices_kept() -> None:
    root = ET.fromstring(restamp_domain_xml(SAVED, _restamp()))
    assert root.findtext("name") == "lab-b-controller"
    assert root.findtext("uuid") == "7c0bd3a8-2f6e-4bd4-a1b0-6e0fd1b3a222"
    meta = root.find("metadata/{urn:labbuilder:lab:1}lab")
    assert meta is not None and meta.attrib == {
        "name": "lab-b",
        "node": "controller",
        "plan": "def",
    }
    disks = root.findall("devices/disk")
    assert [d.find("source").attrib for d in disks] == [  # type: ignore[union-attr]
        {"pool": "pool", "volume": "lab-b__controller__vda.qcow2"},
        {"pool": "pool", "volume": "seed-b"},
    ]
    assert all(d.get("type") == "volume" and d.find("backingStore") is None for d in disks)
    assert disks[0].find("address").get("slot") == "0x04"  # type: ignore[union-attr]
    assert disks[1].find("readonly") is not None
    nic = root.find("devices/interface")
    assert nic is not None and nic.find("source").attrib == {"network": "lab-b-management"}  # type: ignore[union-attr]
    assert nic.find("target") is None and nic.find("mac").get("address") == "52:54:00:AA:00:01"  # type: ignore[union-attr]
    logs = [log.get("file") for log in root.iter("log")]
    assert logs == ["/s/lab-b/console/controller.log"] * 2
    assert "lab-a" not in ET.tostring(root, encoding="unicode")


def test_a_saved_node_with_devices_the_lab_lacks_is_refused() -> None:
    with pytest.raises(RestampError, match="disk vdb"):
        restamp_domain_xml(SAVED, replace(_restamp(), disks={"vda": ("pool", "v")}))
    with pytest.raises(RestampError, match="lacks disks vdc"):
        restamp_domain_xml(
            SAVED, replace(_restamp(), disks={**_restamp().disks, "vdc": ("pool", "x")})
        )
    with pytest.raises(RestampError, match="NIC 52:54:00:aa:00:01"):
        restamp_domain_xml(SAVED, replace(_restamp(), networks={}))


# --- which labs a template fits ---------------------------------------------------------------


def _plan(text: str, tmp_path: Path, name: str = "lab.toml"):  # type: ignore[no-untyped-def]
    path = tmp_path / name
    path.write_text(text)
    return plan(load_lab(path), HostFacts())


def test_a_lab_of_the_templates_plan_fits_it_under_another_name(tmp_path: Path) -> None:
    template = _plan('name = "student1"\n', tmp_path, "a.toml")
    other = _plan('name = "student2"\n[options]\nisolated = false\n', tmp_path, "b.toml")
    assert template_differences(other, template) == []
    stamped = with_template_macs(other, template)
    assert [n.mac for node in stamped.nodes for n in node.nics] == [
        n.mac for node in template.nodes for n in node.nics
    ]
    assert [n.mac for node in other.nodes for n in node.nics] != [
        n.mac for node in template.nodes for n in node.nics
    ]
    assert stamped.lab == "student2" and stamped.nodes[0].domain == "student2-controller"


def test_a_lab_unlike_its_template_is_refused_with_each_difference_named(tmp_path: Path) -> None:
    template = _plan('name = "student1"\n', tmp_path, "a.toml")
    bigger = _plan(
        'name = "s2"\n[nodes.controller]\nmemory = "8 GiB"\n'
        '[networks.management]\ncidr = "10.1.0.0/24"\ngateway = "10.1.0.1"\n',
        tmp_path,
        "b.toml",
    )
    found = template_differences(bigger, template)
    assert "node controller: memory 8 GB in the lab, 2 GB in the template" in found, found
    assert (
        "network management: subnet 10.1.0.0/24 in the lab, 10.0.0.0/24 in the template" in found
    ), found
    assert any(f.startswith("node controller: NICs eth0 management 10.1.0.11/24") for f in found)
    fewer = _plan('name = "s3"\n[nodes.compute]\ncount = 2\n', tmp_path, "c.toml")
    assert template_differences(fewer, template)[0] == (
        "nodes compute1, compute2, controller, network in the lab, compute1, controller, "
        "network in the template"
    )


# --- restoring a saved domain as others, through a FIFO (the real libvirtd) ---------------------


def _guest_xml(name: str) -> str:
    return f"""<domain type='qemu'><name>{name}</name><uuid>{uuid.uuid4()}</uuid>
<memory unit='MiB'>96</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='pc'>hvm</type></os>
<devices><serial type='pty'/><console type='pty'/><memballoon model='none'/></devices></domain>"""


@pytest.fixture
def conn() -> Iterator[object]:
    connection = lv.connect("qemu:///system")
    try:
        yield connection
    finally:
        for domain in connection.listAllDomains(0):
            if domain.name().startswith(PREFIX):
                lv.remove_domain(domain)
        connection.close()


@pytest.mark.integration
def test_a_saved_guest_resumes_as_two_new_domains(conn, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    source = conn.createXML(_guest_xml(f"{PREFIX}source"), 0)
    time.sleep(1)
    path = tmp_path / "source.save"
    lv.save_domain(source, path)
    assert lv.find_domain(conn, f"{PREFIX}source") is None  # transient: gone once saved
    image = savefile.read_image(path)
    assert f"<name>{PREFIX}source</name>" in image.xml
    for copy in ("one", "two"):
        xml = image.xml.replace(f"{PREFIX}source", f"{PREFIX}{copy}")
        root = ET.fromstring(xml)
        root.find("uuid").text = str(uuid.uuid4())  # type: ignore[union-attr]
        started = time.monotonic()
        domain = lv.restore_domain(conn, image, ET.tostring(root, encoding="unicode"), paused=True)
        assert time.monotonic() - started < 30
        assert lv.domain_state(domain) == "paused"
        assert domain.isPersistent()
        domain.resume()
        assert lv.domain_state(domain) == "running"
    assert path.stat().st_size == image.stream_offset + image.stream_size  # read, not changed
    assert not list(Path("/tmp").glob("labbuilder-restore-*"))  # the FIFOs are gone


@pytest.mark.integration
def test_a_restore_libvirt_refuses_leaves_no_domain_and_no_waiting_copy(
    conn, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    source = conn.createXML(_guest_xml(f"{PREFIX}refused"), 0)
    path = tmp_path / "refused.save"
    lv.save_domain(source, path)
    image = savefile.read_image(path)
    broken = image.xml.replace("<memory", "<nonsense/><memory").replace(
        "machine='pc", "machine='nonesuch"
    )
    broken = broken.replace(f"{PREFIX}refused", f"{PREFIX}broken")
    with pytest.raises(HypervisorError, match="cannot restore domain"):
        lv.restore_domain(conn, image, broken, paused=False)
    assert lv.find_domain(conn, f"{PREFIX}broken") is None
    assert not [t for t in __import__("threading").enumerate() if t.name == "restore-feed"]


def test_a_lab_file_after_an_option_is_the_lab_file() -> None:
    from labbuilder.cli.main import build_parser

    args = build_parser().parse_args(["template", "save", "t1", "--stage", "image", "lab.toml"])
    assert (args.name, args.stage, args.lab_file) == ("t1", "image", "lab.toml")
    with pytest.raises(SystemExit) as refused:
        build_parser().parse_args(["template", "save", "t1", "lab.toml", "--stage", "x", "more"])
    assert refused.value.code == 2


def test_a_template_is_listed_shown_and_a_broken_one_named(tmp_path: Path) -> None:
    import json
    import os
    import subprocess
    import sys

    from labbuilder.lab.view import plan_as_dict

    lab_file = tmp_path / "lab.toml"
    lab_file.write_text('name = "student1"\n')
    planned = _plan('name = "student1"\n', tmp_path)
    folder = tmp_path / "state" / "templates" / "os101-image"
    folder.mkdir(parents=True)
    description = {
        "labbuilder_template": 1, "name": "os101-image", "lab": "student1", "stage": "image",
        "recipe": "zed-debian-12", "recipe_digest": "d" * 64, "created": 1.0e9,
        "pool": "labbuilder", "record": {"plan": plan_as_dict(planned), "images": {}},
        "nodes": [
            {"name": node.name, "domain": node.domain, "memory_bytes": 2**30,
             "disks": [{"device": "vda", "volume": f"template-os101-image--{node.name}--vda.qcow2",
                        "bytes": 2**20}]}
            for node in planned.nodes
        ],
    }  # fmt: skip
    (folder / "template.json").write_text(json.dumps(description))
    (tmp_path / "state" / "templates" / "broken").mkdir()
    (tmp_path / "state" / "templates" / "broken" / "template.json").write_text("{")
    env = {**os.environ, "LABBUILDER_STATE_DIR": str(tmp_path / "state")}

    def labbuilder(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "labbuilder", *args],
            env=env, capture_output=True, text=True, check=False,
        )  # fmt: skip

    listed = labbuilder("template", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [t["name"] for t in json.loads(listed.stdout)] == ["os101-image"]
    shown = labbuilder("template", "show", "os101-image", "--json")
    data = json.loads(shown.stdout)
    assert data["stage"] == "image" and data["memory_bytes"] == 3 * 2**30
    assert data["disk_bytes"] == 3 * 2**20 and data["users"] == []
    assert data["plan"]["nodes"][0]["nics"][0]["address"] == "10.0.0.11"
    text = labbuilder("template", "show", "os101-image")
    assert "controller (controller)" in text.stdout and "10.0.0.11" in text.stdout
    broken = labbuilder("template", "show", "broken")
    assert broken.returncode == 2 and "is not a template description" in broken.stderr
    missing = labbuilder("template", "show", "nosuch")
    assert missing.returncode == 2 and "templates: os101-image" in missing.stderr
    bad = labbuilder("template", "show", "../etc")
    assert bad.returncode == 2 and "is not a valid template name" in bad.stderr
