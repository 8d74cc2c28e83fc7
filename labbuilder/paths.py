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
