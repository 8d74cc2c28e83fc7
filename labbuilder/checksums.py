"""Checksum files as distributions publish them: SHA256SUMS, SHA512SUMS and BSD-style lists.

Pure text parsing; fetching the file is ``labbuilder.download.fetch_checksum``.
"""

from __future__ import annotations

import difflib
import re

from labbuilder.errors import ImageError
from labbuilder.imagemodel import ChecksumAlgorithm

HEX_DIGITS = {ChecksumAlgorithm.SHA256: 64, ChecksumAlgorithm.SHA512: 128}

_GNU_LINE = re.compile(r"^([0-9a-fA-F]+) [ *](.+)$")
_BSD_LINE = re.compile(r"^(SHA-?\d+) \((.+)\) = ([0-9a-fA-F]+)$")


def parse_checksum_file(
    text: str, filename: str, algorithm: ChecksumAlgorithm, *, source: str = "the checksum file"
) -> str:
    """The digest ``text`` lists for ``filename``.

    Understands the GNU coreutils formats ``<hex>  <name>`` and ``<hex> *<name>`` and the BSD
    format ``SHA256 (<name>) = <hex>``. Names may be listed with a leading ``./``.
    """
    digits = HEX_DIGITS[algorithm]
    listed: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parsed = _parse_checksum_line(line)
        if parsed is None:
            continue
        tag, name, digest = parsed
        listed.append(name)
        if name != filename:
            continue
        if len(digest) != digits or (tag and tag != algorithm.value):
            raise ImageError(
                f"{source} lists {filename} with a {len(digest)}-digit {tag or 'hex'} digest, "
                f"not a {algorithm} digest ({digits} digits)",
                hint="set the catalog entry's 'algorithm' to match the checksum file "
                "(SHA256SUMS: sha256, SHA512SUMS: sha512)",
            )
        return digest.lower()
    close = difflib.get_close_matches(filename, listed, n=1)
    suggestion = f"it lists {close[0]!r}; " if close else ""
    count = f"it lists {len(listed)} files" if listed else "no checksum lines were found in it"
    raise ImageError(
        f"{source} does not list {filename} ({count})",
        hint=f"{suggestion}check that the image URL and checksum_url point to the same folder",
    )


def _parse_checksum_line(line: str) -> tuple[str, str, str] | None:
    """(algorithm tag or "", file name, hex digest) for one line, or None if it is no entry."""
    bsd = _BSD_LINE.match(line)
    if bsd:
        tag = bsd.group(1).lower().replace("-", "")
        return tag, _clean_name(bsd.group(2)), bsd.group(3)
    gnu = _GNU_LINE.match(line)
    if gnu:
        return "", _clean_name(gnu.group(2)), gnu.group(1)
    return None


def _clean_name(name: str) -> str:
    return name.strip().removeprefix("./")
