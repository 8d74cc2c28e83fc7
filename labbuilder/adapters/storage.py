"""Disks as libvirt storage volumes in labbuilder's own pool, through libvirt's volume API only.

Base images, kernels and seeds are uploaded by stream and overlays are created by libvirt, so
the same code drives a remote host (``qemu+ssh://host/system``). Pools carry no metadata:
labbuilder's pool is the directory pool at labbuilder's own path (``paths.pool_dir``), and a
pool of its name elsewhere is someone else's, never written to. In labbuilder's pool, volume
names say who owns them: ``base-*`` are shared by every lab on the host and never modified; a
lab's volumes are ``<lab>__<node>__<disk>`` (a lab name has no ``_``, so the prefix is
unambiguous).
"""

from __future__ import annotations

import contextlib
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import libvirt

from labbuilder.adapters.hypervisor import volume_lab as volume_lab
from labbuilder.adapters.libvirterrors import error as _error
from labbuilder.adapters.libvirterrors import translated
from labbuilder.common.errors import HypervisorError, PlanError

CHUNK = 4 * 1024 * 1024


def lab_volume_name(lab: str, node: str, disk: str) -> str:
    return f"{lab}__{node}__{disk}"


@translated
def lookup_pool(conn: Any, name: str) -> Any | None:
    """The pool ``name`` as it is (not started), or None if the host has none of that name."""
    try:
        return conn.storagePoolLookupByName(name)
    except libvirt.libvirtError as err:
        if err.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_POOL:
            return None
        raise _error(f"cannot look up storage pool {name}", err) from None


@translated
def find_pool(conn: Any, name: str) -> Any | None:
    """The pool ``name`` (started), or None if the host has none of that name."""
    try:
        pool = conn.storagePoolLookupByName(name)
    except libvirt.libvirtError as err:
        if err.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_POOL:
            return None
        raise _error(f"cannot look up storage pool {name}", err) from None
    if not pool.isActive():
        try:
            pool.build(0)
            pool.create(0)
        except libvirt.libvirtError as err:
            raise _error(f"cannot start storage pool {name}", err) from None
    return pool


@translated
def pool_location(pool: Any) -> tuple[str | None, str | None]:
    """The pool's type and target path, from its XML."""
    root = ET.fromstring(pool.XMLDesc(0))
    return root.get("type"), root.findtext("target/path")


@translated
def is_labbuilder_pool(pool: Any, path: str) -> bool:
    """Whether ``pool`` is labbuilder's: a directory pool whose target is ``path``.

    Pools carry no metadata, so a pool is known by where it keeps its volumes: labbuilder's
    own directory (``paths.pool_dir``). In that pool, volumes are known by their names (see
    the module's docstring). A pool of labbuilder's name elsewhere belongs to someone else."""
    kind, target = pool_location(pool)
    return (
        kind == "dir" and target is not None and os.path.normpath(target) == os.path.normpath(path)
    )


@translated
def refuse_foreign_pool(pool: Any, path: str) -> None:
    if not is_labbuilder_pool(pool, path):
        kind, target = pool_location(pool)
        raise PlanError(
            f"storage pool {pool.name()} exists and is not labbuilder's: it is a {kind} pool "
            f"at {target}, labbuilder's is a dir pool at {path}",
            "labbuilder never writes into a pool it did not make: set LABBUILDER_POOL to "
            "another pool name (or LABBUILDER_POOL_DIR to that pool's directory if labbuilder "
            "made it there)",
        )


@translated
def find_owned_pool(conn: Any, name: str, path: str) -> Any | None:
    """labbuilder's pool ``name`` at ``path`` (started), or None when the host has no pool of
    that name or the pool of that name is someone else's (then it is left alone)."""
    pool = lookup_pool(conn, name)
    if pool is None or not is_labbuilder_pool(pool, path):
        return None
    return find_pool(conn, name)


@translated
def ensure_pool(conn: Any, name: str, path: str) -> Any:
    """labbuilder's directory pool ``name`` at ``path``, defined, built and started if needed.
    A pool of that name that is not labbuilder's (see ``is_labbuilder_pool``) is refused with
    ``PlanError``."""
    defined_here = False
    try:
        pool = conn.storagePoolLookupByName(name)
        refuse_foreign_pool(pool, path)
    except libvirt.libvirtError as err:
        if err.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_POOL:
            raise _error("cannot look up the labbuilder storage pool", err) from None
        root = ET.Element("pool", type="dir")
        ET.SubElement(root, "name").text = name
        ET.SubElement(ET.SubElement(root, "target"), "path").text = path
        try:
            pool = conn.storagePoolDefineXML(ET.tostring(root, encoding="unicode"), 0)
        except libvirt.libvirtError as err:
            raise _error(f"cannot create the labbuilder storage pool at {path}", err) from None
        defined_here = True
    if not pool.isActive():
        try:
            pool.build(0)  # (re)creates its directory if someone removed it
            pool.create(0)
        except libvirt.libvirtError as err:
            if defined_here:  # nothing half-made: a pool that never started is not kept
                with contextlib.suppress(libvirt.libvirtError):
                    pool.undefine()
            raise _error(f"cannot start storage pool {name}", err) from None
    with contextlib.suppress(libvirt.libvirtError):
        pool.setAutostart(1)
    return pool


@translated
def find_volume(pool: Any, name: str) -> Any | None:
    try:
        return pool.storageVolLookupByName(name)
    except libvirt.libvirtError as err:
        if err.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_VOL:
            return None
        raise _error(f"cannot look up volume {name}", err) from None


def _volume_xml(name: str, capacity: int, fmt: str, backing: tuple[str, str] | None = None) -> str:
    root = ET.Element("volume")
    ET.SubElement(root, "name").text = name
    ET.SubElement(root, "capacity", unit="bytes").text = str(capacity)
    ET.SubElement(root, "allocation", unit="bytes").text = "0"
    target = ET.SubElement(root, "target")
    ET.SubElement(target, "format", type=fmt)
    if fmt == "qcow2":
        # qcow2 v3: libvirt would make v2 (0.10), on which QEMU ignores a guest's discards
        # (TRIM) when the image has a backing file, so freed blocks would stay allocated.
        ET.SubElement(target, "compat").text = "1.1"
    if backing is not None:
        store = ET.SubElement(root, "backingStore")
        ET.SubElement(store, "path").text = backing[0]
        ET.SubElement(store, "format", type=backing[1])
    return ET.tostring(root, encoding="unicode")


@translated
def upload(
    conn: Any,
    pool: Any,
    name: str,
    source: BinaryIO,
    size: int,
    *,
    progress: Callable[[int], None] | None = None,
) -> Any:
    """Create volume ``name`` holding exactly the ``size`` bytes read from ``source``.

    The volume appears under its name only when the upload completed: a failed upload
    deletes it, so a half-written base never serves an overlay.
    """
    try:
        volume = pool.createXML(_volume_xml(name, size, "raw"), 0)
    except libvirt.libvirtError as err:
        raise _error(f"cannot create volume {name}", err) from None
    sent = 0

    def read(_stream: Any, nbytes: int, _opaque: object) -> bytes:
        nonlocal sent
        data = source.read(min(nbytes, CHUNK))
        sent += len(data)
        if progress is not None:
            progress(sent)
        return data

    stream = conn.newStream(0)
    try:
        volume.upload(stream, 0, size, 0)
        stream.sendAll(read, None)
        stream.finish()
    except (libvirt.libvirtError, OSError) as err:
        with contextlib.suppress(libvirt.libvirtError):
            stream.abort()
        volume.delete(0)
        if isinstance(err, libvirt.libvirtError):
            raise _error(f"cannot upload volume {name}", err) from None
        raise HypervisorError(f"cannot upload volume {name}: {err}") from None
    return volume


@translated
def ensure_uploaded_file(
    conn: Any, pool: Any, name: str, path: Path, *, progress: Callable[[int], None] | None = None
) -> Any:
    """A shared volume with the content of a local file (kept if it already exists)."""
    existing = find_volume(pool, name)
    if existing is not None:
        return existing
    with path.open("rb") as source:
        return upload(conn, pool, name, source, path.stat().st_size, progress=progress)


@translated
def ensure_overlay(pool: Any, name: str, backing: Any, capacity: int) -> Any:
    """A thin qcow2 overlay of ``capacity`` bytes on the (read-only) volume ``backing``."""
    existing = find_volume(pool, name)
    if existing is not None:
        return existing
    xml = _volume_xml(name, capacity, "qcow2", (backing.path(), "qcow2"))
    try:
        return pool.createXML(xml, 0)
    except libvirt.libvirtError as err:
        raise _error(f"cannot create overlay {name}", err) from None


@translated
def backing_path(volume: Any) -> str | None:
    """The path of the file ``volume`` backs onto (from libvirt's volume XML), if any."""
    try:
        root = ET.fromstring(volume.XMLDesc(0))
    except libvirt.libvirtError as err:
        raise _error(f"cannot read volume {volume.name()}", err) from None
    path = root.findtext("backingStore/path")
    return path or None


@translated
def refresh(pool: Any) -> None:
    try:
        pool.refresh(0)
    except libvirt.libvirtError as err:
        raise _error(f"cannot refresh pool {pool.name()}", err) from None


@translated
def ensure_empty_disk(pool: Any, name: str, capacity: int) -> Any:
    """An empty qcow2 disk (qcow2 so that live internal snapshots cover it)."""
    existing = find_volume(pool, name)
    if existing is not None:
        return existing
    try:
        return pool.createXML(_volume_xml(name, capacity, "qcow2"), 0)
    except libvirt.libvirtError as err:
        raise _error(f"cannot create disk {name}", err) from None


@translated
def lab_volumes(pool: Any, lab: str | None = None) -> list[Any]:
    """Volumes of ``lab`` (or of every lab) in the pool."""
    with contextlib.suppress(libvirt.libvirtError):  # a read-only connection cannot refresh
        pool.refresh(0)
    return [
        volume
        for volume in pool.listAllVolumes(0)
        if (owner := volume_lab(volume.name())) is not None and (lab is None or owner == lab)
    ]


@translated
def remove_pool(pool: Any) -> None:
    """Delete a pool with all its volumes (for tests and hosts giving labbuilder up)."""
    for volume in pool.listAllVolumes(0):
        delete_volume(volume)
    if pool.isActive():
        pool.destroy()
    pool.delete(0)
    pool.undefine()


@translated
def delete_volume(volume: Any) -> None:
    try:
        volume.delete(0)
    except libvirt.libvirtError as err:
        if err.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_VOL:
            raise _error(f"cannot delete volume {volume.name()}", err) from None
