"""Build a bootable Debian cloud image natively with mmdebstrap, cached by a hash of its recipe.

``build_image`` returns a ``BuiltImage`` from ``cache_dir/<name>-<hash[:16]>/``, building it
first unless a build with the same recipe hash is there. The directory holds:

* ``disk.qcow2``: read-only base, zstd-compressed qcow2; a whole-disk ext4 labelled ``lbroot``
  (no partition table, no boot loader). Nodes get a thin qcow2 overlay on it, grown to the
  lab's disk size; cloud-init's resizefs grows the filesystem on first boot;
* ``vmlinuz`` and ``initrd.img``: for libvirt direct kernel boot with
  ``BuiltImage.kernel_cmdline``; the disk must be a virtio disk, and so must the NoCloud seed
  (the cloud kernel has no AHCI);
* ``manifest.json``: source, package versions, builder version, build time, recipe hash,
  the disk's sha256, and the units masked for the configuring stage to unmask;
* ``rootfs.tar`` (a base image only): its finished tree, which its role images are layered
  on: a role image's build unpacks it and installs only the role's packages
  (``rootfs.layer_argv``), so what every image shares is downloaded and configured once, and
  the role images of a lab can be built side by side.

The image carries no per-machine identity (see ``labbuilder.images.rootfs``). A build runs in a
temporary directory inside ``cache_dir`` and is renamed into place when complete, so a failed or
interrupted build leaves nothing that looks like an image. Builds of different images run in
parallel; two builds of the same image take turns (a lock file per image name).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from labbuilder import __version__
from labbuilder.catalog.model import BuildRecipe
from labbuilder.common.errors import HostError, ImageError
from labbuilder.common.filelock import file_lock
from labbuilder.common.paths import KERNEL_FILE
from labbuilder.common.sizes import parse_size
from labbuilder.images import rootfs
from labbuilder.images.rootfs import Log

BUILDER_VERSION = "2"  # bump when the build changes in a way recipe_hash cannot see
MANIFEST_FORMAT = 1
DISK_FILE = "disk.qcow2"
INITRD_FILE = "initrd.img"
MANIFEST_FILE = "manifest.json"
MIN_FREE_BYTES = 3 * 1024**3

_UNIT = re.compile(r"^[A-Za-z0-9@._:-]+\.(service|socket|timer|path|target|mount)$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_PACKAGE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltImage:
    """A built image in the cache: a read-only qcow2 base plus its kernel, initrd and manifest."""

    name: str
    directory: Path
    disk: Path  # qcow2, whole-disk ext4 labelled ROOT_LABEL, no partition table
    kernel: Path
    initrd: Path
    kernel_cmdline: str
    virtual_size: int  # bytes
    file_size: int  # bytes of the qcow2 file
    sha256: str  # of the qcow2 file
    recipe_hash: str
    masked_units: tuple[str, ...]  # masked for the configuring stage to unmask
    manifest_path: Path
    manifest: Mapping[str, Any] = field(compare=False, repr=False)
    from_cache: bool = False


def recipe_hash(
    recipe: BuildRecipe,
    builder_version: str,
    *,
    extra_packages: tuple[str, ...] = (),
    masked_units: tuple[str, ...] = (),
    build_script: tuple[str, str] | None = None,
) -> str:
    """Return the hex sha256 identifying what ``build_image`` would build from these inputs.

    Covers the recipe (packages as a set, size in bytes), the role's extra packages, masked
    units and build script, ``builder_version`` and the builder's own fixed choices (boot packages,
    kernel command line, cloud-init settings), so any change to them means a rebuild.
    """
    doc = {
        "builder_version": builder_version,
        "builder": [
            rootfs.BOOT_PACKAGES,
            rootfs.POLICY_MASKED_UNITS,
            rootfs.POLICY_DISABLED_UNITS,
            rootfs.IDENTITY_FILES,
            rootfs.DPKG_EXCLUDES,
            rootfs.INITRD_MODULES,
            rootfs.NETWORKD_DROPIN_INTERFACES,
        ],
        "texts": [
            rootfs.KERNEL_CMDLINE,
            rootfs.CLOUD_CFG,
            rootfs.HOSTS,
            rootfs.FSTAB,
            rootfs.NETWORKD_DROPIN,
        ],
        "variant": rootfs.VARIANT,
        "suite": recipe.suite,
        "mirror": recipe.mirror.rstrip("/"),
        "packages": sorted(set(recipe.packages)),
        "kernel_package": recipe.kernel_package,
        "size": _virtual_size(recipe),
        "extra_packages": sorted(set(extra_packages) - set(recipe.packages)),
        "masked_units": sorted(set(masked_units)),
    }
    if build_script is not None:  # absent otherwise: builds without one keep their hashes
        doc["build_script"] = list(build_script)
    if doc["extra_packages"]:  # a role image: the hook that layers it on its base is part of it
        doc["layer_hook"] = rootfs.layer_hook().read_text()
    blob = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def build_image(
    name: str,
    recipe: BuildRecipe,
    cache_dir: Path,
    *,
    extra_packages: tuple[str, ...] = (),
    masked_units: tuple[str, ...] = (),
    build_script: tuple[str, str] | None = None,
    force: bool = False,
    base: BuiltImage | None = None,
    log: Log | None = None,
) -> BuiltImage:
    """Build image ``name`` from ``recipe`` into ``cache_dir``, or return the cached build.

    The result lives in ``cache_dir/<name>-<hash[:16]>/``. A role image passes
    ``extra_packages`` and ``masked_units`` (services that must not start before they are
    configured) and its ``build_script`` (file name, shell text: run in the tree after the
    packages, natively, in mmdebstrap's namespaces); it gets its own hash. With ``base`` (the
    recipe's own build, holding its tree) the role's packages are installed over the base's
    tree; without it, mmdebstrap installs them with the rest. ``force`` rebuilds even when a
    build with the same hash exists (never while a lab's overlays still use it). Needs root.

    ``log`` receives one sentence when the build starts and one when it ends (``image NAME:
    building ...``, ``image NAME: built in N s``); the tools' output goes to the
    ``labbuilder.tools`` logger.
    """
    emit = log or _log.info
    _check_inputs(name, recipe, extra_packages, masked_units)
    digest = recipe_hash(
        recipe,
        BUILDER_VERSION,
        extra_packages=extra_packages,
        masked_units=masked_units,
        build_script=build_script,
    )
    final = cache_dir / f"{name}-{digest[:16]}"
    if not force and (cached := _load_cached(final, digest)) is not None:
        emit(f"image {name}: cache hit {final}")
        return cached
    _check_host(cache_dir)
    tree = _base_tree(base, recipe) if extra_packages else None
    started = time.monotonic()
    with file_lock(cache_dir / f".build-{name}.lock"):
        if not force and (cached := _load_cached(final, digest)) is not None:
            emit(f"image {name}: built meanwhile by another process: {final}")
            return cached
        _remove_stale_builds(cache_dir, name)
        work = cache_dir / f".build-{name}-{digest[:16]}-{os.getpid()}"
        work.mkdir(mode=0o755)
        try:
            _build_into(
                work, name, recipe, digest, extra_packages, masked_units, build_script, tree, emit
            )
            if final.exists():
                shutil.rmtree(final)
            work.rename(final)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    _log.debug("image %s: built %s", name, final)
    emit(f"image {name}: built in {time.monotonic() - started:.0f} s")
    return load_built_image(final, from_cache=False)


def load_built_image(directory: Path, *, from_cache: bool = True) -> BuiltImage:
    """Read a build directory's manifest back into a ``BuiltImage``."""
    manifest_path = directory / MANIFEST_FILE
    try:
        manifest: dict[str, Any] = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        raise ImageError(
            f"cannot read the image manifest {manifest_path}: {exc}",
            hint=f"remove {directory} and build the image again",
        ) from exc
    disk, boot = manifest["disk"], manifest["boot"]
    return BuiltImage(
        name=manifest["name"],
        directory=directory,
        disk=directory / disk["file"],
        kernel=directory / boot["kernel"],
        initrd=directory / boot["initrd"],
        kernel_cmdline=boot["cmdline"],
        virtual_size=disk["virtual_size"],
        file_size=disk["file_size"],
        sha256=disk["sha256"],
        recipe_hash=manifest["recipe_hash"],
        masked_units=tuple(manifest["masked_units"]),
        manifest_path=manifest_path,
        manifest=manifest,
        from_cache=from_cache,
    )


# --- the build --------------------------------------------------------------------------------


def _build_into(
    work: Path,
    name: str,
    recipe: BuildRecipe,
    digest: str,
    extra_packages: tuple[str, ...],
    masked_units: tuple[str, ...],
    build_script: tuple[str, str] | None,
    tree: Path | None,
    log: Log,
) -> None:
    started = time.monotonic()
    root = work / "rootfs"
    packages = sorted(
        {*rootfs.BOOT_PACKAGES, *recipe.packages, recipe.kernel_package, *extra_packages}
    )
    script_hooks: list[str] = []
    if build_script is not None:
        script = work / rootfs.BUILD_SCRIPT_FILE
        script.write_text(build_script[1])
        script_hooks = rootfs.script_hooks(script)
    if tree is None:
        log(f"image {name}: building ({len(packages)} packages from {recipe.mirror})")
        rootfs.run(rootfs.mmdebstrap_argv(recipe, packages, root, script_hooks), stream=True)
    else:
        log(f"image {name}: building ({len(extra_packages)} role packages over its base)")
        rootfs.run(
            rootfs.layer_argv(recipe, tree, root, rootfs.layer_hook(), script_hooks),
            stream=True,
            env={rootfs.LAYER_PACKAGES_ENV: " ".join(sorted(set(extra_packages)))},
        )
    if build_script is not None:
        (work / rootfs.BUILD_SCRIPT_FILE).unlink()
    rootfs.customize_rootfs(root, masked_units)
    installed = rootfs.installed_packages(root)
    enabled = rootfs.enabled_units(root)
    kernel_version = rootfs.copy_boot_files(root, work / KERNEL_FILE, work / INITRD_FILE)
    virtual_size = _fitting_size(root, _virtual_size(recipe))
    disk = work / DISK_FILE
    rootfs.make_disk(root, disk, virtual_size)
    is_base = not extra_packages and not masked_units and build_script is None
    if is_base:
        rootfs.save_tree(root, work / rootfs.TREE_FILE)
    shutil.rmtree(root)
    manifest = {
        "format": MANIFEST_FORMAT,
        "name": name,
        "recipe_hash": digest,
        "builder_version": BUILDER_VERSION,
        "labbuilder_version": __version__,
        "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "build_seconds": round(time.monotonic() - started, 1),
        "source": {"suite": recipe.suite, "mirror": recipe.mirror, "variant": rootfs.VARIANT},
        "layered_on": str(tree.parent.name) if tree is not None else None,
        "tree": rootfs.TREE_FILE if is_base else None,
        "recipe": asdict(recipe),
        "extra_packages": list(extra_packages),
        "requested_packages": packages,
        "masked_units": sorted(set(masked_units)),
        "build_script": None if build_script is None else build_script[0],
        "policy_masked_units": list(rootfs.POLICY_MASKED_UNITS),
        "enabled_units": enabled,
        "packages": installed,
        "boot": {
            "method": "direct-kernel",
            "kernel": KERNEL_FILE,
            "initrd": INITRD_FILE,
            "kernel_version": kernel_version,
            "cmdline": rootfs.KERNEL_CMDLINE,
            "root_label": rootfs.ROOT_LABEL,
        },
        "disk": {
            "file": DISK_FILE,
            "format": "qcow2",
            "layout": "whole-disk ext4, no partition table, no boot loader",
            "virtual_size": virtual_size,
            "file_size": disk.stat().st_size,
            "sha256": _sha256(disk),
        },
    }
    (work / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    work.chmod(0o755)  # libvirt's qemu user must reach the files
    for path in work.iterdir():
        path.chmod(0o444 if path in (disk, work / rootfs.TREE_FILE) else 0o644)


def _base_tree(base: BuiltImage | None, recipe: BuildRecipe) -> Path | None:
    """The tree a role image of ``recipe`` is layered on: ``base``'s, when it is the same
    recipe's build and kept its tree; None to build the role image from scratch."""
    if base is None or base.recipe_hash != recipe_hash(recipe, BUILDER_VERSION):
        return None
    tree = base.directory / rootfs.TREE_FILE
    return tree if tree.is_file() else None


# --- helpers ----------------------------------------------------------------------------------


def _check_inputs(
    name: str, recipe: BuildRecipe, extra: tuple[str, ...], masked: tuple[str, ...]
) -> None:
    if not _NAME.match(name):
        raise ImageError(f"image name {name!r} is not a lower-case name like 'debian-12'")
    for package in (*recipe.packages, recipe.kernel_package, *extra):
        if not _PACKAGE.match(package):
            raise ImageError(f"image {name}: {package!r} is not a Debian package name")
    for unit in masked:
        if not _UNIT.match(unit):
            raise ImageError(
                f"image {name}: {unit!r} is not a systemd unit name",
                hint="name it in full, e.g. 'keystone.service'",
            )


def _check_host(cache_dir: Path) -> None:
    check_root_and_space(
        cache_dir, "building an image", "mmdebstrap must create a root-owned tree", "a build"
    )


def check_root_and_space(folder: Path, what: str, why: str, one: str) -> None:
    """Refuse ``what`` unless running as root with ``MIN_FREE_BYTES`` free under ``folder``."""
    if os.geteuid() != 0:
        raise HostError(f"{what} needs root ({why})", hint="run it as root")
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < MIN_FREE_BYTES:
        raise HostError(
            f"only {free // 1024**2} MiB free under {folder}; {one} needs about 3 GiB",
            hint="free some space or point the image cache elsewhere",
        )


def _load_cached(final: Path, digest: str) -> BuiltImage | None:
    if not (final / MANIFEST_FILE).is_file():
        return None
    try:
        built = load_built_image(final)
    except (ImageError, KeyError, TypeError):
        return None
    if built.recipe_hash != digest or not built.disk.is_file():
        return None
    if built.disk.stat().st_size != built.file_size:
        return None
    return built


def _remove_stale_builds(cache_dir: Path, name: str) -> None:
    """Remove temporary build directories of ``name`` left by processes that died (the
    caller holds ``name``'s lock: no live build of it can own one)."""
    stale = re.compile(rf"^\.build-{re.escape(name)}-[0-9a-f]{{16}}-[0-9]+$")
    for path in cache_dir.iterdir():
        if stale.match(path.name) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest()


def _fitting_size(root: Path, minimum: int) -> int:
    """A disk size that holds the files under ``root`` in ext4, at least ``minimum`` bytes.

    A role image with many packages (a controller with every chapter's services) outgrows the
    recipe's size; the disk then grows to the next whole GiB that holds the files with room
    for ext4's journal, inode tables and reserved blocks. The recipe's size stays the minimum,
    so images that fit keep their size (and their cache key)."""
    used = 0
    for directory, _dirs, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                used += (Path(directory) / name).lstat().st_blocks * 512
    gib = 1024**3
    needed = int(used * 1.2) + 320 * 1024**2
    return max(minimum, -(-needed // gib) * gib)


def _virtual_size(recipe: BuildRecipe) -> int:
    """The recipe's size in bytes, rounded up to a whole MiB."""
    try:
        size = parse_size(recipe.size)
    except ValueError as exc:
        raise ImageError(f"image size {recipe.size!r} {exc}", hint='write it like "2 GiB"') from exc
    mib = 1024**2
    return -(-size // mib) * mib
