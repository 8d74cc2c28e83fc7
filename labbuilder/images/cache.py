"""The per-user image cache: verified base images, downloaded once and shared by every lab.

The cache folder is ``$LABBUILDER_CACHE_DIR``, else ``$XDG_CACHE_HOME/labbuilder``, else
``~/.cache/labbuilder``; images live in its ``images/`` folder. Every function takes the cache
folder as an argument (``default_cache_dir()`` computes the usual one): no global state.

Image files are named by content, ``<stem>-<first 16 hex digits of digest>.<format>`` (the stem
is the catalog name, or a slug of the URL for an image named by location). When upstream
publishes a new image under the same URL, ``pull`` adds a new file and leaves the old one in
place, so qcow2 overlays of existing labs never see their backing file change; ``prune``
removes old versions. Next to each image ``<file>``:

* ``<file>.json``, the sidecar: name, url, digest, algorithm, size, pulled_at, verified, and
  signed_by (the fingerprint of the key that signed the checksum file the digest was checked
  against, or null when the entry's checksum file is not signed);
* ``<file>.part``, while a download is unfinished (kept after a failure, for resuming);

and per stem a ``<stem>.lock`` file, ``flock``-ed while the image is pulled or pruned, so two
labbuilder processes (or threads) pulling the same image download it only once.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from labbuilder.catalog.files import location_slug
from labbuilder.catalog.model import ChecksumAlgorithm, DownloadSource, ImageEntry
from labbuilder.common.errors import ImageError
from labbuilder.common.filelock import file_lock
from labbuilder.images.checksums import fetch_checksum
from labbuilder.images.download import (
    DEFAULT_RETRIES,
    DEFAULT_RETRY_DELAY,
    DEFAULT_TIMEOUT,
    ProgressCallback,
    download,
)

IMAGES_SUBDIR = "images"
SIDECAR_SUFFIX = ".json"
LOCK_SUFFIX = ".lock"
DIGEST_IN_NAME = 16  # hex digits of the digest in a cached file's name

_STEM_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_FILE_RE = re.compile(
    r"^(?P<stem>.+?)(?:-[0-9a-f]{16})?\.(?:qcow2|raw)(?P<extra>\.part|\.json|\.json\.tmp)?$"
)


@dataclass(frozen=True)
class CachedImage:
    """A verified image file in the cache."""

    name: str  # the ImageEntry's name
    path: Path
    url: str
    digest: str
    algorithm: ChecksumAlgorithm
    size: int
    pulled_at: str  # ISO 8601, UTC
    verified: bool  # the digest was checked against a published or pinned checksum
    bytes_downloaded: int = 0  # what the pull that returned this transferred (0: cache hit)
    signed_by: str | None = None  # the key that signed the checksum file (see the module doc)


def images_dir(cache_dir: Path) -> Path:
    return cache_dir / IMAGES_SUBDIR


def pull(
    entry: ImageEntry,
    cache_dir: Path,
    progress: ProgressCallback | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    retries: int = DEFAULT_RETRIES,
    retry_delay: float = DEFAULT_RETRY_DELAY,
    lock_timeout: float | None = None,
    offline: bool = False,
) -> CachedImage:
    """Make sure ``entry``'s image is in the cache, verified; download it if it is not.

    The expected digest is the entry's pinned checksum, or is fetched from its checksum_url
    (so a changed upstream image is noticed), whose signature, if the entry has a signature_url,
    must verify against its keyring first: else ``ImageError``, and nothing is downloaded or
    taken from the cache. If the cache holds a file from the same URL whose sidecar records that
    digest (and whose size matches), nothing is downloaded (``bytes_downloaded == 0``); the
    file is not re-hashed. Concurrent pulls of the same image wait for each other on its lock
    file; the later ones then find the verified file. ``lock_timeout`` (seconds) bounds that.

    ``offline=True`` does not fetch the checksum file: it returns the newest cached copy from
    the same URL (verified when it was pulled; for a signed entry, one whose signature was
    checked), or raises ImageError if there is none.
    """
    source = _download_source(entry)
    folder = images_dir(cache_dir)
    stem = _stem(entry, source)
    expected, signed_by = source.checksum, None
    if expected is None and source.checksum_url is not None and not offline:
        published = fetch_checksum(
            source, timeout=timeout, retries=retries, retry_delay=retry_delay
        )
        expected, signed_by = published.digest, published.signed_by
    expected = expected.lower() if expected else None
    signed_only = offline and source.signature_url is not None
    _make_dir(folder)
    with _image_lock(folder, stem, entry.name, lock_timeout):
        hit = _find(folder, source.url, expected, signed_only=signed_only)
        if hit is not None:
            if progress is not None:
                progress(hit.size, hit.size)
            if signed_by is not None and hit.signed_by != signed_by:  # provenance now proven
                hit = dataclasses.replace(hit, verified=True, signed_by=signed_by)
                _write_sidecar(hit)
            verified = hit.verified or expected is not None
            return dataclasses.replace(hit, name=entry.name, verified=verified)
        if offline:
            signed = " with a checked signature" if signed_only else ""
            raise ImageError(
                f"image {entry.name!r} is not in the cache ({folder}){signed}, and pulling it "
                "offline was asked for",
                hint=f"pull it while connected to the network (it comes from {source.url})",
            )
        fmt = source.format.value
        target = _versioned(folder, stem, expected, fmt) if expected else folder / f"{stem}.{fmt}"
        result = download(
            source.url,
            target,
            checksum=expected,
            algorithm=source.algorithm,
            progress=progress,
            timeout=timeout,
            retries=retries,
            retry_delay=retry_delay,
        )
        path = _versioned(folder, stem, result.digest, fmt)
        if target != path:  # unverified: named once its digest is known
            _rename(target, path)
        image = CachedImage(
            name=entry.name,
            path=path,
            url=source.url,
            digest=result.digest,
            algorithm=source.algorithm,
            size=result.total_size,
            pulled_at=datetime.now(UTC).isoformat(timespec="milliseconds"),
            verified=result.verified,
            bytes_downloaded=result.bytes_downloaded,
            signed_by=signed_by,
        )
        _write_sidecar(image)
        return image


def list_cached(cache_dir: Path) -> list[CachedImage]:
    """The images in the cache (with a sidecar and the file present), by name, oldest first."""
    folder = images_dir(cache_dir)
    if not folder.is_dir():
        return []
    return sorted(_records(folder), key=lambda image: (image.name, *_age(image)))


def prune(cache_dir: Path, keep: set[str]) -> list[Path]:
    """Delete cached images that are not kept, and unfinished downloads; return what went.

    An entry of ``keep`` is an image name (``ImageEntry.name``, as ``find_image`` returns it),
    which keeps the newest cached version of that image, or a cache file name or path, which
    keeps that very file (pass the base images existing labs' overlays use). Unfinished
    ``.part`` files are deleted; images being pulled (their lock is held) are not touched.
    Sidecars without an image go too. Returns the image files, sidecars and ``.part`` files
    deleted; lock files left without an image are removed but not listed.
    """
    folder = images_dir(cache_dir)
    if not folder.is_dir():
        return []
    newest: dict[str, Path] = {}
    for cached in list_cached(cache_dir):  # oldest first, so the last one of a name stays
        newest[cached.name] = cached.path
    kept = {path for name, path in newest.items() if name in keep}
    kept |= {folder / Path(item).name for item in keep}
    removed: list[Path] = []
    for stem, files in sorted(_files_by_stem(folder).items()):
        with file_lock(_lock_path(folder, stem), blocking=False) as acquired:
            if not acquired:
                continue  # a pull of this image is running
            for path in sorted(files):
                extra = _extra_suffix(path)
                image = path.with_name(path.name.removesuffix(extra)) if extra else path
                if extra in (".part", ".json.tmp") or image not in kept or not image.is_file():
                    removed += [p for p in (path, _sidecar_path(path)) if _remove(p)]
            if not any(_FILE_RE.match(p.name) for p in _stem_files(folder, stem)):
                _lock_path(folder, stem).unlink(missing_ok=True)  # safe: we hold the lock
    return removed


# --- names -----------------------------------------------------------------------------------


def _download_source(entry: ImageEntry) -> DownloadSource:
    if entry.download is None:
        raise ImageError(
            f"image {entry.name!r} has no [download] section, so it cannot be pulled",
            hint="build it locally instead (it has a [build] recipe)"
            if entry.build is not None
            else "add a [download] section to its catalog file",
        )
    return entry.download


def _stem(entry: ImageEntry, source: DownloadSource) -> str:
    if _STEM_RE.fullmatch(entry.name):
        return entry.name
    return location_slug(source.url)  # named by location (a URL or a path)


def _versioned(folder: Path, stem: str, digest: str, fmt: str) -> Path:
    return folder / f"{stem}-{digest[:DIGEST_IN_NAME]}.{fmt}"


def _lock_path(folder: Path, stem: str) -> Path:
    return folder / f"{stem}{LOCK_SUFFIX}"


def _sidecar_path(image_path: Path) -> Path:
    return image_path.with_name(image_path.name + SIDECAR_SUFFIX)


def _extra_suffix(path: Path) -> str:
    match = _FILE_RE.match(path.name)
    return (match.group("extra") or "") if match else ""


def _files_by_stem(folder: Path) -> dict[str, list[Path]]:
    """The cache's files (images, sidecars, parts) grouped by stem; lock files add stems."""
    groups: dict[str, list[Path]] = {}
    for item in folder.iterdir():
        if item.name.endswith(LOCK_SUFFIX):
            groups.setdefault(item.name.removesuffix(LOCK_SUFFIX), [])
        elif match := _FILE_RE.match(item.name):
            groups.setdefault(match.group("stem"), []).append(item)
    return groups


def _stem_files(folder: Path, stem: str) -> list[Path]:
    return _files_by_stem(folder).get(stem, [])


# --- records ---------------------------------------------------------------------------------


@contextmanager
def _image_lock(folder: Path, stem: str, name: str, timeout: float | None) -> Iterator[None]:
    lock, held = _lock_path(folder, stem), ExitStack()
    try:
        held.enter_context(file_lock(lock, timeout=timeout))
    except TimeoutError:
        raise ImageError(
            f"timed out waiting for another labbuilder to finish pulling image {name!r} "
            f"(lock file {lock})",
            hint="wait for the other labbuilder process to finish, then try again",
        ) from None
    except OSError as exc:
        raise ImageError(
            f"cannot open the lock file {lock}: {exc.strerror}",
            hint="check the permissions of the image cache folder",
        ) from exc
    with held:
        yield


def _find(
    folder: Path, url: str, expected: str | None, *, signed_only: bool = False
) -> CachedImage | None:
    """The newest cached copy of ``url`` (with digest ``expected``, if given; signed, if asked)."""
    matches = [
        record
        for record in _records(folder)
        if record.url == url
        and (expected is None or record.digest == expected)
        and (record.signed_by is not None or not signed_only)
        and record.path.stat().st_size == record.size
    ]
    return max(matches, key=_age, default=None)


def _age(image: CachedImage) -> tuple[str, int]:
    """Sorts cached images oldest first (the file's mtime breaks pulled_at ties)."""
    return image.pulled_at, image.path.stat().st_mtime_ns


def _records(folder: Path) -> list[CachedImage]:
    records = []
    for sidecar in folder.glob(f"*{SIDECAR_SUFFIX}"):
        record = _read_sidecar(sidecar.with_name(sidecar.name.removesuffix(SIDECAR_SUFFIX)))
        if record is not None and record.path.is_file():
            records.append(record)
    return records


def _read_sidecar(image_path: Path) -> CachedImage | None:
    """The sidecar's record, or None if it is missing or unreadable (then re-pull)."""
    try:
        data: Any = json.loads(_sidecar_path(image_path).read_text(encoding="utf-8"))
        return CachedImage(
            name=str(data["name"]),
            path=image_path,
            url=str(data["url"]),
            digest=str(data["digest"]),
            algorithm=ChecksumAlgorithm(data["algorithm"]),
            size=int(data["size"]),
            pulled_at=str(data["pulled_at"]),
            verified=bool(data.get("verified", False)),
            signed_by=str(data["signed_by"]) if data.get("signed_by") else None,
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_sidecar(image: CachedImage) -> None:
    data = {
        "name": image.name,
        "url": image.url,
        "digest": image.digest,
        "algorithm": image.algorithm.value,
        "size": image.size,
        "pulled_at": image.pulled_at,
        "verified": image.verified,
        "signed_by": image.signed_by,
    }
    sidecar = _sidecar_path(image.path)
    tmp = sidecar.with_name(sidecar.name + ".tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        tmp.replace(sidecar)
    except OSError as exc:
        raise ImageError(
            f"cannot write {sidecar}: {exc.strerror}",
            hint="check the free space and permissions of the image cache",
        ) from exc


# --- file operations -------------------------------------------------------------------------


def _rename(source: Path, target: Path) -> None:
    try:
        source.replace(target)
    except OSError as exc:
        raise ImageError(
            f"cannot move {source} to {target}: {exc.strerror}",
            hint="check the permissions of the image cache folder",
        ) from exc


def _remove(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise ImageError(
            f"cannot delete {path}: {exc.strerror}",
            hint="check the permissions of the image cache folder",
        ) from exc
    return True


def _make_dir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ImageError(
            f"cannot create the image cache folder {folder}: {exc.strerror}",
            hint="set LABBUILDER_CACHE_DIR to a writable folder",
        ) from exc
