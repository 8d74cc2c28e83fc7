"""Sizes as people write them in lab files ("2 GB", "512 MiB") and as labbuilder prints them.

Units are binary, as libvirt and QEMU read them: "2 GB" is 2 GiB and "512 MB" is 512 MiB.
"""

from __future__ import annotations

import re

_UNITS = {
    "k": 1024,
    "m": 1024**2,
    "g": 1024**3,
    "t": 1024**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt])(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Return the bytes that ``text`` names; raise ValueError with the accepted forms."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError('expected a number and a unit, such as "512 MB", "2 GB" or "10 GiB"')
    number, unit = match.groups()
    value = float(number) * _UNITS[unit.lower()]
    if value != int(value):
        raise ValueError("is not a whole number of bytes")
    return int(value)


def format_size(size: int) -> str:
    """Render bytes the way the guide writes sizes: "2 GB", "512 MB", "1.5 GB"."""
    for unit, name in ((1024**4, "TB"), (1024**3, "GB"), (1024**2, "MB"), (1024, "KB")):
        if size >= unit:
            value = size / unit
            text = f"{value:.1f}".rstrip("0").rstrip(".")
            return f"{text} {name}"
    return f"{size} B"
