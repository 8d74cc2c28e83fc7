"""Build a cloud-init NoCloud seed ISO in memory with pycdlib.

cloud-init's NoCloud datasource finds its seed on any block device whose filesystem label is
``cidata`` and reads ``user-data``, ``meta-data`` and (optionally) ``network-config`` from it;
Ubuntu 14.04's cloud-init 0.7.5 also understands ``network-interfaces`` (inside meta-data) and
some tools ship it as a file too. The ISO carries Rock Ridge and Joliet names so every reader
sees the exact file names; the plain ISO 9660 names are 8.3 stand-ins nobody reads.

Attach the result read-only; on the Debian cloud kernel attach it as a *virtio disk* (that
kernel has no AHCI, so a SATA cdrom stays invisible).
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping

import pycdlib

VOLUME_ID = "cidata"
REQUIRED_FILES = ("user-data", "meta-data")

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


def build_seed_iso(files: Mapping[str, bytes]) -> bytes:
    """Return the bytes of an ISO 9660 image (volume id ``cidata``) holding ``files``.

    ``files`` maps a file name in the ISO's root (``user-data``, ``meta-data``,
    ``network-config``, ``network-interfaces``, ...) to its content. ``user-data`` and
    ``meta-data`` are required by NoCloud (either may be empty). Raises ``ValueError`` for a
    missing required file or a name that is not a plain lower-case file name.
    """
    missing = [name for name in REQUIRED_FILES if name not in files]
    if missing:
        raise ValueError(f"a NoCloud seed needs {', '.join(missing)} (it may be empty)")
    for name in files:
        if not _NAME.match(name):
            raise ValueError(
                f"seed file name {name!r} is not a plain lower-case name such as 'user-data'"
            )

    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=1, vol_ident=VOLUME_ID, joliet=3, rock_ridge="1.09")
    try:
        for name, iso_name in zip(sorted(files), _iso9660_names(sorted(files)), strict=True):
            content = files[name]
            iso.add_fp(
                io.BytesIO(content),
                len(content),
                iso_path=f"/{iso_name};1",
                rr_name=name,
                joliet_path=f"/{name}",
                file_mode=0o100444,
            )
        out = io.BytesIO()
        iso.write_fp(out)
    finally:
        iso.close()
    return out.getvalue()


def _iso9660_names(names: list[str]) -> list[str]:
    """Return unique ISO 9660 level-1 names (8 characters, A-Z 0-9 _) for ``names``, in order."""
    result: list[str] = []
    for index, name in enumerate(names):
        base = re.sub(r"[^A-Z0-9_]", "_", name.upper())[:8]
        if base in result:
            base = f"{base[:5]}{index:03d}"
        result.append(base)
    return result
