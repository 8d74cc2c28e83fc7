"""Detached OpenPGP signatures, checked with ``gpgv`` against one keyring file.

``gpgv`` (Debian package gpgv, on every Debian and Ubuntu system because apt needs it) only
verifies: it trusts exactly the keys in the keyring it is given, with no trust database. Each
check runs in a fresh temporary directory, which is also gpgv's ``--homedir``, so the user's
``~/.gnupg`` is never read. The verdict comes from gpgv's machine-readable status lines
(``--status-fd``); its human messages only go into error messages.
"""

from __future__ import annotations

import shlex
import tempfile
from collections.abc import Sequence
from pathlib import Path

from labbuilder.adapters import processes
from labbuilder.adapters.processes import ProcessResult
from labbuilder.common.errors import ImageError

GPGV = "gpgv"
GPGV_TIMEOUT = 60.0  # seconds
_STATUS_PREFIX = "[GNUPG:] "
# Status keywords of a signature that must not be trusted although gpgv may know its key.
_REJECTED = {
    "BADSIG": "the signature does not match the data: it (or the file) was altered or corrupted",
    "EXPSIG": "the signature has expired",
    "EXPKEYSIG": "the signing key has expired",
    "REVKEYSIG": "the signing key has been revoked",
}
# Keyring file names and the Debian/Ubuntu packages that ship them.
_KEYRING_PACKAGES = (("ubuntu-", "ubuntu-keyring"), ("debian-archive-", "debian-archive-keyring"))

Status = list[tuple[str, list[str]]]


def verify_detached(data: bytes, signature: bytes, keyring: Path) -> str:
    """Check ``signature``, a detached OpenPGP signature over ``data``, against ``keyring``.

    Returns the fingerprint of the primary key that made a good signature (40 hex digits).
    Signatures by keys that are not in the keyring are ignored when another one is good, as
    apt does. Raises ``ImageError`` when gpgv or the keyring is missing, or no signature is
    good: bad, by an unknown, expired or revoked key, or not an OpenPGP signature at all.
    """
    keyring = _usable_keyring(keyring)
    with tempfile.TemporaryDirectory(prefix="labbuilder-gpgv-") as tmp:
        folder = Path(tmp)
        signed, detached = folder / "data", folder / "data.sig"
        signed.write_bytes(data)
        detached.write_bytes(signature)
        result = run(
            [GPGV, "--homedir", tmp, "--status-fd", "1", "--keyring", str(keyring)]
            + [str(detached), str(signed)]
        )
    status = parse_status(result.output)
    good = [fields for word, fields in status if word == "VALIDSIG"]
    rejected = [word for word, _ in status if word in _REJECTED]
    if good and not rejected:
        fields = good[0]
        return (fields[9] if len(fields) > 9 else fields[0]).upper()  # the primary key's
    said = _said(result)
    raise ImageError(
        f"gpgv did not accept the signature (keyring {keyring}): {said}",
        hint=_hint(status, keyring),
    )


def parse_status(text: str) -> Status:
    """gpgv's ``--status-fd`` lines as (keyword, fields); other lines are ignored."""
    lines = []
    for line in text.splitlines():
        if line.startswith(_STATUS_PREFIX):
            keyword, *fields = line.removeprefix(_STATUS_PREFIX).split(" ")
            lines.append((keyword, fields))
    return lines


def run(argv: Sequence[str], *, timeout: float = GPGV_TIMEOUT) -> ProcessResult:
    """Run ``argv`` (never through a shell, through ``processes.run``) and return the result,
    whatever its exit code.

    Raises ``ImageError`` when the program is missing, cannot be started, or does not finish
    within ``timeout`` seconds.
    """
    args = list(argv)
    try:
        return processes.run(args, timeout=timeout, check=False)
    except processes.ProgramMissing:
        raise ImageError(
            f"{args[0]} is not installed on this host; labbuilder needs it to check the "
            "signatures of published checksum files",
            hint=f"apt-get install {args[0]}",
        ) from None
    except processes.ProcessTimedOut:
        raise ImageError(
            f"{shlex.join(args)} did not finish within {timeout:.0f} seconds",
            hint="run the command again; if it hangs again, run that gpgv command by hand",
        ) from None
    except processes.ProgramNotStarted as exc:
        raise ImageError(
            f"cannot run {args[0]}: {exc.reason}",
            hint=f"check the {args[0]} installation (apt-get install --reinstall {args[0]})",
        ) from exc


def keyring_package_hint(keyring: Path) -> str:
    """What to install to get ``keyring``: the apt package when the file name is known."""
    for prefix, package in _KEYRING_PACKAGES:
        if keyring.name.startswith(prefix):
            hint = f"install the package that ships it: apt-get install {package}"
            if package == "ubuntu-keyring":
                hint += (
                    " (on Debian 12 it is in bookworm-backports: apt-get install "
                    "-t bookworm-backports ubuntu-keyring)"
                )
            return hint
    return (
        f"install the package that ships {keyring.name} (apt-file search {keyring.name}), "
        "or correct the catalog entry's keyring path"
    )


def _usable_keyring(keyring: Path) -> Path:
    """``keyring`` as an absolute path (gpgv looks up bare names in its home) that exists."""
    path = keyring.expanduser().absolute()
    try:
        with path.open("rb") as fh:
            head = fh.read(64)
    except FileNotFoundError:
        raise ImageError(
            f"the OpenPGP keyring {path} does not exist, so signatures cannot be checked",
            hint=keyring_package_hint(path),
        ) from None
    except OSError as exc:
        raise ImageError(
            f"cannot read the OpenPGP keyring {path}: {exc.strerror or exc}",
            hint="check that the keyring path names a readable file",
        ) from exc
    if head.lstrip().startswith(b"-----BEGIN PGP"):
        raise ImageError(
            f"the OpenPGP keyring {path} is ASCII-armored; gpgv needs a binary keyring",
            hint=f"convert it with `gpg --dearmor < {path} > {path.with_suffix('.gpg')}` "
            "and name that file as the keyring",
        )
    return path


def _said(result: ProcessResult) -> str:
    """gpgv's own messages, on one line."""
    lines = [
        line.removeprefix("gpgv:").strip()
        for line in result.errors.splitlines()
        if line.startswith("gpgv:") and line.removeprefix("gpgv:").strip()
    ]
    return "; ".join(lines) or f"gpgv exited with code {result.returncode} and said nothing"


def _hint(status: Status, keyring: Path) -> str:
    words = {word: fields for word, fields in status}
    for word, meaning in _REJECTED.items():
        if word in words:
            return f"{meaning}; do not use the file it signs"
    if "NO_PUBKEY" in words:
        key = (words.get("ERRSIG") or words["NO_PUBKEY"] or ["?"])[-1]  # ERRSIG ends with the fpr
        return (
            f"it was made by key {key}, which is not in {keyring}: the file may not come from "
            "the distribution, or the keyring is out of date (upgrade the package that ships it)"
        )
    if "NODATA" in words:
        return "the signature file is not an OpenPGP signature: check signature_url"
    return "read gpgv's message above"
