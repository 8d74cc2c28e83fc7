"""A saved node's domain XML as another lab's node: the XML a template's memory state carries,
with the new lab's name, UUID, metadata, disks, networks and console log.

The devices, their order and their PCI addresses stay as saved: the memory state holds the
guest's view of them. Pure text; imports the standard library only.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass

from labbuilder.libvirtxml.render import METADATA_NS, METADATA_PREFIX


@dataclass(frozen=True)
class Restamp:
    """What changes in a node's XML: ``disks`` maps a target device ("vda") to its new
    (pool, volume), ``networks`` a NIC's MAC to its new libvirt network."""

    name: str
    uuid: str
    metadata: Mapping[str, str]  # the <lb:lab> attributes of the new node
    disks: Mapping[str, tuple[str, str]]
    networks: Mapping[str, str]
    console_log: str


class RestampError(ValueError):
    """The saved XML has a disk or NIC the new lab does not map."""


def restamp_domain_xml(xml: str, change: Restamp) -> str:
    ET.register_namespace(METADATA_PREFIX, METADATA_NS)
    root = ET.fromstring(xml)
    _set_text(root, "name", change.name)
    _set_text(root, "uuid", change.uuid)
    for child in list(root):
        if child.tag in ("title", "description"):
            root.remove(child)
    metadata = root.find("metadata")
    if metadata is None:
        metadata = ET.SubElement(root, "metadata")
    for old in metadata.findall(f"{{{METADATA_NS}}}lab"):
        metadata.remove(old)
    ET.SubElement(metadata, f"{{{METADATA_NS}}}lab", dict(change.metadata))
    devices = root.find("devices")
    if devices is None:
        raise RestampError("the saved domain has no devices")
    seen: set[str] = set()
    for disk in devices.findall("disk"):
        target = disk.find("target")
        device = target.get("dev", "") if target is not None else ""
        if device not in change.disks:
            raise RestampError(f"the saved domain has disk {device or '?'}, which the lab lacks")
        pool, volume = change.disks[device]
        seen.add(device)
        for old in disk.findall("source") + disk.findall("backingStore"):
            disk.remove(old)
        disk.set("type", "volume")
        source = ET.Element("source", {"pool": pool, "volume": volume})
        disk.insert(1 if disk.find("driver") is not None else 0, source)
    missing = sorted(set(change.disks) - seen)
    if missing:
        raise RestampError(f"the saved domain lacks disks {', '.join(missing)}")
    for nic in devices.findall("interface"):
        mac = nic.find("mac")
        address = (mac.get("address", "") if mac is not None else "").lower()
        if address not in change.networks:
            raise RestampError(f"the saved domain has a NIC {address or '?'} the lab lacks")
        nic.set("type", "network")
        for old in nic.findall("source") + nic.findall("target") + nic.findall("alias"):
            nic.remove(old)
        nic.insert(0, ET.Element("source", {"network": change.networks[address]}))
    for port in devices.findall("serial") + devices.findall("console"):
        for log in port.findall("log"):
            log.set("file", change.console_log)
    return ET.tostring(root, encoding="unicode")


def _set_text(root: ET.Element, tag: str, text: str) -> None:
    element = root.find(tag)
    if element is None:
        element = ET.SubElement(root, tag)
    element.text = text
