"""Checksum files as distributions publish them: SHA256SUMS, SHA512SUMS and BSD-style lists.

``fetch_checksum`` fetches one and, when the distribution signs it (``SHA256SUMS.gpg``), checks
the detached signature with ``labbuilder.images.signatures`` before any digest in it is used;
``parse_checksum_file`` is the pure text parsing.
"""

from __future__ import annotations

import difflib
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from labbuilder.catalog.model import HEX_DIGITS, ChecksumAlgorithm, DownloadSource
from labbuilder.common.errors import ImageError
from labbuilder.images.download import DEFAULT_RETRY_DELAY, DEFAULT_TIMEOUT, fetch_small_file
from labbuilder.images.signatures import verify_detached

_GNU_LINE = re.compile(r"^([0-9a-fA-F]+) [ *](.+)$")
_BSD_LINE = re.compile(r"^(SHA-?\d+) \((.+)\) = ([0-9a-fA-F]+)$")


@dataclass(frozen=True)
class PublishedDigest:
    """The digest a checksum file lists for one file, and who vouched for the list."""

    digest: str  # lower-case hex
    signed_by: str | None  # fingerprint of the key whose signature over the file was good


def fetch_checksum(
    source: DownloadSource,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    retries: int = 2,
    retry_delay: float = DEFAULT_RETRY_DELAY,
) -> PublishedDigest:
    """Fetch ``source``'s checksum file and return the digest it lists for the image's file.

    When ``source`` has a signature_url (a detached signature of the checksum file, such as
    SHA256SUMS.gpg), the signature is fetched too and checked against ``source.keyring``
    before the file is parsed; if it is missing or does not verify, ``ImageError`` names the
    checksum file's URL, the signature's URL and what gpgv said.
    """
    checksum_url, signature_url, keyring = source.checksum_url, source.signature_url, source.keyring
    if checksum_url is None:
        raise ImageError(f"{source.url} has no checksum file", hint="pin its checksum instead")
    filename = urllib.parse.unquote(Path(urllib.parse.urlsplit(source.url).path).name)

    def fetch(url: str, what: str) -> bytes:
        return fetch_small_file(
            url, what, timeout=timeout, retries=retries, retry_delay=retry_delay
        )

    data = fetch(checksum_url, "the checksum file")
    signed_by = None
    if signature_url is not None:
        try:
            if keyring is None:
                raise ImageError(
                    "no keyring is configured to check it with",
                    hint='add keyring = "/path/to/keyring.gpg" to the catalog entry\'s [download]',
                )
            signature = fetch(signature_url, "the signature")
            signed_by = verify_detached(data, signature, keyring)
        except ImageError as exc:
            raise ImageError(
                f"the checksum file {checksum_url} is not trusted: checking its signature "
                f"{signature_url} failed: {exc.message}",
                hint=exc.hint,
            ) from exc
    text = data.decode("utf-8", errors="replace")
    return PublishedDigest(
        parse_checksum_file(text, filename, source.algorithm, source=checksum_url), signed_by
    )


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
