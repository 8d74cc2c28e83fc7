"""libvirt's QEMU save images: a node's memory state, restored as another domain.

A save image (``virDomainSave``) is a header, the domain's XML and a migration cookie, then
QEMU's migration stream. libvirt restores a saved domain only under the name and UUID it was
saved with (``virDomainRestoreFlags``' XML may change disks and networks, not those), so a
template's memory is restored as a new lab's node by handing libvirt a new image through a
FIFO: the header and the new domain's XML, then the template's migration stream, copied by
the kernel (``sendfile``) as libvirt reads it. Nothing per lab is written to disk.

The header (``virQEMUSaveHeader`` of libvirt's ``qemu_saveimage.h``): 16 bytes of magic, then
the version, the length of the XML and cookie data, whether the domain was running, the
stream's compression and the cookie's offset in the data (unsigned 32-bit, in the host's byte
order), and 14 unused words.

Owns reading and writing that format; imports only the standard library and common errors.
"""

from __future__ import annotations

import os
import struct
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory

from labbuilder.common.errors import HypervisorError

MAGIC = b"LibvirtQemudSave"
PARTIAL = b"LibvirtQemudPart"  # an image whose save did not finish
VERSION = 2
_BYTE_ORDER = "<" if sys.byteorder == "little" else ">"
HEADER = struct.Struct(f"{_BYTE_ORDER}16s5I56x")  # magic, 5 fields, 14 unused words
CHUNK = 1 << 24


@dataclass(frozen=True)
class SaveImage:
    """A save image's header as read: its XML, cookie and where the stream starts."""

    path: Path
    xml: str
    cookie: bytes  # the migration cookie, NUL-terminated, or b""
    was_running: bool
    compressed: int  # libvirt's code for the stream's compression (0: raw)
    stream_offset: int
    stream_size: int


def read_image(path: Path) -> SaveImage:
    """The header of the save image at ``path``; ``HypervisorError`` if it is not one."""
    with path.open("rb") as source:
        head = source.read(HEADER.size)
        if len(head) != HEADER.size:
            raise HypervisorError(f"{path} is not a libvirt save image (too short)")
        magic, version, data_len, was_running, compressed, cookie_offset = HEADER.unpack(head)
        if magic == PARTIAL:
            raise HypervisorError(f"{path} is an unfinished libvirt save image")
        if magic != MAGIC or version != VERSION:
            raise HypervisorError(
                f"{path} is not a libvirt save image of version {VERSION} "
                f"(magic {magic!r}, version {version})"
            )
        data = source.read(data_len)
        if len(data) != data_len:
            raise HypervisorError(f"{path} is a truncated libvirt save image")
    end = cookie_offset if cookie_offset else data_len
    xml = data[:end].split(b"\0", 1)[0].decode()
    cookie = data[cookie_offset:].split(b"\0", 1)[0] + b"\0" if cookie_offset else b""
    offset = HEADER.size + data_len
    return SaveImage(
        path=path,
        xml=xml,
        cookie=cookie,
        was_running=bool(was_running),
        compressed=compressed,
        stream_offset=offset,
        stream_size=path.stat().st_size - offset,
    )


def header_for(image: SaveImage, xml: str) -> bytes:
    """The header and data of a save image like ``image`` with the domain XML ``xml``."""
    text = xml.encode() + b"\0"
    data = text + image.cookie
    cookie_offset = len(text) if image.cookie else 0
    return (
        HEADER.pack(
            MAGIC, VERSION, len(data), int(image.was_running), image.compressed, cookie_offset
        )
        + data
    )


@contextmanager
def image_with_xml(image: SaveImage, xml: str) -> Iterator[Path]:
    """A path (a FIFO in a private temporary folder) from which libvirt reads ``image`` with
    the domain XML ``xml``. The copy runs in a thread while the caller restores from the
    path; an error in it is raised when the block ends. If libvirt never opened the path
    (the restore failed before), the thread is released and nothing is left."""
    header = header_for(image, xml)
    with TemporaryDirectory(prefix="labbuilder-restore-") as folder:
        fifo = Path(folder) / "image"
        os.mkfifo(fifo, 0o600)
        errors: list[BaseException] = []
        writer = threading.Thread(
            target=_feed, args=(fifo, header, image, errors), name="restore-feed", daemon=True
        )
        writer.start()
        try:
            yield fifo
        finally:
            _release(fifo, writer)
        if errors and not isinstance(errors[0], BrokenPipeError):
            raise HypervisorError(f"cannot copy the memory state {image.path}: {errors[0]}")


def _feed(fifo: Path, header: bytes, image: SaveImage, errors: list[BaseException]) -> None:
    try:
        out = os.open(fifo, os.O_WRONLY | os.O_CLOEXEC)
        try:
            view = memoryview(header)
            while view:
                view = view[os.write(out, view) :]
            with image.path.open("rb") as source:
                _copy(source.fileno(), out, image.stream_offset, image.stream_size)
        finally:
            os.close(out)
    except BaseException as err:  # noqa: BLE001 - handed to the restoring thread
        errors.append(err)


def _copy(source: int, out: int, offset: int, size: int) -> None:
    end = offset + size
    while offset < end:
        sent = os.sendfile(out, source, offset, min(CHUNK, end - offset))
        if sent == 0:
            raise OSError(f"the memory state ended {end - offset} bytes early")
        offset += sent


def _release(fifo: Path, writer: threading.Thread) -> None:
    """Let the feeding thread end: if nobody opened the FIFO for reading, open it (without
    blocking) and close it again, so that its open returns and its write fails."""
    writer.join(0.05)
    while writer.is_alive():
        try:
            reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            break
        os.close(reader)
        writer.join(0.2)
