"""Which file a lab's nodes boot from: a local build, or a verified download, from the cache.

A catalog entry with a ``[build]`` recipe is built natively (or found built) in the cache; an
entry with only ``[download]`` is pulled (0 bytes when it is cached already), with its kernel
and initrd when the entry boots by direct kernel boot (``kernel_url``, ``initrd_url``,
``cmdline``). Either way the result is a ``BaseImage``: the disk the overlays sit on, and how
it boots.

``resolve_role_image`` adds a role's packages and masked units: a build installs them over
the base build's tree (``imagebuild``), a download is booted once and saved (``rolebake``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

from labbuilder.catalog.files import find_image, local_image_problem
from labbuilder.catalog.model import BaseImage, DiskFormat, ImageEntry
from labbuilder.common.errors import ImageError, ImageRefusedError
from labbuilder.common.paths import built_images_dir, default_cache_dir
from labbuilder.images.bakeseed import input_problem
from labbuilder.images.build import build_image
from labbuilder.images.cache import CachedImage, pull

BOOT_FILES = ("vmlinuz", "initrd")  # a direct-boot download's extra files, cached as <name>.<kind>
_log = logging.getLogger(__name__)


def resolve_base_image(
    name: str,
    *,
    cache_dir: Path | None = None,
    base_dir: Path | None = None,
    log: Callable[[str], None] | None = None,
    catalog: Mapping[str, ImageEntry] | None = None,
) -> BaseImage:
    """The base image for a lab's ``image`` key, built or pulled into the cache as needed.

    ``catalog`` replaces the catalog in ``images/`` (``catalog.load_catalog``)."""
    cache = cache_dir or default_cache_dir()
    entry = find_image(name, catalog=catalog, base_dir=base_dir)
    if entry.build is not None and shutil.which("mmdebstrap"):
        return _from_build(entry, cache, log)
    if entry.download is not None:
        return _from_download(entry, pull(entry, cache), cache)
    raise _cannot_build(name)


def resolve_role_image(
    name: str,
    *,
    role: str,
    packages: tuple[str, ...],
    masked_units: tuple[str, ...],
    build_script: tuple[str, str] | None = None,
    cache_dir: Path | None = None,
    base_dir: Path | None = None,
    libvirt_uri: str = "qemu:///system",
    log: Callable[[str], None] | None = None,
    catalog: Mapping[str, ImageEntry] | None = None,
) -> BaseImage:
    """The image of a role's nodes: the base image ``name`` with ``packages`` installed and
    ``masked_units`` masked (services that must not start before they are configured), and
    ``build_script`` (file name, text) run in its tree once they are installed.

    Without packages and masked units it is the base image. An entry with a ``[build]``
    recipe (and mmdebstrap on the host) is built with them as image ``<name>-<role>``; an
    entry with only ``[download]`` is pulled, then booted once under ``libvirt_uri`` and saved
    (``rolebake.bake``). Both are cached: asking again does no work.
    """
    if not packages and not masked_units and build_script is None:
        return resolve_base_image(
            name, cache_dir=cache_dir, base_dir=base_dir, log=log, catalog=catalog
        )
    problem = input_problem(role, packages, masked_units)
    if problem is not None:
        raise ImageError(f"role image of {name} for role {role}: {problem}")
    # Imported here: rolebake → probecache → probe → adapters.hostprobe → this module.
    from labbuilder.images import rolebake

    cache = cache_dir or default_cache_dir()
    entry = find_image(name, catalog=catalog, base_dir=base_dir)
    if entry.build is not None and shutil.which("mmdebstrap"):
        return _from_build(
            entry,
            cache,
            log,
            role=role,
            packages=packages,
            masked_units=masked_units,
            build_script=build_script,
        )
    if entry.download is None:
        raise _cannot_build(name)
    if build_script is not None:
        raise ImageError(
            f"role image of {name} for role {role}: its build script {build_script[0]} runs "
            "only in an image labbuilder builds (mmdebstrap), and this image is downloaded",
            "install mmdebstrap on the host, or use a recipe without build scripts",
        )
    cached = pull(entry, cache)
    base = _from_download(entry, cached, cache)
    baked = rolebake.bake(
        base,
        role=role,
        packages=packages,
        masked_units=masked_units,
        cache_dir=cache,
        archive=rolebake.archive_hosts(entry),
        source={
            "image": entry.name,
            "url": cached.url,
            "algorithm": str(cached.algorithm),
            "verified": cached.verified,
            "signed_by": cached.signed_by,
        },
        libvirt_uri=libvirt_uri,
        log=log,
    )
    return BaseImage(
        name=baked.name,
        disk=baked.disk,
        digest=baked.sha256,
        kernel=baked.kernel,
        initrd=baked.initrd,
        cmdline=baked.cmdline,
        cloud_init=entry.cloud_init,
        default_user=entry.default_user,
    )


def boot_file_entry(entry: ImageEntry, kind: str) -> ImageEntry | None:
    """The download of a direct-boot entry's kernel (``kind`` "vmlinuz") or initrd ("initrd"),
    verified against the entry's checksum file like the image; None for a disk that boots
    itself. Cached as image ``<name>.<kind>``."""
    source = entry.download
    if source is None or source.kernel_url is None or source.initrd_url is None:
        return None
    url = source.kernel_url if kind == "vmlinuz" else source.initrd_url
    boot_source = dataclasses.replace(
        source, url=url, format=DiskFormat.RAW, kernel_url=None, initrd_url=None, cmdline=None
    )
    return dataclasses.replace(entry, name=f"{entry.name}.{kind}", download=boot_source, build=None)


def _from_download(entry: ImageEntry, cached: CachedImage, cache: Path) -> BaseImage:
    # A downloaded qcow2 may name a backing or data file: QEMU (and libvirt's relabelling)
    # would then open a file of this host for the guest. Such an image is never used.
    problem = local_image_problem(cached.path)
    if problem is not None:
        rule, hint = problem
        raise ImageRefusedError(f"image {entry.name} ({cached.path}) {rule}", hint)
    kernel = initrd = None
    cmdline = entry.download.cmdline if entry.download is not None else None
    kernel_entry, initrd_entry = (boot_file_entry(entry, kind) for kind in BOOT_FILES)
    if kernel_entry is not None and initrd_entry is not None:
        kernel, initrd = pull(kernel_entry, cache).path, pull(initrd_entry, cache).path
    return BaseImage(
        name=_volume_safe(entry.name),
        disk=cached.path,
        digest=cached.digest,
        kernel=kernel,
        initrd=initrd,
        cmdline=cmdline if kernel is not None else None,
        cloud_init=entry.cloud_init,
        default_user=entry.default_user,
    )


def _cannot_build(name: str) -> ImageError:
    return ImageError(
        f"image {name} can only be built locally, and mmdebstrap is missing",
        "apt-get install mmdebstrap (scripts/setup-host installs it)",
    )


def _from_build(
    entry: ImageEntry,
    cache: Path,
    log: Callable[[str], None] | None,
    *,
    role: str | None = None,
    packages: tuple[str, ...] = (),
    masked_units: tuple[str, ...] = (),
    build_script: tuple[str, str] | None = None,
) -> BaseImage:
    assert entry.build is not None
    name = entry.name if role is None else f"{entry.name}-{role}"
    # A role image is layered on the base build's tree (found in the cache, or built first).
    base = None
    if packages:
        base = build_image(entry.name, entry.build, built_images_dir(cache), log=_log.debug)
    built = build_image(
        name,
        entry.build,
        built_images_dir(cache),
        extra_packages=packages,
        masked_units=masked_units,
        build_script=build_script,
        base=base,
        log=log,
    )
    return BaseImage(
        name=name,
        disk=built.disk,
        digest=built.sha256,
        kernel=built.kernel,
        initrd=built.initrd,
        cmdline=built.kernel_cmdline,
        cloud_init=entry.cloud_init,
        default_user=entry.default_user if entry.default_user != "root" else "labbuilder",
    )


def _volume_safe(name: str) -> str:
    """Image names from URLs become short, volume-safe names."""
    if all(c.isalnum() or c in ".-" for c in name):
        return name
    return "url-" + hashlib.sha256(name.encode()).hexdigest()[:12]
