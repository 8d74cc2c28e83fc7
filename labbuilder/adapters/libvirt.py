"""libvirt through libvirt-python: connections, and what labbuilder owns on a host.

Everything labbuilder creates carries ``<lb:lab>`` metadata in the ``METADATA_NS`` namespace, so
which lab owns a network or domain is read from libvirt itself, even after a crash.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

import libvirt
import netaddr

from labbuilder.errors import HypervisorError
from labbuilder.model import LibvirtNetworkFact

METADATA_NS = "urn:labbuilder:lab:1"
METADATA_PREFIX = "lb"


def _ignore_libvirt_errors(_context: object, _error: object) -> None:
    """libvirt prints every error to stderr by default; we report them ourselves."""


libvirt.registerErrorHandler(_ignore_libvirt_errors, None)


def connect(uri: str, *, readonly: bool = False) -> Any:
    """Open a libvirt connection, or raise HypervisorError saying how to get one."""
    try:
        return libvirt.openReadOnly(uri) if readonly else libvirt.open(uri)
    except libvirt.libvirtError as err:
        raise HypervisorError(
            f"cannot connect to libvirt at {uri}: {err.get_error_message()}",
            "start libvirtd (`libvirtd -d`, or `systemctl start libvirtd`) and check that "
            "you may use it (root, or the libvirt group)",
        ) from None


def owner_lab(xml: str) -> str | None:
    """The lab named in an object's labbuilder metadata, if it has any."""
    root = ET.fromstring(xml)
    lab = root.find(f"metadata/{{{METADATA_NS}}}lab")
    return lab.get("name") if lab is not None else None


def network_facts(conn: Any) -> tuple[LibvirtNetworkFact, ...]:
    facts = []
    for network in conn.listAllNetworks():
        root = ET.fromstring(network.XMLDesc(0))
        bridge = root.find("bridge")
        cidrs = []
        for ip in root.findall("ip"):
            if ip.get("family", "ipv4") != "ipv4" or ip.get("address") is None:
                continue
            mask = ip.get("prefix") or ip.get("netmask", "24")
            cidrs.append(str(netaddr.IPNetwork(f"{ip.get('address')}/{mask}").cidr))
        facts.append(
            LibvirtNetworkFact(
                name=network.name(),
                bridge=bridge.get("name") if bridge is not None else None,
                cidrs=tuple(cidrs),
                lab=owner_lab(network.XMLDesc(0)),
            )
        )
    return tuple(facts)


def used_macs(conn: Any) -> tuple[tuple[str, str], ...]:
    """(owner, MAC) of every domain's NICs; the owner is the lab, or the domain's name."""
    macs = []
    for domain in conn.listAllDomains():
        xml = domain.XMLDesc(0)
        owner = owner_lab(xml) or domain.name()
        for mac in ET.fromstring(xml).findall("devices/interface/mac"):
            macs.append((owner, mac.get("address", "").lower()))
    return tuple(macs)
