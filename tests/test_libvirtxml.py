"""The XML libvirt reads, from one renderer (``labbuilder.libvirtxml``): lab nodes' domains and
networks, a bake's guest and network, the probe guests. Every value reaches the XML as one
escaped value, and each producer's XML reads back as the domain it describes. Pure: nothing is
defined in libvirt here (the integration tests boot these domains)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import jinja2
import pytest

from labbuilder.adapters import probeguest
from labbuilder.api import facade as api
from labbuilder.images.bakeseed import BakeNetwork, GuestBoot, domain_xml, network_xml
from labbuilder.lab.files import load_builtin_lab
from labbuilder.libvirtxml.render import (
    METADATA_NS,
    Disk,
    Domain,
    Serial,
    render_xml,
)
from labbuilder.libvirtxml.render import domain_xml as render_domain
from labbuilder.lifecycle.render import BootSpec, DiskAttachment, render_domain_xml
from labbuilder.model.lab import Plan

HOSTILE = "a<b>&\"c'd"
LAB = f"{{{METADATA_NS}}}lab"


def _plan() -> Plan:
    return api.plan_lab(load_builtin_lab("guide-3node"), host_check=False).plan


def test_every_value_is_one_escaped_value() -> None:
    domain = Domain(
        type="kvm",
        name=HOSTILE,
        memory=1,
        memory_unit="MiB",
        metadata=(("name", HOSTILE),),
        kernel=HOSTILE,
        cmdline=HOSTILE,
        disks=(Disk("vda", "raw", file=HOSTILE),),
        serials=(Serial(0, file=HOSTILE), Serial(1, log=HOSTILE)),
    )
    root = ET.fromstring(render_domain(domain))
    assert root.findtext("name") == HOSTILE and root.findtext("os/kernel") == HOSTILE
    assert root.findtext("os/cmdline") == HOSTILE and root.find("os/initrd") is None
    assert root.find(f"metadata/{LAB}").get("name") == HOSTILE  # type: ignore[union-attr]
    assert root.find("devices/disk/source").get("file") == HOSTILE  # type: ignore[union-attr]
    serials = root.findall("devices/serial")
    assert serials[0].find("source").get("path") == HOSTILE  # type: ignore[union-attr]
    assert serials[1].find("log").get("file") == HOSTILE  # type: ignore[union-attr]


def test_an_unknown_template_folder_is_refused() -> None:
    with pytest.raises(jinja2.TemplateNotFound):
        render_xml("recipes/x.xml.j2")


def test_a_lab_node_is_its_plans_machine() -> None:
    plan = _plan()
    node = plan.nodes[1]
    disks = (
        DiskAttachment("vda", "pool", "root.qcow2", "qcow2"),
        DiskAttachment("vdb", "pool", "seed.iso", "raw", readonly=True),
    )
    xml = render_domain_xml(
        plan,
        node,
        digest="d1",
        domain_type="kvm",
        cpu_passthrough=True,
        disks=disks,
        boot=BootSpec("/k", "/i", "root=LABEL=x"),
        console_log="/state/console.log",
    )
    root = ET.fromstring(xml)
    assert root.get("type") == "kvm" and root.findtext("name") == node.domain
    owner = root.find(f"metadata/{LAB}")
    assert owner is not None and owner.attrib == {
        "name": plan.lab,
        "node": node.name,
        "role": str(node.role),
        "plan": "d1",
    }
    assert root.findtext("memory") == str(node.memory) and root.find("memory").get("unit") == "b"  # type: ignore[union-attr]
    assert root.findtext("vcpu") == str(node.vcpus)
    assert [root.findtext(f"os/{e}") for e in ("kernel", "initrd", "cmdline")] == [
        "/k",
        "/i",
        "root=LABEL=x",
    ]
    assert root.find("cpu").get("mode") == "host-passthrough"  # type: ignore[union-attr]
    assert root.findtext("on_reboot") == "restart"
    drivers = [d.find("driver").attrib for d in root.findall("devices/disk")]  # type: ignore[union-attr]
    assert drivers == [
        {"name": "qemu", "type": "qcow2", "discard": "unmap"},
        {"name": "qemu", "type": "raw"},
    ]
    assert [d.find("readonly") is not None for d in root.findall("devices/disk")] == [False, True]
    macs = [i.find("mac").get("address") for i in root.findall("devices/interface")]  # type: ignore[union-attr]
    assert macs == [nic.mac for nic in node.nics]
    (serial,) = root.findall("devices/serial")
    assert serial.find("log").attrib == {"file": "/state/console.log", "append": "on"}  # type: ignore[union-attr]
    assert root.find("devices/console") is not None and root.find("devices/rng") is not None
    disk_boot = render_domain_xml(
        plan,
        node,
        digest="d1",
        domain_type="qemu",
        cpu_passthrough=False,
        disks=disks,
        boot=BootSpec(),
        console_log=None,
    )
    root = ET.fromstring(disk_boot)
    assert root.find("os/boot").get("dev") == "hd" and root.find("os/kernel") is None  # type: ignore[union-attr]
    assert root.find("cpu") is None and root.find("devices/serial/log") is None


def test_a_bake_guest_logs_its_console_and_its_report_port_afresh() -> None:
    xml = domain_xml(
        name="lbbake-x",
        role="controller",
        domain_type="qemu",
        boot=GuestBoot("/k", "/i", "root=LABEL=lbroot"),
        pool="pool",
        disk_volume="disk.qcow2",
        seed_volume="seed.iso",
        network="lbbake-0",
        mac="52:54:00:00:00:01",
        console_log=Path("/c.log"),
        report_log=Path("/r.log"),
    )
    root = ET.fromstring(xml)
    owner = root.find(f"metadata/{LAB}")
    assert owner is not None and owner.attrib == {
        "name": "lbbake-x",
        "node": "bake",
        "role": "controller",
    }
    assert root.findtext("memory") == "1024" and root.findtext("os/initrd") == "/i"
    sources = [d.find("source").attrib for d in root.findall("devices/disk")]  # type: ignore[union-attr]
    assert sources == [
        {"pool": "pool", "volume": "disk.qcow2"},
        {"pool": "pool", "volume": "seed.iso"},
    ]
    logs = [
        (s.find("target").get("port"), s.find("log").attrib)  # type: ignore[union-attr]
        for s in root.findall("devices/serial")
    ]
    assert logs == [
        ("0", {"file": "/c.log", "append": "off"}),
        ("1", {"file": "/r.log", "append": "off"}),
    ]
    assert root.find("devices/interface/source").get("network") == "lbbake-0"  # type: ignore[union-attr]


def test_a_bake_network_answers_the_archives_names_only() -> None:
    archive = (("deb.debian.org", "192.0.2.7"), ("security.debian.org", "192.0.2.7"))
    root = ET.fromstring(network_xml(BakeNetwork("lbbake-0", "lbbk0", "10.9.8.0/24", archive)))
    assert root.findtext("name") == "lbbake-0"
    assert root.find(f"metadata/{LAB}").attrib == {"name": "lbbake-0", "network": "bake"}  # type: ignore[union-attr]
    hosts = {h.get("ip"): [n.text for n in h.findall("hostname")] for h in root.findall("dns/host")}
    assert hosts == {"192.0.2.7": ["deb.debian.org", "security.debian.org"]}
    assert root.find("ip").attrib == {"address": "10.9.8.1", "netmask": "255.255.255.0"}  # type: ignore[union-attr]
    bare = ET.fromstring(network_xml(BakeNetwork("lbbake-1", "lbbk1", "10.9.9.0/24", ())))
    assert bare.find("dns") is None and bare.find("forward").get("mode") == "nat"  # type: ignore[union-attr]


def test_the_probe_guests_have_no_console_nor_rng_and_end_on_reboot(tmp_path: Path) -> None:
    for xml in (
        probeguest.probe_domain_xml("p", "kvm", tmp_path / "boot.raw", tmp_path / "s.log"),
        probeguest.kernel_domain_xml("p", "kvm", tmp_path / "vmlinuz", tmp_path / "s.log"),
    ):
        root = ET.fromstring(xml)
        assert root.find("metadata") is None and root.findtext("on_reboot") == "destroy"
        assert root.find("devices/console") is None and root.find("devices/rng") is None
    sector = ET.fromstring(
        probeguest.probe_domain_xml("p", "kvm", tmp_path / "boot.raw", tmp_path / "s.log")
    )
    assert sector.find("features") is None and sector.find("clock") is None
    disk = sector.find("devices/disk")
    assert disk is not None and disk.get("type") == "file"
    assert disk.find("target").attrib == {"dev": "hda", "bus": "ide"}  # type: ignore[union-attr]
    assert disk.find("driver").attrib == {"name": "qemu", "type": "raw"}  # type: ignore[union-attr]
