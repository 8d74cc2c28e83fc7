"""The image catalog: TOML files in ``images/`` parsed into ``ImageEntry`` objects.

One file per image, named after the image (``images/debian-12.toml`` holds ``name =
"debian-12"``). Parsing is strict: an unknown key, a value of the wrong type or an unknown
enum value is an ``ImageError`` naming the file and the key, with a "did you mean" hint.

A lab may also name an image by location instead of by catalog name: a local file path
(``/srv/images/x.qcow2``, ``./x.qcow2``, ``file:///srv/images/x.qcow2``) or an ``http(s)``
URL. Such an image has no published checksum; its entry says so in ``notes``.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import stat
import struct
import tomllib
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from labbuilder.catalog.model import (
    BuildRecipe,
    ChecksumAlgorithm,
    CloudInitFlavour,
    DiskFormat,
    DownloadSource,
    ImageEntry,
    verification_problem,
)
from labbuilder.common.errors import ImageError
from labbuilder.common.resources import data_dir
from labbuilder.common.sizes import parse_size

OS_FAMILIES = ("debian", "ubuntu")

_TOP_REQUIRED = (
    "name",
    "description",
    "os_family",
    "release",
    "cloud_init",
    "default_user",
    "console",
)
_TOP_KEYS = (*_TOP_REQUIRED, "notes", "download", "build")
_DOWNLOAD_REQUIRED = ("url", "format")
_DOWNLOAD_KEYS = (
    "url",
    "checksum_url",
    "checksum",
    "algorithm",
    "format",
    "signature_url",
    "keyring",
    "kernel_url",
    "initrd_url",
    "cmdline",
)
_BUILD_KEYS = ("suite", "mirror", "packages", "kernel_package", "size")

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
_QCOW2_MAGIC = b"QFI\xfb"
_RAW_SUFFIXES = (".raw", ".iso")
_LOCATION_SUFFIXES = (".qcow2", ".img", ".raw")

_E = TypeVar("_E", CloudInitFlavour, DiskFormat, ChecksumAlgorithm)


# --- loading -------------------------------------------------------------------------------


def load_catalog(folder: Path | None = None) -> dict[str, ImageEntry]:
    """Parse every ``*.toml`` file in the catalog folder (``images/``, or ``folder``); keys are
    the image names."""
    catalog: dict[str, ImageEntry] = {}
    source_folder = folder or data_dir("images")
    for item in sorted(source_folder.iterdir(), key=lambda t: t.name):
        if not item.name.endswith(".toml") or not item.is_file():
            continue
        source = str(item)
        entry = parse_image_entry(item.read_text(encoding="utf-8"), source)
        stem = item.name.removesuffix(".toml")
        if entry.name != stem:
            raise ImageError(
                f"{source}: key 'name' is {entry.name!r} but the file is named {item.name!r}",
                hint=f"rename the file to {entry.name}.toml or set name = {stem!r}",
            )
        catalog[entry.name] = entry
    return catalog


def find_image(
    name: str,
    *,
    catalog: Mapping[str, ImageEntry] | None = None,
    base_dir: Path | None = None,
) -> ImageEntry:
    """Return the image a lab names: a catalog name, a local file, or an http(s) URL.

    ``catalog`` defaults to ``load_catalog()``; ``base_dir`` is where relative paths are
    resolved from (the lab file's folder; the current directory if not given).
    """
    if "/" in name:
        return image_from_location(name, base_dir=base_dir)
    images = load_catalog() if catalog is None else catalog
    if name in images:
        return images[name]
    if is_location(name):
        return image_from_location(name, base_dir=base_dir)
    available = ", ".join(sorted(images)) or "(none)"
    close = difflib.get_close_matches(name, list(images), n=1)
    suggestion = f"did you mean {close[0]!r}? " if close else ""
    raise ImageError(
        f"unknown image {name!r}; the catalog has: {available}",
        hint=f"{suggestion}or name a local image file (/path/to/image.qcow2, file:///...) "
        "or an http(s) URL",
    )


def is_location(name: str) -> bool:
    """True if ``name`` is a path or URL rather than a catalog name."""
    return "/" in name or name.startswith("~") or name.endswith(_LOCATION_SUFFIXES)


def image_from_location(location: str, *, base_dir: Path | None = None) -> ImageEntry:
    """An unverified ``ImageEntry`` for a local image file or an http(s) URL.

    The entry's ``name`` is the canonical URL (``file:///abs/path`` or the http(s) URL), so the
    same image named in two ways is cached once. Nothing about the guest is known, so the entry
    assumes cloud-init with network-config v2, a serial console on ttyS0 and user ``root``.
    """
    parsed = urllib.parse.urlsplit(location)
    if parsed.scheme in ("http", "https"):
        if not parsed.netloc or not Path(parsed.path).name:
            raise ImageError(
                f"image URL {location!r} has no host or no file name",
                hint="give the full URL of the image file, e.g. https://host/path/image.qcow2",
            )
        url = location
        fmt = _format_from_suffix(parsed.path)
        where = f"downloaded from {url}"
    elif parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ImageError(
                f"image URL {location!r} names host {parsed.netloc!r}; file:// URLs must be local",
                hint="copy the image to this host and name it as file:///path/to/image.qcow2",
            )
        path = _existing_image_file(Path(urllib.request.url2pathname(parsed.path)), location)
        url, fmt, where = path.as_uri(), _format_from_magic(path), f"local file {path}"
    elif parsed.scheme and len(parsed.scheme) > 1:  # one letter would be a Windows drive
        raise ImageError(
            f"image location {location!r} uses the unsupported scheme {parsed.scheme!r}",
            hint="use an http:// or https:// URL, a file:// URL or a plain path",
        )
    else:
        path = Path(location).expanduser()
        if not path.is_absolute():
            path = (base_dir or Path.cwd()) / path
        path = _existing_image_file(path.resolve(), location)
        url, fmt, where = path.as_uri(), _format_from_magic(path), f"local file {path}"
    return ImageEntry(
        name=url,
        description=f"image {where}",
        os_family="unknown",
        release="unknown",
        cloud_init=CloudInitFlavour.V2,
        default_user="root",
        console="ttyS0",
        download=DownloadSource(
            url=url,
            checksum_url=None,
            checksum=None,
            algorithm=ChecksumAlgorithm.SHA256,
            format=fmt,
        ),
        build=None,
        notes="unverified: no published checksum; its SHA-256 is recorded when it is first "
        "pulled, but it is not checked against a trusted value",
    )


def location_slug(url: str) -> str:
    """A file-name-safe, collision-free short name for an image named by location."""
    stem = Path(urllib.parse.urlsplit(url).path).name
    for suffix in (*_LOCATION_SUFFIXES, ".qcow", ".iso"):
        stem = stem.removesuffix(suffix)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-") or "image"
    return f"{stem}-{hashlib.sha256(url.encode()).hexdigest()[:10]}"


def _existing_image_file(path: Path, location: str) -> Path:
    if not path.is_file():
        raise ImageError(
            f"image file {path} (named as {location!r}) does not exist or is not a file",
            hint="check the path; relative paths are resolved from the lab file's folder",
        )
    problem = local_image_problem(path, header=False)
    if problem is not None:
        raise ImageError(f"image file {path} (named as {location!r}) {problem[0]}", problem[1])
    return path


def local_image_problem(
    path: Path, *, qcow2_only: bool = False, header: bool = True
) -> tuple[str, str] | None:
    """Why a local file cannot be a lab's image (``(rule, hint)``), or None.

    It must be a regular file (a symlink counts as the file it leads to), never a device, FIFO,
    socket or directory. With ``header``, a qcow2 image must stand alone: a backing file or an
    external data file would make the guest's disk read another file of the host. With
    ``qcow2_only`` (an image a lab file names) anything but a qcow2 image is refused too.
    """
    try:
        info = path.stat()
    except (OSError, ValueError) as err:
        return f"cannot be read: {getattr(err, 'strerror', None) or err}", "check the path"
    if not stat.S_ISREG(info.st_mode):
        return f"is {file_kind(info.st_mode)}, not a regular file", "name an image file"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as err:
        return f"cannot be read: {err.strerror}", "check the file's permissions"
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return "changed into something that is not a regular file", "name an image file"
        head = os.read(fd, 104) if header else b""
    finally:
        os.close(fd)
    return _qcow2_problem(head, qcow2_only) if header else None


def _qcow2_problem(header: bytes, qcow2_only: bool) -> tuple[str, str] | None:
    if header[:4] != _QCOW2_MAGIC:
        if qcow2_only:
            return (
                "is not a qcow2 image",
                "a lab file names a local image as a qcow2 file (qemu-img convert -O qcow2)",
            )
        return None
    if len(header) < 72:
        return "is a truncated qcow2 image", "name a complete qcow2 image"
    version, backing_offset = (
        struct.unpack(">I", header[4:8])[0],
        struct.unpack(">Q", header[8:16])[0],
    )
    if backing_offset != 0:
        return (
            "is a qcow2 image with a backing file (another file of this host)",
            "flatten it first: qemu-img convert -O qcow2 IMAGE FLAT.qcow2",
        )
    if version >= 3 and len(header) >= 80:
        incompatible = struct.unpack(">Q", header[72:80])[0]
        if incompatible & 0b100:
            return (
                "is a qcow2 image with an external data file (another file of this host)",
                "flatten it first: qemu-img convert -O qcow2 IMAGE FLAT.qcow2",
            )
    return None


def file_kind(mode: int) -> str:
    """What a file is, for messages: "a directory", "a FIFO", ..."""
    for test, kind in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISREG, "a regular file"),
    ):
        if test(mode):
            return kind
    return "a special file"


def _format_from_magic(path: Path) -> DiskFormat:
    try:
        with path.open("rb") as fh:
            magic = fh.read(len(_QCOW2_MAGIC))
    except OSError as exc:
        raise ImageError(
            f"cannot read image file {path}: {exc.strerror}",
            hint="check the file's permissions",
        ) from exc
    return DiskFormat.QCOW2 if magic == _QCOW2_MAGIC else DiskFormat.RAW


def _format_from_suffix(path: str) -> DiskFormat:
    return DiskFormat.RAW if path.lower().endswith(_RAW_SUFFIXES) else DiskFormat.QCOW2


# --- parsing -------------------------------------------------------------------------------


def parse_image_entry(text: str, source_name: str) -> ImageEntry:
    """Parse one catalog file's text; ``source_name`` names the file in error messages."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ImageError(
            f"{source_name}: not valid TOML: {exc}",
            hint="fix the TOML syntax (https://toml.io); compare with the other files in images/",
        ) from exc
    return _Parser(source_name).entry(data)


class _Parser:
    """Validates one catalog file's decoded TOML; every error names the file and the key."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, problem: str, hint: str) -> ImageError:
        return ImageError(f"{self.source}: key {key!r} {problem}", hint=hint)

    def entry(self, data: dict[str, Any]) -> ImageEntry:
        self.check_keys(data, "", _TOP_KEYS, _TOP_REQUIRED)
        if "download" not in data and "build" not in data:
            raise ImageError(
                f"{self.source}: the image has neither a [download] nor a [build] section",
                hint="add a [download] section (url, checksum_url or checksum, format) "
                "and/or a [build] section (suite, mirror, packages, kernel_package, size)",
            )
        name = self.string(data, "name")
        if not _NAME_RE.match(name):
            raise self.fail(
                "name",
                f"is {name!r}, which is not a valid image name",
                "use lower-case letters, digits, '.', '-' and '_', e.g. 'debian-12'",
            )
        os_family = self.string(data, "os_family")
        if os_family not in OS_FAMILIES:
            raise self.fail(
                "os_family",
                f"is {os_family!r}, which is not one of {', '.join(OS_FAMILIES)}",
                _did_you_mean(os_family, OS_FAMILIES) + "os_family says which "
                "distribution's conventions the guest follows",
            )
        return ImageEntry(
            name=name,
            description=self.string(data, "description"),
            os_family=os_family,
            release=self.string(data, "release"),
            cloud_init=self.enum(data, "cloud_init", CloudInitFlavour),
            default_user=self.string(data, "default_user"),
            console=self.string(data, "console"),
            download=self.download(self.table(data, "download")) if "download" in data else None,
            build=self.build(self.table(data, "build")) if "build" in data else None,
            notes=self.string(data, "notes", required=False).strip(),
        )

    def download(self, table: dict[str, Any]) -> DownloadSource:
        self.check_keys(table, "download.", _DOWNLOAD_KEYS, _DOWNLOAD_REQUIRED)
        algorithm = (
            self.enum(table, "algorithm", ChecksumAlgorithm, "download.")
            if "algorithm" in table
            else ChecksumAlgorithm.SHA256
        )
        keyring = self.string(table, "keyring", "download.", required=False).strip()
        source = DownloadSource(
            url=self.url(table, "url"),
            checksum_url=self.url(table, "checksum_url", required=False) or None,
            checksum=self.string(table, "checksum", "download.", required=False).lower() or None,
            algorithm=algorithm,
            format=self.enum(table, "format", DiskFormat, "download."),
            signature_url=self.url(table, "signature_url", required=False) or None,
            keyring=Path(keyring) if keyring else None,
            kernel_url=self.url(table, "kernel_url", required=False) or None,
            initrd_url=self.url(table, "initrd_url", required=False) or None,
            cmdline=self.string(table, "cmdline", "download.", required=False).strip() or None,
        )
        problem = verification_problem(source)
        if problem is not None:
            raise ImageError(f"{self.source}: {problem[0]}", hint=problem[1])
        return source

    def build(self, table: dict[str, Any]) -> BuildRecipe:
        self.check_keys(table, "build.", _BUILD_KEYS, _BUILD_KEYS)
        mirror = self.string(table, "mirror", "build.")
        if urllib.parse.urlsplit(mirror).scheme not in ("http", "https"):
            raise self.fail(
                "build.mirror",
                f"is {mirror!r}, which is not an http(s) URL",
                "use e.g. 'http://deb.debian.org/debian'",
            )
        size = self.string(table, "size", "build.")
        try:
            valid = parse_size(size) > 0
        except ValueError:
            valid = False
        if not valid:
            raise self.fail(
                "build.size",
                f"is {size!r}, which is not a size",
                "write a positive number and a unit, e.g. '2 GiB' or '1536 MiB'",
            )
        return BuildRecipe(
            suite=self.string(table, "suite", "build."),
            mirror=mirror,
            packages=self.packages(table),
            kernel_package=self.package_name(table, "kernel_package"),
            size=size,
        )

    def packages(self, table: dict[str, Any]) -> tuple[str, ...]:
        value = table["packages"]
        if not isinstance(value, list) or not value:
            raise self.fail(
                "build.packages",
                f"must be a non-empty list of package names, not {_describe(value)}",
                'write e.g. packages = ["sudo", "curl"]',
            )
        seen: set[str] = set()
        for index, item in enumerate(value):
            if not isinstance(item, str) or not _PACKAGE_RE.match(item):
                raise self.fail(
                    f"build.packages[{index}]",
                    f"is {item!r}, which is not a Debian package name",
                    "use the package's name as apt knows it",
                )
            if item in seen:
                raise self.fail(
                    f"build.packages[{index}]", f"lists {item!r} twice", "remove the duplicate"
                )
            seen.add(item)
        return tuple(value)

    def package_name(self, table: dict[str, Any], key: str) -> str:
        value = self.string(table, key, "build.")
        if not _PACKAGE_RE.match(value):
            raise self.fail(
                f"build.{key}",
                f"is {value!r}, which is not a Debian package name",
                "use the package's name as apt knows it",
            )
        return value

    def url(self, table: dict[str, Any], key: str, *, required: bool = True) -> str:
        value = self.string(table, key, "download.", required=required)
        if value and urllib.parse.urlsplit(value).scheme not in ("http", "https", "file"):
            raise self.fail(
                f"download.{key}",
                f"is {value!r}, which is not an http(s) or file URL",
                "write the full URL, starting with https://",
            )
        return value

    def table(self, data: dict[str, Any], key: str) -> dict[str, Any]:
        value = data[key]
        if not isinstance(value, dict):
            raise self.fail(
                key,
                f"must be a table ([{key}] section), not {_describe(value)}",
                f"write the keys under a [{key}] header",
            )
        return value

    def string(
        self, table: dict[str, Any], key: str, prefix: str = "", *, required: bool = True
    ) -> str:
        if key not in table:
            if required:  # check_keys has already reported missing required keys
                raise self.fail(prefix + key, "is missing", f'add {key} = "..."')
            return ""
        value = table[key]
        if not isinstance(value, str):
            raise self.fail(
                prefix + key,
                f"must be a string, not {_describe(value)}",
                f'put the value in quotes: {key} = "{value}"',
            )
        if required and not value.strip():
            raise self.fail(prefix + key, "is empty", "give it a value")
        return value

    def enum(self, table: dict[str, Any], key: str, kind: type[_E], prefix: str = "") -> _E:
        value = self.string(table, key, prefix)
        choices = [member.value for member in kind]
        try:
            return kind(value)
        except ValueError:
            raise self.fail(
                prefix + key,
                f"is {value!r}, which is not one of {', '.join(choices)}",
                f"{_did_you_mean(value, choices)}use one of: {', '.join(choices)}",
            ) from None

    def check_keys(
        self, table: dict[str, Any], prefix: str, known: tuple[str, ...], required: tuple[str, ...]
    ) -> None:
        for key in table:
            if key not in known:
                section = f"[{prefix.rstrip('.')}]" if prefix else "the top level"
                raise self.fail(
                    prefix + key,
                    "is not known",
                    f"{_did_you_mean(key, known)}known keys at {section}: {', '.join(known)}",
                )
        for key in required:
            if key not in table:
                raise self.fail(prefix + key, "is missing", f"add {key} = ... to the file")


def _did_you_mean(value: str, choices: tuple[str, ...] | list[str]) -> str:
    close = difflib.get_close_matches(value, list(choices), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}? " if close else ""


def _describe(value: object) -> str:
    kinds = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        list: "a list",
        dict: "a table",
        str: "a string",
    }
    return kinds.get(type(value), f"a {type(value).__name__}") + f" ({value!r})"
