"""The host's images as a user sees them: what the catalog offers, what is cached (downloaded,
built, or baked: a role image made from a download, ``rolebake``), a build's or bake's manifest,
and pruning. Used by ``labbuilder images``."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labbuilder.catalog.files import find_image, load_catalog
from labbuilder.common.errors import ImageError
from labbuilder.common.paths import built_images_dir, state_root
from labbuilder.images.boot import BOOT_FILES
from labbuilder.images.build import BuiltImage, build_image, load_built_image
from labbuilder.images.cache import CachedImage, list_cached, prune, pull
from labbuilder.images.download import ProgressCallback
from labbuilder.images.rolebake import BakedImage, is_bake, load_baked_image


@dataclass(frozen=True)
class ImageRow:
    name: str
    description: str
    sources: str  # "download", "build", "download, build"
    cached: tuple[str, ...]  # what is in the cache: "downloaded <size>", "built <size>"


def built_images(cache_dir: Path) -> list[BuiltImage]:
    folder = built_images_dir(cache_dir)
    if not folder.is_dir():
        return []
    found = []
    for directory in sorted(folder.iterdir()):
        if (directory / "manifest.json").exists() and not is_bake(directory):
            found.append(load_built_image(directory))
    return found


def baked_images(cache_dir: Path) -> list[BakedImage]:
    folder = built_images_dir(cache_dir)
    if not folder.is_dir():
        return []
    return [load_baked_image(d) for d in sorted(folder.iterdir()) if is_bake(d)]


def image_rows(cache_dir: Path) -> list[ImageRow]:
    downloads = list_cached(cache_dir)
    builds = built_images(cache_dir)
    bakes = baked_images(cache_dir)
    rows = []
    for name, entry in sorted(load_catalog().items()):
        sources = ", ".join(
            kind
            for kind, present in (("download", entry.download), ("build", entry.build))
            if present
        )
        cached = [f"downloaded {_mb(d.size)}" for d in downloads if d.name == name]
        cached += [f"built {_mb(b.file_size)}" for b in builds if b.name == name]
        cached += [
            f"baked {b.name} {_mb(b.file_size)}"
            for b in bakes
            if b.manifest.get("source", {}).get("image") == name
        ]
        rows.append(ImageRow(name, entry.description, sources, tuple(cached)))
    return rows


def pull_image(name: str, cache_dir: Path, progress: ProgressCallback | None = None) -> CachedImage:
    entry = find_image(name)
    if entry.download is None:
        raise ImageError(
            f"image {name} has no download source", f"build it: `labbuilder images build {name}`"
        )
    return pull(entry, cache_dir, progress)


def build(name: str, cache_dir: Path, *, force: bool, log: Callable[[str], None]) -> BuiltImage:
    entry = find_image(name)
    if entry.build is None:
        raise ImageError(
            f"image {name} has no local build recipe", f"pull it: `labbuilder images pull {name}`"
        )
    return build_image(entry.name, entry.build, built_images_dir(cache_dir), force=force, log=log)


def show(name: str, cache_dir: Path) -> dict[str, Any]:
    """The provenance of a cached image: a build's or bake's manifest, or a download's record."""
    builds: list[BuiltImage | BakedImage] = [*built_images(cache_dir), *baked_images(cache_dir)]
    named = [b for b in builds if b.name == name]
    if named:
        newest = max(named, key=lambda b: str(b.manifest.get("built_at", "")))
        return dict(newest.manifest) | {"path": str(newest.disk)}
    downloads = [d for d in list_cached(cache_dir) if d.name == name]
    if downloads:
        newest_download = max(downloads, key=lambda d: d.pulled_at)
        return {
            "name": newest_download.name,
            "path": str(newest_download.path),
            "url": newest_download.url,
            "digest": f"{newest_download.algorithm}:{newest_download.digest}",
            "size": newest_download.size,
            "pulled_at": newest_download.pulled_at,
            "verified": newest_download.verified,
            "signed_by": newest_download.signed_by,
        }
    raise ImageError(
        f"image {name} is not in the cache",
        f"`labbuilder images build {name}` or `labbuilder images pull {name}`",
    )


def images_in_use() -> set[str]:
    """Digests of the images that labs on this host were brought up with."""
    used = set()
    labs = state_root() / "labs"
    if labs.is_dir():
        for record in labs.glob("*/lab.json"):
            image = json.loads(record.read_text()).get("image", {})
            if image.get("digest"):
                used.add(image["digest"])
    return used


def prune_images(cache_dir: Path) -> list[Path]:
    """Remove downloads and builds that no lab uses, keeping the newest of each image."""
    used = images_in_use()
    keep = {d.path.name for d in list_cached(cache_dir) if d.digest in used}
    keep |= {name for name in load_catalog()}
    keep |= {f"{name}.{kind}" for name in load_catalog() for kind in BOOT_FILES}
    removed = prune(cache_dir, keep)
    newest: dict[str, BuiltImage | BakedImage] = {}
    builds: list[BuiltImage | BakedImage] = [*built_images(cache_dir), *baked_images(cache_dir)]
    for built in builds:
        current = newest.get(built.name)
        if current is None or built.manifest.get("built_at", "") > current.manifest.get(
            "built_at", ""
        ):
            newest[built.name] = built
    for built in builds:
        if built is not newest.get(built.name) and built.sha256 not in used:
            shutil.rmtree(built.directory)
            removed.append(built.directory)
    return removed


def _mb(size: int) -> str:
    return f"{size / 2**20:.0f} MB"
