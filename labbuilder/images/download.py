"""Download a file over http(s) (or copy a file:// URL), resumably, and verify its digest.

``download`` streams into ``<dest>.part``, resumes an existing ``.part`` with an HTTP Range
request, retries dropped connections a bounded number of times, and only renames the file to
``dest`` (atomically, ``os.replace``) once its digest matches. So ``dest`` is either absent or
complete and verified; a corrupt download is deleted, a truncated one is kept for resuming.

``download`` is not safe for two concurrent calls with the same ``dest``: use
``labbuilder.images.cache.pull``, which serialises them with a lock file.
"""

from __future__ import annotations

import hashlib
import http.client
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Protocol, TypeAlias

from labbuilder import __version__
from labbuilder.catalog.model import HEX_DIGITS, ChecksumAlgorithm
from labbuilder.common.errors import ImageError

ProgressCallback: TypeAlias = Callable[[int, int | None], None]
"""Called as ``progress(done_bytes, total_bytes_or_None)`` while a download runs.

``done_bytes`` counts the whole file (including bytes resumed from an earlier ``.part``), so it
can start above zero; ``total`` is None when the server does not say how big the file is.
"""

DEFAULT_TIMEOUT = 60.0  # seconds without any data before a connection counts as dropped
DEFAULT_RETRIES = 4
DEFAULT_RETRY_DELAY = 2.0  # doubled after each failed attempt
CHUNK_SIZE = 256 * 1024
MAX_SMALL_FILE = 4 * 1024 * 1024  # checksum files and signatures
USER_AGENT = f"labbuilder/{__version__} (+urllib)"
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})

_CONTENT_RANGE = re.compile(r"^bytes\s+(\d+)-(\d+)/(\d+|\*)$")
_UNSATISFIED_RANGE = re.compile(r"^bytes\s+\*/(\d+)$")


@dataclass(frozen=True)
class DownloadResult:
    """What one ``download`` call did."""

    path: Path  # the verified file (``dest``)
    url: str
    bytes_downloaded: int  # bytes transferred by this call; 0 when dest was already there
    total_size: int  # size of the file at ``path``
    digest: str  # lower-case hex digest of the file
    algorithm: ChecksumAlgorithm
    resumed: bool  # part of the file came from a ``.part`` left by an earlier attempt
    verified: bool  # the digest was checked against an expected checksum


class _Hasher(Protocol):
    def update(self, data: bytes, /) -> None: ...

    def hexdigest(self) -> str: ...


class _Response(Protocol):
    """What urlopen returns: an HTTPResponse, or an addinfourl for file:// URLs."""

    headers: Message

    def read(self, amt: int, /) -> bytes: ...

    def close(self) -> None: ...


class _Retryable(Exception):
    """A transient failure (dropped connection, truncated body, 5xx): retry, resuming."""


@dataclass
class _Transfer:
    url: str
    part: Path
    algorithm: ChecksumAlgorithm
    progress: ProgressCallback | None
    timeout: float
    bytes_downloaded: int = 0
    resumed: bool = False
    digest: str = ""
    total: int = 0


def part_path(dest: Path) -> Path:
    """Where ``download`` keeps the unfinished file for ``dest``."""
    return dest.with_suffix(dest.suffix + ".part")


def file_digest(path: Path, algorithm: ChecksumAlgorithm) -> str:
    """The lower-case hex digest of a file."""
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, algorithm.value).hexdigest()


def download(
    url: str,
    dest: Path,
    *,
    checksum: str | None,
    algorithm: ChecksumAlgorithm = ChecksumAlgorithm.SHA256,
    progress: ProgressCallback | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    retries: int = DEFAULT_RETRIES,
    retry_delay: float = DEFAULT_RETRY_DELAY,
) -> DownloadResult:
    """Fetch ``url`` to ``dest``, verifying it against ``checksum`` if one is given.

    If ``dest`` already exists and matches ``checksum`` nothing is transferred. Without a
    checksum the file is always fetched again (there is nothing to check the old copy against).
    Raises ``ImageError`` on an HTTP error, a checksum mismatch, or when ``retries`` retries
    after dropped connections did not complete the file.
    """
    expected = _normalise_checksum(checksum, algorithm, url) if checksum else None
    if expected is not None and dest.is_file():
        digest = file_digest(dest, algorithm)
        if digest == expected:
            size = dest.stat().st_size
            if progress is not None:
                progress(size, size)
            return DownloadResult(dest, url, 0, size, digest, algorithm, False, True)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ImageError(
            f"cannot create the folder {dest.parent}: {exc.strerror}",
            hint="check the permissions of the image cache folder",
        ) from exc
    transfer = _Transfer(url, part_path(dest), algorithm, progress, timeout)
    _with_retries(transfer, retries, retry_delay)
    if expected is not None and transfer.digest != expected and transfer.resumed:
        # The .part may be left over from an older version of the file: start once afresh.
        transfer.part.unlink(missing_ok=True)
        _with_retries(transfer, retries, retry_delay)
    if expected is not None and transfer.digest != expected:
        transfer.part.unlink(missing_ok=True)
        raise ImageError(
            f"checksum mismatch for {url}: expected {algorithm} {expected}, got {transfer.digest}",
            hint="the corrupt download was deleted; run the command again to download it "
            "afresh. If it fails again, the published image or checksum has changed: check "
            "the catalog entry's checksum",
        )
    try:
        transfer.part.replace(dest)  # atomic (rename(2)): dest is never partial
    except OSError as exc:
        raise ImageError(
            f"cannot move {transfer.part} to {dest}: {exc.strerror}",
            hint="check the permissions of the image cache folder",
        ) from exc
    return DownloadResult(
        dest,
        url,
        transfer.bytes_downloaded,
        transfer.total,
        transfer.digest,
        algorithm,
        transfer.resumed,
        expected is not None,
    )


def _with_retries(transfer: _Transfer, retries: int, retry_delay: float) -> None:
    failures = 0
    while True:
        try:
            _attempt(transfer)
            return
        except _Retryable as exc:
            failures += 1
            if failures > retries:
                raise _gave_up(transfer, str(exc), failures) from exc
            time.sleep(retry_delay * 2 ** (failures - 1))


def _attempt(transfer: _Transfer) -> None:
    """One request: resume or start the ``.part`` and stream the body into it."""
    offset = transfer.part.stat().st_size if transfer.part.is_file() else 0
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = _open(transfer.url, headers, transfer.timeout, "the image")
    except urllib.error.HTTPError as exc:
        if not offset:  # 416 without a Range header: the server is confused
            raise ImageError(
                f"downloading {transfer.url} failed: HTTP 416", hint=_status_hint(416)
            ) from exc
        _range_not_satisfiable(transfer, exc.headers, offset)
        return
    try:
        status = getattr(response, "status", None) or 200  # file:// responses have no status
        resume = offset > 0 and status == 206
        if resume:
            start = _content_range_start(response.headers)
            if start != offset:
                transfer.part.unlink(missing_ok=True)
                raise _Retryable(
                    f"the server answered a Range request for bytes {offset}- "
                    f"with bytes {start}-; starting again"
                )
        elif status != 200:
            raise ImageError(
                f"downloading {transfer.url} failed: unexpected HTTP {status}",
                hint="the server is misbehaving; try again later",
            )
        length = _content_length(response.headers)
        total = offset + length if resume and length is not None else length
        hasher = hashlib.new(transfer.algorithm.value)
        if resume:
            _hash_existing(transfer.part, hasher)
        else:
            offset = 0  # a 200 answer to a Range request: the server ignored it
        transfer.resumed = resume
        received = _stream(transfer, response, hasher, offset, total)
    finally:
        response.close()
    if length is not None and received < length:
        raise _Retryable(
            f"truncated body: expected {total} bytes, got {offset + received} "
            "bytes (the connection ended early)"
        )
    transfer.digest = hasher.hexdigest()
    transfer.total = offset + received


def _stream(
    transfer: _Transfer, response: _Response, hasher: _Hasher, offset: int, total: int | None
) -> int:
    """Copy the response body to the ``.part`` file; return the number of bytes received."""
    received = 0
    mode = "ab" if offset else "wb"
    try:
        fh = transfer.part.open(mode)
    except OSError as exc:
        raise _write_error(transfer.part, exc) from exc
    with fh:
        if transfer.progress is not None:
            transfer.progress(offset, total)
        while True:
            try:
                chunk = response.read(CHUNK_SIZE)
            except (OSError, http.client.HTTPException) as exc:
                raise _Retryable(
                    f"the connection dropped after {offset + received} of "
                    f"{_bytes(total)}: {_reason(exc)}"
                ) from exc
            if not chunk:
                return received
            try:
                fh.write(chunk)
            except OSError as exc:
                raise _write_error(transfer.part, exc) from exc
            hasher.update(chunk)
            received += len(chunk)
            transfer.bytes_downloaded += len(chunk)
            if transfer.progress is not None:
                transfer.progress(offset + received, total)


def _range_not_satisfiable(transfer: _Transfer, headers: Message, offset: int) -> None:
    """HTTP 416 on resume: the ``.part`` is already complete, or it is bigger than the file."""
    match = _UNSATISFIED_RANGE.match(headers.get("Content-Range", "").strip())
    if match and int(match.group(1)) == offset:
        hasher = hashlib.new(transfer.algorithm.value)
        _hash_existing(transfer.part, hasher)
        transfer.digest, transfer.total, transfer.resumed = hasher.hexdigest(), offset, True
        if transfer.progress is not None:
            transfer.progress(offset, offset)
        return
    transfer.part.unlink(missing_ok=True)  # not a prefix of this file: start again
    _attempt(transfer)


def _hash_existing(part: Path, hasher: _Hasher) -> None:
    with part.open("rb") as fh:
        while chunk := fh.read(CHUNK_SIZE):
            hasher.update(chunk)


def _open(url: str, headers: dict[str, str], timeout: float, what: str) -> _Response:
    """urlopen; HTTP 416 is re-raised, other failures become ImageError or _Retryable."""
    request = urllib.request.Request(url, headers=headers)
    try:
        response: _Response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416:
            raise
        if exc.code in RETRY_STATUSES:
            raise _Retryable(f"HTTP {exc.code} {exc.reason}") from exc
        raise ImageError(
            f"downloading {what} from {url} failed: HTTP {exc.code} {exc.reason}",
            hint=_status_hint(exc.code),
        ) from exc
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        if urllib.parse.urlsplit(url).scheme == "file":
            raise ImageError(
                f"cannot read {what} {url}: {_reason(exc)}",
                hint="check that the file exists and is readable",
            ) from exc
        raise _Retryable(f"cannot connect: {_reason(exc)}") from exc
    return response


def _gave_up(transfer: _Transfer, reason: str, attempts: int) -> ImageError:
    kept = transfer.part.stat().st_size if transfer.part.is_file() else 0
    resume = (
        f"the {kept} bytes received so far are kept in {transfer.part}; run the command "
        "again to resume"
        if kept
        else "run the command again later"
    )
    return ImageError(
        f"downloading {transfer.url} failed after {attempts} attempt"
        f"{'s' if attempts != 1 else ''}: {reason}",
        hint=f"check the network connection (and any http_proxy/https_proxy settings); {resume}",
    )


def _write_error(part: Path, exc: OSError) -> ImageError:
    return ImageError(
        f"cannot write {part}: {exc.strerror or exc}",
        hint="check the free space and permissions of the image cache folder",
    )


def _status_hint(status: int) -> str:
    if status == 404 or status == 410:
        return (
            "the file is not (or no longer) published at that URL; images under "
            "'current'/'latest' are replaced over time: check the URL in the catalog"
        )
    if status in (401, 403):
        return "the server refuses access; check the URL, or whether a proxy is interfering"
    return "check the URL; if it is right, the server is having trouble: try again later"


def _content_length(headers: Message) -> int | None:
    value = headers.get("Content-Length")
    if value is None or not value.strip().isdigit():
        return None
    return int(value)


def _content_range_start(headers: Message) -> int | None:
    match = _CONTENT_RANGE.match(headers.get("Content-Range", "").strip())
    return int(match.group(1)) if match else None


def _bytes(total: int | None) -> str:
    return f"{total} bytes" if total is not None else "an unknown number of bytes"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        return _reason(exc.reason) if isinstance(exc.reason, BaseException) else str(exc.reason)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _normalise_checksum(checksum: str, algorithm: ChecksumAlgorithm, url: str) -> str:
    value = checksum.strip().lower()
    if len(value) != HEX_DIGITS[algorithm] or not re.fullmatch(r"[0-9a-f]+", value):
        raise ImageError(
            f"the expected checksum for {url} is not a {algorithm} digest: {checksum!r}",
            hint=f"a {algorithm} digest has {HEX_DIGITS[algorithm]} hex digits",
        )
    return value


# --- small files: checksum files and their signatures ----------------------------------------


def fetch_small_file(
    url: str,
    what: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    retries: int = 2,
    retry_delay: float = DEFAULT_RETRY_DELAY,
) -> bytes:
    """Fetch a small file (at most MAX_SMALL_FILE bytes) into memory; ``what`` names it.

    Dropped connections and 5xx answers are retried ``retries`` times; other HTTP errors
    (404) raise ``ImageError`` at once, naming ``what`` and ``url``.
    """
    failures = 0
    while True:
        try:
            return _fetch_bytes(url, what, timeout)
        except _Retryable as exc:
            failures += 1
            if failures > retries:
                raise ImageError(
                    f"cannot fetch {what} {url}: {exc}",
                    hint="check the network connection, then run the command again",
                ) from exc
            time.sleep(retry_delay * 2 ** (failures - 1))


def _fetch_bytes(url: str, what: str, timeout: float) -> bytes:
    try:
        response = _open(url, {"User-Agent": USER_AGENT}, timeout, what)
    except urllib.error.HTTPError as exc:  # 416 without a Range header: treat as any error
        raise ImageError(
            f"downloading {what} {url} failed: HTTP {exc.code}", hint=_status_hint(exc.code)
        ) from exc
    try:
        data = response.read(MAX_SMALL_FILE + 1)
    except (OSError, http.client.HTTPException) as exc:
        raise _Retryable(f"the connection dropped: {_reason(exc)}") from exc
    finally:
        response.close()
    if len(data) > MAX_SMALL_FILE:
        raise ImageError(
            f"{what} {url} is larger than {MAX_SMALL_FILE} bytes",
            hint="check that the catalog entry's URL for it names the right file",
        )
    return data
