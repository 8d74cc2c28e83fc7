"""The host's lab registry: which labs `up` made on this host, and where their state lives.

One ``<lab>.json`` per lab in ``paths.registry_dir()`` (the same for every caller, whatever its
``$LABBUILDER_STATE_DIR``), written by `up` before it creates anything and removed by `down`.
`gc` and `list` read it to tell a live lab (its state directory still has its lab.json) from
the leftovers of one whose state is gone, and `down` finds the lab's state directory in it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from labbuilder.common.paths import registry_dir

_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


@dataclass(frozen=True)
class Registration:
    lab: str
    state_dir: Path
    uri: str

    @property
    def has_state(self) -> bool:
        """Whether the lab's state directory still has its lab.json (True when that cannot be
        told: a lab is only ever treated as gone on evidence)."""
        try:
            return (self.state_dir / "lab.json").exists()
        except OSError:
            return True


def is_lab_name(text: str) -> bool:
    """Whether ``text`` can be a lab's name (and so a file name in the registry)."""
    return _NAME.fullmatch(text) is not None


def entry_path(lab: str) -> Path:
    if not is_lab_name(lab):
        raise ValueError(f"{lab!r} is not a lab name")
    return registry_dir() / f"{lab}.json"


def register(lab: str, state_dir: Path, uri: str) -> Registration:
    """Record that ``lab`` is (being) made on this host, with its state in ``state_dir``."""
    path = entry_path(lab)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    record = {"lab": lab, "state_dir": str(state_dir.absolute()), "uri": uri}
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.unlink(missing_ok=True)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as handle:
        handle.write(json.dumps(record, indent=1) + "\n")
    temporary.replace(path)
    return Registration(lab, Path(record["state_dir"]), uri)


def registration(lab: str) -> Registration | None:
    """The lab's entry; None when it has none. Raises ``ValueError`` for an entry that cannot
    be read (callers must then not treat the lab as gone)."""
    path = entry_path(lab)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read the registry entry {path}: {err}") from None
    if not isinstance(data, dict) or data.get("lab") != lab:
        raise ValueError(f"the registry entry {path} is not labbuilder's")
    return Registration(lab, Path(str(data.get("state_dir", ""))), str(data.get("uri", "")))


def registered_labs() -> list[str]:
    """The names of every lab with an entry."""
    folder = registry_dir()
    if not folder.is_dir():
        return []
    return sorted(
        entry.name.removesuffix(".json")
        for entry in folder.iterdir()
        if entry.name.endswith(".json") and is_lab_name(entry.name.removesuffix(".json"))
    )


def unregister(lab: str) -> None:
    entry_path(lab).unlink(missing_ok=True)
