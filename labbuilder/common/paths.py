"""Where labbuilder keeps things on the host: state (per lab: logs, keys, secrets, reports) and
the image cache."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

KERNEL_FILE = "vmlinuz"  # a built image's direct-boot kernel, beside its disk


def state_root(environ: dict[str, str] | None = None) -> Path:
    """``$LABBUILDER_STATE_DIR``, else /var/lib/labbuilder for root, else the XDG state dir."""
    env = os.environ if environ is None else environ
    if env.get("LABBUILDER_STATE_DIR"):
        return Path(env["LABBUILDER_STATE_DIR"])
    if os.geteuid() == 0:
        return Path("/var/lib/labbuilder")
    xdg = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "labbuilder"


def lab_dir(lab: str, environ: dict[str, str] | None = None) -> Path:
    return state_root(environ) / "labs" / lab


def pool_name(environ: dict[str, str] | None = None) -> str:
    """The libvirt storage pool that holds every lab's disks: ``$LABBUILDER_POOL`` or
    ``labbuilder``. Shared by the labs of a host; base images in it are never modified."""
    env = os.environ if environ is None else environ
    return env.get("LABBUILDER_POOL") or "labbuilder"


def pool_dir(environ: dict[str, str] | None = None) -> Path:
    """Where a new pool keeps its volumes. Not under the state directory: QEMU runs as its own
    user and must reach the disks, while a state directory may sit in a private folder."""
    env = os.environ if environ is None else environ
    if env.get("LABBUILDER_POOL_DIR"):
        return Path(env["LABBUILDER_POOL_DIR"])
    if os.geteuid() == 0:
        return Path("/var/lib/labbuilder/pools") / pool_name(environ)
    xdg = env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "labbuilder" / "pools" / pool_name(environ)


def host_dir(environ: dict[str, str] | None = None) -> Path:
    """Where labbuilder keeps what concerns the whole host, whatever a caller's
    ``$LABBUILDER_STATE_DIR``: /var/lib/labbuilder for root, else the user's XDG state dir.

    Lab names map to libvirt objects of the host, so which labs exist and who is changing one
    must not depend on the state directory a command happens to be given."""
    env = os.environ if environ is None else environ
    if os.geteuid() == 0:
        return Path("/var/lib/labbuilder")
    xdg = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "labbuilder"


def registry_dir(environ: dict[str, str] | None = None) -> Path:
    """The host's lab registry: ``<lab>.json`` per lab that `up` made (its state directory,
    its libvirt URI)."""
    return host_dir(environ) / "registry"


def lock_dir(environ: dict[str, str] | None = None) -> Path:
    """The labs' locks, one ``<lab>.lock`` per lab name: /run/labbuilder/locks for root, else
    under ``$XDG_RUNTIME_DIR`` (or the user's host directory)."""
    env = os.environ if environ is None else environ
    if os.geteuid() == 0:
        return Path("/run/labbuilder/locks")
    if env.get("XDG_RUNTIME_DIR"):
        return Path(env["XDG_RUNTIME_DIR"]) / "labbuilder" / "locks"
    return host_dir(environ) / "locks"


def lab_lock_path(lab: str, environ: dict[str, str] | None = None) -> Path:
    return lock_dir(environ) / f"{lab}.lock"


def default_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The cache folder for this user, from ``environ`` (default ``os.environ``)."""
    env = os.environ if environ is None else environ
    explicit = env.get("LABBUILDER_CACHE_DIR", "")
    if explicit:
        return Path(explicit).expanduser()
    xdg = env.get("XDG_CACHE_HOME", "")
    if xdg and Path(xdg).is_absolute():  # the XDG spec says to ignore relative paths
        return Path(xdg) / "labbuilder"
    home = env.get("HOME", "")
    return (Path(home) if home else Path.home()) / ".cache" / "labbuilder"


def built_images_dir(cache_dir: Path) -> Path:
    """Where the image cache ``cache_dir`` keeps the images built on this host."""
    return cache_dir / "built"
