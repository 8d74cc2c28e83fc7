"""``down`` and ``gc``: remove what labbuilder made for a lab, and nothing else.

Domains and networks carry labbuilder metadata (the lab, its state directory and lock) and
volumes in labbuilder's own pool carry the lab in their names, so a lab is removed completely
even after a crash or a killed ``up``. Whether a lab is still alive is decided from host-wide
facts only, never from the caller's own state directory alone: the lab's lock (held by ``up``,
``down``, ``install`` and ``snapshot``), the host's lab registry
(``labbuilder.lifecycle.registry``) and the state directories that the registry and the
metadata name.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from labbuilder.adapters import firewall, netns
from labbuilder.adapters import libvirt as lv
from labbuilder.adapters.hypervisor import Hypervisor
from labbuilder.common.errors import HypervisorError, LabbuilderError
from labbuilder.common.filelock import file_lock, is_locked
from labbuilder.common.paths import lab_dir, lab_lock_path, pool_dir, pool_name, state_root
from labbuilder.lab.planner import NAMESPACE_PREFIX, lab_tag, namespace_name
from labbuilder.lifecycle import registry, snapshots, templates
from labbuilder.lifecycle.state import LabState, lab_lock, lab_state

# What labbuilder writes into a lab's state directory; `down` removes these and nothing else.
STATE_FILES = frozenset(
    {
        "lab.json",
        "secrets.json",
        "id_ed25519",
        "id_ed25519.pub",
        "ssh_config",
        "known_hosts",
        "lock",  # the lab's lock before it moved to the host's lock directory
    }
)
STATE_FOLDERS = frozenset(
    {"console", "host-keys", "logs", "reports", "verify"}
)  # verify: Tempest's workspaces


@dataclass
class Removed:
    domains: list[str] = field(default_factory=list)
    networks: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)
    firewall: bool = False
    gateway: bool = False  # an isolated lab's gateway namespace (and its uplink and veths)
    state_dir: str | None = None
    left: list[str] = field(default_factory=list)  # state entries labbuilder did not make
    returned: str | None = None  # a kept lab brought back from this snapshot (see gc)

    def count(self) -> int:
        return len(self.domains) + len(self.networks) + len(self.volumes)


def remove_lab_objects(hypervisor: Hypervisor, lab: str) -> Removed:
    """Every domain, network, volume and firewall rule of ``lab`` on the host: the objects
    whose metadata, name in labbuilder's pool or rule comment says that ``lab`` owns them."""
    removed = Removed()
    for domain in hypervisor.domains(lab):
        removed.domains.append(domain.name)
        hypervisor.remove_domain(domain.name)
    removed.gateway = remove_gateway(lab)
    for network in hypervisor.networks(lab):
        removed.networks.append(network.name)
        hypervisor.remove_network(network.name)
    try:
        volumes = hypervisor.lab_volumes(pool_name(), str(pool_dir()), lab)
    except HypervisorError:
        volumes = []  # a pool that cannot start holds no volume anyone can reach; go on
    for volume in volumes:
        removed.volumes.append(volume.name)
        hypervisor.delete_volume(volume)
    if lab in firewall.owned_labs():
        firewall.remove_egress(lab)
        removed.firewall = True
    return removed


def remove_gateway(lab: str) -> bool:
    """An isolated lab's gateway namespace, its uplink and its veths (found by their names,
    which derive from the lab's name: a killed `up` left no record of them)."""
    tag = lab_tag(lab)
    return netns.remove_gateway(namespace_name(lab), [f"lbg{tag}{i}" for i in range(8)])


def gateway_labs() -> set[str]:
    """Labs that have a gateway namespace on this host."""
    return {name.removeprefix(NAMESPACE_PREFIX) for name in netns.namespaces(NAMESPACE_PREFIX)}


def lab_state_of(lab: str) -> LabState:
    """The lab's state: the directory its registry entry names, else the caller's own (labs
    made before the registry existed)."""
    with contextlib.suppress(ValueError):
        entry = registry.registration(lab)
        if entry is not None:
            return lab_state(lab, entry.state_dir)
    return lab_state(lab)


def down(lab: str, uri: str, *, state: LabState | None = None) -> Removed:
    """Remove the lab from the host: libvirt objects, firewall rules, the files labbuilder
    wrote in its state directory, and its registry entry."""
    state = state or lab_state_of(lab)
    with lab_lock(state, "labbuilder down"):
        with lv.LibvirtHypervisor.open(uri) as hypervisor:
            removed = remove_lab_objects(hypervisor, lab)
        if state.directory.is_symlink():
            removed.left = [str(state.directory)]  # not followed, not removed
        elif state.directory.is_dir():
            removed.state_dir = str(state.directory)
            removed.left = remove_state_files(state.directory)
        registry.unregister(lab)
    return removed


def remove_state_files(directory: Path) -> list[str]:
    """Remove what labbuilder writes in a lab's state directory, and the directory if it is
    then empty; return the entries left (not labbuilder's). Never follows a symbolic link:
    a link where labbuilder keeps a folder is left alone, one inside its folders is removed
    as a link."""
    left = []
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        kind = entry.stat(follow_symlinks=False).st_mode
        temporary = entry.name.endswith((".tmp", ".new")) and _known_file(
            _temporary_base(entry.name)
        )
        if stat.S_ISREG(kind) and (_known_file(entry.name) or temporary):
            Path(entry.path).unlink()
        elif stat.S_ISDIR(kind) and entry.name in STATE_FOLDERS:
            _remove_tree(Path(entry.path))
        else:
            left.append(entry.name)
    if not left:
        with contextlib.suppress(OSError):
            directory.rmdir()
    return left


def _known_file(name: str) -> bool:
    return name in STATE_FILES


def _temporary_base(name: str) -> str:
    """The file a temporary file is written for: ``x.tmp``, ``.x.<random>.tmp`` or ``.new``
    (left by a writer that was killed)."""
    base = name.removesuffix(".tmp").removesuffix(".new")
    if base.startswith("."):
        base = base[1:].rsplit(".", 1)[0]
    return base


def _remove_tree(folder: Path) -> None:
    """Remove a folder of labbuilder's, its links as links (``shutil.rmtree`` would also do
    this, but here it is spelled out: nothing below is ever followed)."""
    for entry in os.scandir(folder):
        if entry.is_dir(follow_symlinks=False):
            _remove_tree(Path(entry.path))
        else:
            Path(entry.path).unlink()
    folder.rmdir()


def labs_on_host(hypervisor: Hypervisor) -> dict[str, dict[str, int]]:
    """Labs that have anything on this host: counts of domains, networks, volumes, and
    ``state`` 1 when the lab's state (lab.json) exists where the registry, the objects'
    metadata or the caller's state directory say."""
    labs: dict[str, dict[str, int]] = {}

    def count(lab: str, kind: str) -> None:
        labs.setdefault(lab, {"domains": 0, "networks": 0, "volumes": 0, "state": 0})[kind] += 1

    for domain in hypervisor.domains():
        count(domain.lab or "?", "domains")
    for network in hypervisor.networks():
        count(network.lab or "?", "networks")
    for volume in hypervisor.lab_volumes(pool_name(), str(pool_dir())):
        count(volume.lab or "?", "volumes")
    for lab in registry.registered_labs():
        labs.setdefault(lab, {"domains": 0, "networks": 0, "volumes": 0, "state": 0})
    for lab, counts in labs.items():
        counts["state"] = int(registry.is_lab_name(lab) and _state_places(hypervisor, lab) != [])
    legacy = state_root() / "labs"
    if legacy.is_dir():
        for entry in legacy.iterdir():
            if entry.name not in labs and (entry / "lab.json").exists():
                count(entry.name, "state")
    return labs


def _metadata(hypervisor: Hypervisor, lab: str) -> list[dict[str, str]]:
    return [domain.metadata for domain in hypervisor.domains(lab)] + [
        network.metadata for network in hypervisor.networks(lab)
    ]


def _state_places(hypervisor: Hypervisor, lab: str) -> list[str]:
    """Where the lab's lab.json exists (or cannot be looked at): the state directories its
    registry entry, its objects' metadata and the caller's state directory name."""
    places = [str(lab_dir(lab))]
    try:
        entry = registry.registration(lab)
    except ValueError as err:
        return [str(err)]  # an entry nobody can read: the lab is kept
    if entry is not None:
        places.append(str(entry.state_dir))
    places += [meta["state"] for meta in _metadata(hypervisor, lab) if meta.get("state")]
    found = []
    for place in dict.fromkeys(places):
        try:
            if (Path(place) / "lab.json").exists():
                found.append(place)
        except OSError:
            found.append(place)
    return found


def _busy_elsewhere(hypervisor: Hypervisor, lab: str) -> bool:
    """Whether another lock of the lab is held: one its objects' metadata names (a lab of
    another user), or the one labs kept in their state directory before the lock directory."""
    locks = [Path(meta["lock"]) for meta in _metadata(hypervisor, lab) if meta.get("lock")]
    locks.append(lab_dir(lab) / "lock")
    with contextlib.suppress(ValueError):
        entry = registry.registration(lab)
        if entry is not None:
            locks.append(entry.state_dir / "lock")
    for lock in dict.fromkeys(locks):
        if lock == lab_lock_path(lab):
            continue
        try:
            if is_locked(lock):
                return True
        except OSError:
            return True
    return False


@contextlib.contextmanager
def _try_lab_lock(lab: str) -> Iterator[bool]:
    """The lab's lock if nobody holds it (yields False then), as `up` takes it."""
    path = lab_lock_path(lab)
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path, blocking=False) as locked:
        try:
            yield locked
        finally:
            if locked:
                path.unlink(missing_ok=True)


def gc(uri: str, match: str = "*") -> dict[str, Removed]:
    """Remove the objects of labs that no longer exist: the leftovers of crashes, killed `up`s
    and deleted state. A lab is kept while a command holds its lock (``up``, ``down``,
    ``install``, ``snapshot``), or while the state directory that the host's registry, its
    objects' metadata or the caller names still has its lab.json. The lab's lock is held
    while it is checked and removed, so no `up` can start meanwhile."""
    with lv.LibvirtHypervisor.open(uri) as hypervisor:
        removed = {}
        labs = set(labs_on_host(hypervisor))
        labs |= firewall.owned_labs() | set(registry.registered_labs()) | gateway_labs()
        for lab in sorted(labs):
            if not registry.is_lab_name(lab) or not fnmatch.fnmatchcase(lab, match):
                continue
            with _try_lab_lock(lab) as locked:
                if not locked or _busy_elsewhere(hypervisor, lab):
                    continue
                if _state_places(hypervisor, lab):
                    back = _return_if_away(hypervisor, lab)
                    if back is not None:
                        removed[lab] = Removed(returned=back)
                    continue
                removed[lab] = remove_lab_objects(hypervisor, lab)
                entry = registry.registration(lab)
                if entry is not None and entry.uri in ("", uri):
                    registry.unregister(lab)  # else its objects on that URI still need it
        return removed


def _return_if_away(hypervisor: Hypervisor, lab: str) -> str | None:
    """A kept lab that a killed command left away from its own state, brought back."""
    state = lab_state(lab)
    if not (state.directory / snapshots.RETURN_MARKER).exists():
        return None
    try:
        return snapshots.return_if_away(hypervisor, state)
    except LabbuilderError:
        return None  # the next command on the lab tries again, and says why it fails


def gc_templates(uri: str) -> list[str]:
    """Remove what killed `template save`s left: unfinished folders and disk copies."""
    with lv.LibvirtHypervisor.open(uri) as hypervisor:
        return templates.collect_unfinished(hypervisor, pool_name(), pool_dir())
