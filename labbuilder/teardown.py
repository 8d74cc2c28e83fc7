"""``down`` and ``gc``: remove what labbuilder made, found through libvirt's own state.

Domains and networks carry labbuilder metadata and volumes carry the lab in their names, so a
lab is removed completely even after a crash or a killed ``up``, without any side database.
"""

from __future__ import annotations

import contextlib
import fnmatch
import shutil
from dataclasses import dataclass, field
from typing import Any

from labbuilder.adapters import firewall, storage
from labbuilder.adapters import libvirt as lv
from labbuilder.filelock import file_lock
from labbuilder.labstate import LabState, lab_lock, lab_state
from labbuilder.paths import pool_name, state_root


@dataclass
class Removed:
    domains: list[str] = field(default_factory=list)
    networks: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)
    firewall: bool = False
    state_dir: str | None = None

    def count(self) -> int:
        return len(self.domains) + len(self.networks) + len(self.volumes)


def remove_lab_objects(conn: Any, lab: str) -> Removed:
    """Every domain, network, volume and firewall rule of ``lab`` on the host."""
    removed = Removed()
    for domain in lv.owned_domains(conn, lab):
        removed.domains.append(domain.name())
        lv.remove_domain(domain)
    for network in lv.owned_networks(conn, lab):
        removed.networks.append(network.name())
        lv.remove_network(network)
    pool = storage.find_pool(conn, pool_name())
    if pool is not None:
        for volume in storage.lab_volumes(pool, lab):
            removed.volumes.append(volume.name())
            storage.delete_volume(volume)
    if lab in firewall.owned_labs():
        firewall.remove_egress(lab)
        removed.firewall = True
    return removed


def down(lab: str, uri: str, *, state: LabState | None = None) -> Removed:
    """Remove the lab from the host: libvirt objects, firewall rules and its state directory."""
    state = state or lab_state(lab)
    with lab_lock(state, "labbuilder down"):
        conn = lv.connect(uri)
        try:
            removed = remove_lab_objects(conn, lab)
        finally:
            conn.close()
        if state.directory.exists():
            removed.state_dir = str(state.directory)
            # The lock file lives in the directory; its open handle keeps the lock until we leave.
            for child in state.directory.iterdir():
                if child.name == "lock":
                    continue
                if child.is_dir():
                    shutil.rmtree(child)
                else:
                    child.unlink()
    lock = state.directory / "lock"
    lock.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        state.directory.rmdir()
    return removed


def labs_on_host(conn: Any) -> dict[str, dict[str, int]]:
    """Labs that have anything on this host: counts of domains, networks, volumes, state."""
    labs: dict[str, dict[str, int]] = {}

    def count(lab: str, kind: str) -> None:
        labs.setdefault(lab, {"domains": 0, "networks": 0, "volumes": 0, "state": 0})[kind] += 1

    for domain in lv.owned_domains(conn):
        count(lv.owner_lab(domain.XMLDesc(0)) or "?", "domains")
    for network in lv.owned_networks(conn):
        count(lv.owner_lab(network.XMLDesc(0)) or "?", "networks")
    pool = storage.find_pool(conn, pool_name())
    if pool is not None:
        for volume in storage.lab_volumes(pool):
            count(storage.volume_lab(volume.name()) or "?", "volumes")
    labs_dir = state_root() / "labs"
    if labs_dir.is_dir():
        for entry in labs_dir.iterdir():
            if (entry / "lab.json").exists():
                count(entry.name, "state")
    return labs


def busy(state: LabState) -> bool:
    """Whether an `up` or `down` of the lab is running right now (it holds the lab's lock)."""
    lock = state.directory / "lock"
    if not lock.exists():
        return False
    with file_lock(lock, blocking=False) as locked:
        return not locked


def gc(uri: str, match: str = "*") -> dict[str, Removed]:
    """Remove objects of labs that no longer exist (no state directory, so no `up` made them
    that `down` could still find): the leftovers of crashes and deleted state."""
    conn = lv.connect(uri)
    try:
        removed = {}
        labs = set(labs_on_host(conn)) | firewall.owned_labs()
        for lab in sorted(labs):
            if not fnmatch.fnmatchcase(lab, match):
                continue
            state = lab_state(lab)
            if (state.directory / "lab.json").exists() or busy(state):
                continue
            removed[lab] = remove_lab_objects(conn, lab)
        return removed
    finally:
        conn.close()
