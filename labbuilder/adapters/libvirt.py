"""libvirt through libvirt-python: connections, and what labbuilder owns on a host.

``LibvirtHypervisor`` implements ``adapters.hypervisor.Hypervisor`` on a connection: callers get
records (``Domain``, ``Network``, ``Volume``, ``Snapshot``), never libvirt's objects. The module's
functions on libvirt objects serve the adapters and the callers not yet moved onto it.

No ``libvirtError`` leaves this package: each is translated into ``HypervisorError`` carrying
libvirt's error code (``ErrorCode``) and message. Everything labbuilder creates carries
``<lb:lab>`` metadata in the ``METADATA_NS`` namespace, so which lab owns a network or domain is
read from libvirt itself, even after a crash.
"""

from __future__ import annotations

import contextlib
import os
import select
import struct
import termios
import threading
import tty
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import libvirt
import netaddr

from labbuilder.adapters import libvirterrors, savefile, storage
from labbuilder.adapters.hypervisor import METADATA_NS as METADATA_NS
from labbuilder.adapters.hypervisor import METADATA_PREFIX as METADATA_PREFIX
from labbuilder.adapters.hypervisor import Domain, Hypervisor, Network, Snapshot, Volume
from labbuilder.adapters.hypervisor import lab_metadata as lab_metadata
from labbuilder.adapters.hypervisor import owner_lab as owner_lab
from labbuilder.adapters.libvirterrors import ErrorCode as ErrorCode
from labbuilder.adapters.libvirterrors import hypervisor_error as hypervisor_error
from labbuilder.adapters.libvirterrors import translated
from labbuilder.common.errors import HypervisorError, PlanError
from labbuilder.model.lab import LabUse, LibvirtNetworkFact


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
            code=err.get_error_code(),
            detail=str(err.get_error_message()),
        ) from None


_GONE = (libvirt.VIR_ERR_NO_NETWORK, libvirt.VIR_ERR_NO_DOMAIN)


def _existing(objects: list[Any]) -> list[tuple[Any, str]]:
    """(object, XML) of the networks or domains that still exist: one removed meanwhile (by
    another program) is left out rather than failing the whole listing."""
    found = []
    for item in objects:
        try:
            found.append((item, item.XMLDesc(0)))
        except libvirt.libvirtError as err:
            if err.get_error_code() not in _GONE:
                raise _error("cannot read an object's XML", err) from None
    return found


@translated
def network_facts(conn: Any) -> tuple[LibvirtNetworkFact, ...]:
    facts = []
    for network, xml in _existing(conn.listAllNetworks()):
        root = ET.fromstring(xml)
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
                lab=owner_lab(xml),
            )
        )
    return tuple(facts)


@translated
def used_macs(conn: Any) -> tuple[tuple[str, str], ...]:
    """(owner, MAC) of every domain's NICs; the owner is the lab, or the domain's name."""
    macs = []
    for domain, xml in _existing(conn.listAllDomains()):
        owner = owner_lab(xml) or domain.name()
        for mac in ET.fromstring(xml).findall("devices/interface/mac"):
            macs.append((owner, mac.get("address", "").lower()))
    return tuple(macs)


# --- ownership ------------------------------------------------------------------------------


def _owned(objects: list[Any], lab: str | None) -> list[tuple[Any, str]]:
    found = []
    for item, xml in _existing(objects):
        owner = owner_lab(xml)
        if owner is not None and (lab is None or owner == lab):
            found.append((item, xml))
    return found


@translated
def owned_domain_xmls(conn: Any, lab: str | None = None) -> list[tuple[Any, str]]:
    """(domain, XML) of the domains carrying labbuilder metadata (of ``lab``, or any lab)."""
    return _owned(conn.listAllDomains(), lab)


@translated
def owned_network_xmls(conn: Any, lab: str | None = None) -> list[tuple[Any, str]]:
    """(network, XML) of the networks carrying labbuilder metadata (of ``lab``, or any lab)."""
    return _owned(conn.listAllNetworks(), lab)


@translated
def owned_domains(conn: Any, lab: str | None = None) -> list[Any]:
    """Domains carrying labbuilder metadata (of ``lab``, or of any lab)."""
    return [domain for domain, _ in owned_domain_xmls(conn, lab)]


@translated
def domain_memory(domain: Any) -> int:
    """Bytes of memory the domain holds now."""
    return int(domain.info()[2]) * 1024


@translated
def running_memory(conn: Any, lab: str) -> int:
    """Bytes of memory that the running domains of ``lab`` hold now."""
    return sum(domain_memory(d) for d in owned_domains(conn, lab) if d.isActive())


@translated
def lab_uses(conn: Any, pool: str, path: str) -> tuple[LabUse, ...]:
    """What every lab on the host takes: its running domains' vCPUs and full memory
    (``info()``: maximum memory in KiB, vCPUs), and what its volumes in labbuilder's pool may
    still grow by (capacity less allocation, from ``info()``)."""
    uses: dict[str, list[int]] = {}
    for domain, xml in _existing(conn.listAllDomains()):
        lab = owner_lab(xml)
        if lab is None:
            continue
        use = uses.setdefault(lab, [0, 0, 0])
        with contextlib.suppress(libvirt.libvirtError):  # gone meanwhile
            if domain.isActive():
                info = domain.info()
                use[0] += int(info[3])
                use[1] += int(info[1]) * 1024
    found = storage.find_owned_pool(conn, pool, path)
    for volume in storage.lab_volumes(found) if found is not None else []:
        lab = storage.volume_lab(volume.name())
        if lab is None:
            continue
        with contextlib.suppress(libvirt.libvirtError):
            _, capacity, allocation = volume.info()
            uses.setdefault(lab, [0, 0, 0])[2] += max(0, int(capacity) - int(allocation))
    return tuple(LabUse(lab, *use) for lab, use in sorted(uses.items()))


@translated
def owned_networks(conn: Any, lab: str | None = None) -> list[Any]:
    """Networks carrying labbuilder metadata (of ``lab``, or of any lab)."""
    return [network for network, _ in owned_network_xmls(conn, lab)]


def with_metadata(xml: str, **attributes: str) -> str:
    """``xml`` (a network or domain) with more attributes on its labbuilder metadata."""
    ET.register_namespace(METADATA_PREFIX, METADATA_NS)
    root = ET.fromstring(xml)
    element = root.find(f"metadata/{{{METADATA_NS}}}lab")
    if element is None:
        raise ValueError(f"{root.tag} XML without labbuilder metadata")
    for key, value in attributes.items():
        element.set(key, value)
    return ET.tostring(root, encoding="unicode")


def describe_owner(xml: str) -> str:
    """Who owns an object, for messages: ``lab X`` or ``not labbuilder``."""
    lab = owner_lab(xml)
    return (
        f"labbuilder's lab {lab}" if lab is not None else "not labbuilder (no labbuilder metadata)"
    )


def refuse_foreign(kind: str, name: str, xml: str, lab: str) -> None:
    """Raise ``PlanError`` unless the object's metadata says that ``lab`` owns it."""
    if owner_lab(xml) != lab:
        raise PlanError(
            f"{kind} {name} exists and is not labbuilder's lab {lab}: its owner is "
            f"{describe_owner(xml)}",
            f"labbuilder never touches what it did not make: remove or rename that {kind}, or "
            "rename the lab (its object names derive from the lab's name)",
        )


def _planned_owner(xml: str, lab: str | None) -> str:
    owner = lab or (owner_lab(xml) if xml else None)
    if owner is None:
        raise ValueError("an object labbuilder makes must name its lab")
    return owner


# --- networks -------------------------------------------------------------------------------


@translated
def find_network(conn: Any, name: str) -> Any | None:
    try:
        return conn.networkLookupByName(name)
    except libvirt.libvirtError as err:
        if err.get_error_code() == libvirt.VIR_ERR_NO_NETWORK:
            return None
        raise _error(f"cannot look up network {name}", err) from None


@translated
def ensure_network(conn: Any, name: str, xml: str, *, lab: str | None = None) -> Any:
    """Define and start a persistent network of ``lab`` (by default, the lab that ``xml``'s
    metadata names); an existing one of the same name is kept if the lab owns it, and refused
    with ``PlanError`` otherwise."""
    owner = _planned_owner(xml, lab)
    try:
        network = conn.networkLookupByName(name)
        refuse_foreign("network", name, network.XMLDesc(0), owner)
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


@translated
def remove_network(network: Any) -> None:
    try:
        if network.isActive():
            network.destroy()
        network.undefine()
    except libvirt.libvirtError as err:
        if err.get_error_code() != libvirt.VIR_ERR_NO_NETWORK:
            raise _error("cannot remove network", err) from None


# --- domains --------------------------------------------------------------------------------


@translated
def find_domain(conn: Any, name: str) -> Any | None:
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError as err:
        if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise _error(f"cannot look up domain {name}", err) from None


@translated
def ensure_domain(conn: Any, name: str, xml: str, *, lab: str | None = None) -> Any:
    """Define the domain of ``lab`` (by default, the lab that ``xml``'s metadata names) unless
    it exists, and start it unless it runs; an existing domain that the lab does not own is
    refused with ``PlanError``."""
    owner = _planned_owner(xml, lab)
    domain = find_domain(conn, name)
    if domain is not None:
        refuse_foreign("domain", name, domain.XMLDesc(0), owner)
    else:
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


_UNDEFINE_OPTIONAL = (
    libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
)


@translated
def remove_domain(domain: Any) -> None:
    """Stop and undefine a domain with everything libvirt keeps beside it: snapshot and
    checkpoint metadata (libvirt refuses to undefine a domain that has snapshots otherwise), a
    managed save image, NVRAM. Internal snapshots' data lives in the disks, removed with them."""
    flags = (
        libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
        | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
        | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
        | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
    )
    try:
        if domain.isActive():
            domain.destroy()
        try:
            domain.undefineFlags(flags)
        except libvirt.libvirtError as err:
            if err.get_error_code() != libvirt.VIR_ERR_INVALID_ARG:
                raise
            # A driver without checkpoints or NVRAM (libvirt's test driver) refuses their
            # flags: it has none of them to remove.
            domain.undefineFlags(flags & ~_UNDEFINE_OPTIONAL)
    except libvirt.libvirtError as err:
        if err.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            raise _error("cannot remove domain", err) from None


@translated
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


@translated
def reset_domain(domain: Any) -> None:
    """Reset a running domain's machine (the reset button): it boots again from its disks."""
    domain.reset(0)


@translated
def is_active(domain: Any) -> bool:
    try:
        return bool(domain.isActive())
    except libvirt.libvirtError as err:
        raise _domain_error(domain, "cannot read its state", err) from None


@translated
def suspend_domain(domain: Any) -> None:
    try:
        domain.suspend()
    except libvirt.libvirtError as err:
        raise _domain_error(domain, "cannot pause", err) from None


@translated
def resume_domain(domain: Any) -> None:
    try:
        domain.resume()
    except libvirt.libvirtError as err:
        raise _domain_error(domain, "cannot resume", err) from None


@translated
def writable_qcow2_volumes(conn: Any, domain: Any) -> list[Any] | None:
    """The storage volumes of the domain's writable qcow2 disks (where internal snapshots
    live), or None when a writable disk is not a volume libvirt knows."""
    volumes = []
    try:
        root = ET.fromstring(domain.XMLDesc(0))
        for disk in root.findall("devices/disk"):
            if disk.get("device", "disk") != "disk" or disk.find("readonly") is not None:
                continue
            driver, source = disk.find("driver"), disk.find("source")
            if source is None or driver is None or driver.get("type") != "qcow2":
                continue
            if source.get("pool") and source.get("volume"):
                pool = conn.storagePoolLookupByName(source.get("pool"))
                volumes.append(pool.storageVolLookupByName(source.get("volume")))
            elif source.get("file"):
                volumes.append(conn.storageVolLookupByPath(source.get("file")))
            else:
                return None
    except libvirt.libvirtError:
        return None
    return volumes


@translated
def writable_disk_paths(conn: Any, domain: Any) -> list[str] | None:
    """Host paths of the domain's writable qcow2 disks (where its internal snapshots grow),
    or None when a writable disk is not a volume libvirt knows."""
    volumes = writable_qcow2_volumes(conn, domain)
    if volumes is None:
        return None
    try:
        return [str(volume.path()) for volume in volumes]
    except libvirt.libvirtError:
        return None


def _read_volume(conn: Any, volume: Any, offset: int, length: int) -> bytes:
    stream = conn.newStream(0)
    chunks: list[bytes] = []
    try:
        volume.download(stream, offset, length, 0)
        stream.recvAll(lambda _stream, data, sink: sink.append(data), chunks)
        stream.finish()
    except libvirt.libvirtError:
        with contextlib.suppress(libvirt.libvirtError):
            stream.abort()
        raise
    return b"".join(chunks)


def qcow2_snapshot_state_sizes(conn: Any, volume: Any) -> dict[str, int]:
    """Bytes of saved VM state (memory, devices) per internal snapshot name, read from the
    qcow2 image's snapshot table through libvirt (QEMU's docs/interop/qcow2.txt); empty for
    an image without snapshots. Raises libvirtError or ValueError when it cannot be read."""
    header = _read_volume(conn, volume, 0, 72)
    if len(header) < 72 or header[:4] != b"QFI\xfb":
        raise ValueError("not a qcow2 image")
    count, table = struct.unpack(">IQ", header[60:72])
    if count == 0:
        return {}
    length = count * 256 + 4096
    while True:
        data = _read_volume(conn, volume, table, length)
        try:
            return _parse_qcow2_snapshots(data, count)
        except struct.error:
            if len(data) < length or length > 64 * 2**20:
                raise ValueError("truncated qcow2 snapshot table") from None
            length *= 4  # entries with long names or extra data


def _parse_qcow2_snapshots(data: bytes, count: int) -> dict[str, int]:
    sizes = {}
    offset = 0
    for _ in range(count):
        id_size, name_size = struct.unpack_from(">HH", data, offset + 12)
        state_size, extra_size = struct.unpack_from(">II", data, offset + 32)
        if extra_size >= 8:  # version 3: a 64-bit state size
            (state_size,) = struct.unpack_from(">Q", data, offset + 40)
        name_at = offset + 40 + extra_size + id_size
        if name_at + name_size > len(data):
            raise struct.error("short")
        sizes[data[name_at : name_at + name_size].decode(errors="replace")] = state_size
        offset = name_at + name_size
        offset += -offset % 8  # entries are padded to 8 bytes
    return sizes


@translated
def snapshot_state_sizes(conn: Any, domain: Any) -> dict[str, int] | None:
    """Bytes of saved VM state per snapshot name, over the domain's writable qcow2 disks: the
    disk a snapshot with memory holds for itself. None when the disks cannot be read."""
    volumes = writable_qcow2_volumes(conn, domain)
    if volumes is None:
        return None
    total: dict[str, int] = {}
    try:
        for volume in volumes:
            for name, size in qcow2_snapshot_state_sizes(conn, volume).items():
                total[name] = total.get(name, 0) + size
    except (libvirt.libvirtError, ValueError):
        return None  # a size we cannot read is left out, not an error
    return total


# --- snapshots ------------------------------------------------------------------------------
# Internal snapshots (state in the domain's qcow2 disks); labbuilder names and describes them.

_SNAPSHOT_HINTS = {
    libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT: "`labbuilder snapshot list` shows the lab's snapshots",
    libvirt.VIR_ERR_NO_DOMAIN: "the node's domain is gone; `labbuilder status` shows the lab",
    libvirt.VIR_ERR_OPERATION_UNSUPPORTED: (
        "internal snapshots need every writable disk in qcow2 format, and a running node's "
        "snapshot must include its memory"
    ),
    libvirt.VIR_ERR_CONFIG_UNSUPPORTED: (
        "internal snapshots need every writable disk in qcow2 format (labbuilder's overlays and "
        "extra disks are; a disk added by hand may not be)"
    ),
    libvirt.VIR_ERR_OPERATION_INVALID: (
        "the node is in a state that does not allow this; `labbuilder status` shows it"
    ),
    libvirt.VIR_ERR_OPERATION_TIMEOUT: (
        "another operation on the node (a snapshot, a shutdown) holds it; try again when it ends"
    ),
    libvirt.VIR_ERR_SNAPSHOT_REVERT_RISKY: (
        "the node's definition changed since the snapshot; take the lab down and up again, "
        "or delete the snapshot"
    ),
    libvirt.VIR_ERR_OPERATION_FAILED: "QEMU failed it; the domain's log in /var/log/libvirt/qemu",
    libvirt.VIR_ERR_INTERNAL_ERROR: (
        "QEMU failed it; check the pool's free disk space (a snapshot with memory needs about "
        "the node's memory size) and the domain's log in /var/log/libvirt/qemu"
    ),
    libvirt.VIR_ERR_SYSTEM_ERROR: "check the pool's free disk space and permissions",
}


def _domain_error(domain: Any, what: str, err: Any) -> HypervisorError:
    code, detail = err.get_error_code(), str(err.get_error_message())
    hint = _SNAPSHOT_HINTS.get(code)
    return HypervisorError(
        f"domain {domain.name()}: {what}: {detail}", hint, code=code, detail=detail
    )


@translated
def snapshot_xmls(domain: Any) -> list[str]:
    """The XML of every snapshot of the domain (name, description, state, memory, disks)."""
    try:
        return [snap.getXMLDesc(0) for snap in domain.listAllSnapshots(0)]
    except libvirt.libvirtError as err:
        raise _domain_error(domain, "cannot list its snapshots", err) from None


@translated
def snapshot_names(domain: Any) -> list[str]:
    try:
        return [str(name) for name in domain.snapshotListNames(0)]
    except libvirt.libvirtError as err:
        raise _domain_error(domain, "cannot list its snapshots", err) from None


@translated
def create_snapshot(domain: Any, xml: str) -> None:
    """Create the snapshot ``xml`` describes; atomically: on failure the domain is unchanged."""
    try:
        domain.snapshotCreateXML(xml, libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC)
    except libvirt.libvirtError as err:
        raise _domain_error(domain, "cannot take a snapshot", err) from None


@translated
def delete_snapshot(domain: Any, name: str) -> bool:
    """Delete the snapshot ``name`` (its children stay); False if the domain has none of it."""
    try:
        domain.snapshotLookupByName(name, 0).delete(0)
    except libvirt.libvirtError as err:
        if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT:
            return False
        raise _domain_error(domain, f"cannot delete snapshot {name}", err) from None
    return True


@translated
def revert_snapshot(domain: Any, name: str, *, running: bool = True) -> None:
    """Revert the domain to the snapshot, leaving it running (or paused, with running=False)."""
    flags = (
        libvirt.VIR_DOMAIN_SNAPSHOT_REVERT_RUNNING
        if running
        else libvirt.VIR_DOMAIN_SNAPSHOT_REVERT_PAUSED
    )
    try:
        domain.revertToSnapshot(domain.snapshotLookupByName(name, 0), flags)
    except libvirt.libvirtError as err:
        raise _domain_error(domain, f"cannot revert to snapshot {name}", err) from None


@translated
def save_domain(domain: Any, path: Path) -> None:
    """Save the running (or paused) domain's memory to ``path``; the domain stops."""
    try:
        domain.saveFlags(str(path), None, 0)
    except libvirt.libvirtError as err:
        raise _domain_error(domain, f"cannot save the memory to {path}", err) from None


@translated
def restore_domain(conn: Any, image: savefile.SaveImage, xml: str, *, paused: bool) -> Any:
    """A new domain from the memory state ``image`` with the domain XML ``xml`` (which may
    name the domain anew: see ``adapters.savefile``), paused or running; made persistent
    with the same XML. On failure no domain of that name is left."""
    name = ET.fromstring(xml).findtext("name", "")
    flags = libvirt.VIR_DOMAIN_SAVE_PAUSED if paused else libvirt.VIR_DOMAIN_SAVE_RUNNING
    try:
        with savefile.image_with_xml(image, xml) as path:
            conn.restoreFlags(str(path), None, flags)
    except libvirt.libvirtError as err:
        raise _error(f"cannot restore domain {name} from {image.path}", err) from None
    domain = conn.lookupByName(name)
    try:
        conn.defineXML(
            domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)
        )
    except libvirt.libvirtError as err:
        with contextlib.suppress(libvirt.libvirtError):
            domain.destroy()
        raise _error(f"cannot define domain {name}", err) from None
    return domain


ESCAPE = b"\x1d"  # Ctrl-], as virsh console


def console_stdio(uri: str, domain_name: str, stdin: int = 0, stdout: int = 1) -> None:
    """A domain's serial console on ``stdin``/``stdout`` until Ctrl-] or the console's end (a
    terminal on ``stdin`` is put in raw mode meanwhile, and restored)."""
    conn = connect(uri)
    try:
        domain = conn.lookupByName(domain_name)
        stream = conn.newStream(0)
        domain.openConsole(None, stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE)
    except libvirt.libvirtError as err:
        conn.close()
        raise _error(f"cannot open the console of {domain_name}", err) from None
    done = threading.Event()

    def out() -> None:
        with contextlib.suppress(libvirt.libvirtError, OSError):
            while not done.is_set():
                data = stream.recv(4096)
                if not isinstance(data, bytes) or not data:
                    break
                os.write(stdout, data)
        done.set()

    saved = termios.tcgetattr(stdin) if os.isatty(stdin) else None
    reader = threading.Thread(target=out, daemon=True)
    try:
        if saved is not None:
            tty.setraw(stdin)
        reader.start()
        while not done.is_set():
            readable, _, _ = select.select([stdin], [], [], 0.5)
            if not readable:
                continue
            data = os.read(stdin, 1024)
            if not data or ESCAPE in data:
                break
            stream.send(data)
    finally:
        done.set()
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
        with contextlib.suppress(libvirt.libvirtError):
            stream.abort()
        reader.join(2)
        conn.close()


def _error(what: str, err: Any, hint: str | None = None) -> HypervisorError:
    return libvirterrors.error(what, err, hint)


# --- the Hypervisor protocol ----------------------------------------------------------------


def _domain_record(domain: Any) -> Domain | None:
    """The domain as a record, or None when it is gone (removed meanwhile by another program)."""
    try:
        xml = domain.XMLDesc(0)
        return Domain(
            name=str(domain.name()),
            state=domain_state(domain),
            active=bool(domain.isActive()),
            xml=xml,
            memory=domain_memory(domain),
        )
    except libvirt.libvirtError as err:
        if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise _error("cannot read a domain", err) from None
    except HypervisorError as err:
        if err.code == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise


def _network_record(network: Any, xml: str | None = None) -> Network | None:
    """The network as a record (``xml`` if it was read already), or None when it is gone."""
    try:
        xml = network.XMLDesc(0) if xml is None else xml
        return Network(name=str(network.name()), active=bool(network.isActive()), xml=xml)
    except libvirt.libvirtError as err:
        if err.get_error_code() == libvirt.VIR_ERR_NO_NETWORK:
            return None
        raise _error("cannot read a network", err) from None


class LibvirtHypervisor:
    """``Hypervisor`` on a libvirt connection (closed with ``close``, or as a context manager).

    Domains and networks are looked up by name for each call, so a record is never stale in a
    way that matters: an object gone since it was read is reported as libvirt reports it."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    @classmethod
    def open(cls, uri: str, *, readonly: bool = False) -> LibvirtHypervisor:
        return cls(connect(uri, readonly=readonly))

    @property
    def connection(self) -> Any:
        """The libvirt connection, for the adapters' functions on libvirt objects."""
        return self._conn

    def close(self) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            self._conn.close()

    def __enter__(self) -> LibvirtHypervisor:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # --- reading

    def domains(self, lab: str | None = None) -> list[Domain]:
        records = (_domain_record(domain) for domain in owned_domains(self._conn, lab))
        return [record for record in records if record is not None]

    def domain(self, name: str) -> Domain | None:
        domain = find_domain(self._conn, name)
        return None if domain is None else _domain_record(domain)

    def networks(self, lab: str | None = None) -> list[Network]:
        records = (_network_record(net, xml) for net, xml in owned_network_xmls(self._conn, lab))
        return [record for record in records if record is not None]

    def network(self, name: str) -> Network | None:
        network = find_network(self._conn, name)
        return None if network is None else _network_record(network)

    def network_facts(self) -> tuple[LibvirtNetworkFact, ...]:
        return network_facts(self._conn)

    def used_macs(self) -> tuple[tuple[str, str], ...]:
        return used_macs(self._conn)

    def running_memory(self, lab: str) -> int:
        return running_memory(self._conn, lab)

    def lab_uses(self, pool: str, path: str) -> tuple[LabUse, ...]:
        return lab_uses(self._conn, pool, path)

    def domain_state(self, name: str) -> str:
        return domain_state(self._lookup(name))

    def is_active(self, name: str) -> bool:
        return is_active(self._lookup(name))

    # --- domains and networks

    def suspend_domain(self, name: str) -> None:
        suspend_domain(self._lookup(name))

    def resume_domain(self, name: str) -> None:
        resume_domain(self._lookup(name))

    def reset_domain(self, name: str) -> None:
        reset_domain(self._lookup(name))

    def remove_domain(self, name: str) -> None:
        domain = find_domain(self._conn, name)
        if domain is not None:
            remove_domain(domain)

    def remove_network(self, name: str) -> None:
        network = find_network(self._conn, name)
        if network is not None:
            remove_network(network)

    # --- making

    def ensure_network(self, name: str, xml: str, *, lab: str | None = None) -> Network:
        record = _network_record(ensure_network(self._conn, name, xml, lab=lab))
        if record is None:
            raise HypervisorError(f"network {name} vanished as it was started")
        return record

    def ensure_domain(self, name: str, xml: str, *, lab: str | None = None) -> Domain:
        record = _domain_record(ensure_domain(self._conn, name, xml, lab=lab))
        if record is None:
            raise HypervisorError(f"domain {name} vanished as it was started")
        return record

    def ensure_pool(self, name: str, path: str) -> str:
        storage.ensure_pool(self._conn, name, path)
        return name

    def ensure_uploaded_file(
        self, pool: str, name: str, path: Path, *, progress: Callable[[int], None] | None = None
    ) -> Volume:
        found = self._pool(pool)
        volume = storage.ensure_uploaded_file(self._conn, found, name, path, progress=progress)
        return self._volume(pool, volume)

    def upload(
        self,
        pool: str,
        name: str,
        source: BinaryIO,
        size: int,
        *,
        progress: Callable[[int], None] | None = None,
    ) -> Volume:
        found = self._pool(pool)
        volume = storage.upload(self._conn, found, name, source, size, progress=progress)
        return self._volume(pool, volume)

    def ensure_overlay(self, pool: str, name: str, backing: Volume, capacity: int) -> Volume:
        found = self._pool(pool)
        base = storage.find_volume(self._pool(backing.pool), backing.name)
        if base is None:
            raise HypervisorError(f"cannot create overlay {name}: volume {backing.name} is gone")
        return self._volume(pool, storage.ensure_overlay(found, name, base, capacity))

    def ensure_empty_disk(self, pool: str, name: str, capacity: int) -> Volume:
        return self._volume(pool, storage.ensure_empty_disk(self._pool(pool), name, capacity))

    def find_volume(self, pool: str, name: str) -> Volume | None:
        volume = storage.find_volume(self._pool(pool), name)
        return None if volume is None else self._volume(pool, volume)

    def volume_backing(self, volume: Volume) -> str | None:
        found = storage.find_volume(self._pool(volume.pool), volume.name)
        if found is None:
            raise HypervisorError(f"volume {volume.name} is gone")
        return storage.backing_path(found)

    def refresh_pool(self, pool: str) -> None:
        storage.refresh(self._pool(pool))

    def _pool(self, name: str) -> Any:
        pool = storage.find_pool(self._conn, name)
        if pool is None:
            raise HypervisorError(
                f"storage pool {name} is gone", code=libvirt.VIR_ERR_NO_STORAGE_POOL
            )
        return pool

    @translated
    def _volume(self, pool: str, volume: Any) -> Volume:
        return Volume(str(volume.name()), pool, str(volume.path()))

    # --- volumes

    @translated
    def lab_volumes(self, pool: str, path: str, lab: str | None = None) -> list[Volume]:
        found = storage.find_owned_pool(self._conn, pool, path)
        if found is None:
            return []
        return [
            Volume(str(volume.name()), pool, str(volume.path()))
            for volume in storage.lab_volumes(found, lab)
        ]

    def refuse_foreign_pool(self, pool: str, path: str) -> None:
        found = storage.lookup_pool(self._conn, pool)
        if found is not None:
            storage.refuse_foreign_pool(found, path)

    @translated
    def delete_volume(self, volume: Volume) -> None:
        pool = storage.lookup_pool(self._conn, volume.pool)
        found = None if pool is None else storage.find_volume(pool, volume.name)
        if found is not None:
            storage.delete_volume(found)

    # --- snapshots

    def snapshots(self, domain: str) -> list[Snapshot]:
        found = self._lookup(domain)
        return [Snapshot(domain, _snapshot_name(xml), xml) for xml in snapshot_xmls(found)]

    def create_snapshot(self, domain: str, xml: str) -> None:
        create_snapshot(self._lookup(domain), xml)

    def delete_snapshot(self, domain: str, name: str) -> bool:
        return delete_snapshot(self._lookup(domain), name)

    def revert_snapshot(self, domain: str, name: str, *, running: bool = True) -> None:
        revert_snapshot(self._lookup(domain), name, running=running)

    def snapshot_state_sizes(self, domain: str) -> dict[str, int] | None:
        return snapshot_state_sizes(self._conn, self._lookup(domain))

    def writable_disk_paths(self, domain: str) -> list[str] | None:
        return writable_disk_paths(self._conn, self._lookup(domain))

    def save_domain(self, name: str, path: Path) -> None:
        save_domain(self._lookup(name), path)

    def restore_domain(self, image: savefile.SaveImage, xml: str, *, paused: bool) -> Domain:
        record = _domain_record(restore_domain(self._conn, image, xml, paused=paused))
        if record is None:
            raise HypervisorError(f"the domain restored from {image.path} vanished")
        return record

    def _lookup(self, name: str) -> Any:
        try:
            return self._conn.lookupByName(name)
        except libvirt.libvirtError as err:
            raise _domain_lookup_error(name, err) from None


def _domain_lookup_error(name: str, err: Any) -> HypervisorError:
    code, detail = err.get_error_code(), str(err.get_error_message())
    return HypervisorError(
        f"domain {name}: {detail}", _SNAPSHOT_HINTS.get(code), code=code, detail=detail
    )


def _snapshot_name(xml: str) -> str:
    return ET.fromstring(xml).findtext("name", "")


def _implements_the_protocol(hypervisor: LibvirtHypervisor) -> Hypervisor:
    return hypervisor  # mypy checks that LibvirtHypervisor is a Hypervisor
