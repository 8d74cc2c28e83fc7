"""Which file a lab's nodes boot from: a local build, or a verified download, from the cache.

A catalog entry with a ``[build]`` recipe is built natively (or found built) in the cache; an
entry with only ``[download]`` is pulled (0 bytes when it is cached already). Either way the
result is a ``BaseImage``: the disk the overlays sit on, and how it boots.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from labbuilder.catalog import find_image
from labbuilder.errors import ImageError
from labbuilder.imagebuild import build_image
from labbuilder.imagecache import default_cache_dir, pull
from labbuilder.imagemodel import CloudInitFlavour, ImageEntry


@dataclass(frozen=True)
class BaseImage:
    name: str
    disk: Path  # qcow2
    digest: str  # identifies the content; names the shared volumes
    kernel: Path | None  # direct kernel boot, or None to boot the disk's own boot loader
    initrd: Path | None
    cmdline: str | None
    cloud_init: CloudInitFlavour
    default_user: str

    @property
    def volume_stem(self) -> str:
        return f"base-{self.name}-{self.digest[:16]}"


def built_images_dir(cache_dir: Path) -> Path:
    return cache_dir / "built"


def resolve_base_image(
    name: str,
    *,
    cache_dir: Path | None = None,
    base_dir: Path | None = None,
    log: Callable[[str], None] | None = None,
) -> BaseImage:
    """The base image for a lab's ``image`` key, built or pulled into the cache as needed."""
    cache = cache_dir or default_cache_dir()
    entry = find_image(name, base_dir=base_dir)
    if entry.build is not None and shutil.which("mmdebstrap"):
        return _from_build(entry, cache, log)
    if entry.download is not None:
        cached = pull(entry, cache)
        return BaseImage(
            name=_volume_safe(entry.name),
            disk=cached.path,
            digest=cached.digest,
            kernel=None,
            initrd=None,
            cmdline=None,
            cloud_init=entry.cloud_init,
            default_user=entry.default_user,
        )
    raise ImageError(
        f"image {name} can only be built locally, and mmdebstrap is missing",
        "apt-get install mmdebstrap (scripts/setup-host installs it)",
    )


def _from_build(entry: ImageEntry, cache: Path, log: Callable[[str], None] | None) -> BaseImage:
    assert entry.build is not None
    built = build_image(entry.name, entry.build, built_images_dir(cache), log=log)
    return BaseImage(
        name=entry.name,
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
