"""Where labbuilder keeps state on the host (per lab: logs, keys, secrets, reports)."""

from __future__ import annotations

import os
from pathlib import Path


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
