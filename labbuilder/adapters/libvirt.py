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


# --- ownership ------------------------------------------------------------------------------


def lab_metadata(xml: str) -> dict[str, str]:
    """All attributes of an object's labbuilder metadata (lab, node, role, plan, ...)."""
    root = ET.fromstring(xml)
    element = root.find(f"metadata/{{{METADATA_NS}}}lab")
    return dict(element.attrib) if element is not None else {}


def owned_domains(conn: Any, lab: str | None = None) -> list[Any]:
    """Domains carrying labbuilder metadata (of ``lab``, or of any lab)."""
    found = []
    for domain in conn.listAllDomains():
        owner = owner_lab(domain.XMLDesc(0))
        if owner is not None and (lab is None or owner == lab):
            found.append(domain)
    return found


def owned_networks(conn: Any, lab: str | None = None) -> list[Any]:
    found = []
    for network in conn.listAllNetworks():
        owner = owner_lab(network.XMLDesc(0))
        if owner is not None and (lab is None or owner == lab):
            found.append(network)
    return found


# --- networks -------------------------------------------------------------------------------


def ensure_network(conn: Any, name: str, xml: str) -> Any:
    """Define and start a persistent network; an existing one of the same name is kept."""
    try:
        network = conn.networkLookupByName(name)
    except libvirt.libvirtError as err:
        if err.get_error_code() != libvirt.VIR_ERR_NO_NETWORK:
            raise _error(f"cannot look up network {name}", err) from None
        try:
            network = conn.networkDefineXML(xml)
        except libvirt.libvirtError as err:
            raise _error(f"cannot define network {name}", err) from None
    if not network.isActive():
        try:
            network.create()
        except libvirt.libvirtError as err:
            raise _error(
                f"cannot start network {name}",
                err,
                "another network or interface may hold its bridge or subnet; "
                "`labbuilder doctor` lists the host's networks",
            ) from None
    return network


def remove_network(network: Any) -> None:
    try:
        if network.isActive():
            network.destroy()
        network.undefine()
    except libvirt.libvirtError as err:
        if err.get_error_code() != libvirt.VIR_ERR_NO_NETWORK:
            raise _error("cannot remove network", err) from None


# --- domains --------------------------------------------------------------------------------


def find_domain(conn: Any, name: str) -> Any | None:
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError as err:
        if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise _error(f"cannot look up domain {name}", err) from None


def ensure_domain(conn: Any, name: str, xml: str) -> Any:
    """Define the domain unless it exists, and start it unless it runs."""
    domain = find_domain(conn, name)
    if domain is None:
        try:
            domain = conn.defineXML(xml)
        except libvirt.libvirtError as err:
            raise _error(f"cannot define domain {name}", err) from None
    if not domain.isActive():
        try:
            domain.create()
        except libvirt.libvirtError as err:
            raise _error(f"cannot start domain {name}", err) from None
    return domain


def remove_domain(domain: Any) -> None:
    flags = (
        libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
        | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
        | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
    )
    try:
        if domain.isActive():
            domain.destroy()
        domain.undefineFlags(flags)
    except libvirt.libvirtError as err:
        if err.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            raise _error("cannot remove domain", err) from None


def domain_state(domain: Any) -> str:
    state = domain.state()[0]
    return {
        libvirt.VIR_DOMAIN_RUNNING: "running",
        libvirt.VIR_DOMAIN_BLOCKED: "running",
        libvirt.VIR_DOMAIN_PAUSED: "paused",
        libvirt.VIR_DOMAIN_SHUTDOWN: "shutting down",
        libvirt.VIR_DOMAIN_SHUTOFF: "shut off",
        libvirt.VIR_DOMAIN_CRASHED: "crashed",
        libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended",
    }.get(state, "unknown")


def _error(what: str, err: Any, hint: str | None = None) -> HypervisorError:
    return HypervisorError(f"{what}: {err.get_error_message()}", hint)
