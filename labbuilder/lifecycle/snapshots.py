"""Live snapshots of a whole lab: every node at one consistent moment, and back to it.

A lab snapshot is an internal libvirt snapshot (memory and disks, kept inside each node's qcow2
disks) of the same name, ``lb-<name>``, on every node of the lab. To capture one moment across
nodes, all nodes are paused, snapshotted in parallel and resumed; to go back, all nodes are
paused, reverted in parallel and resumed together. A snapshot exists on all nodes or on none:
a failed take removes what it made.

Everything ``list`` shows is read from libvirt: each node's snapshot carries a JSON description
(lab, name, creation time, the take's id, the caller's metadata), and the size of the memory
state it keeps comes from the snapshot table of the node's qcow2 disk (read through libvirt's
volume API), so no side database can go stale. ``labbuilder down`` removes snapshots with the
domains and their disks.

Costs (measured under TCG; ``bench/snapshots.py``): a snapshot with memory keeps about the
memory the guest uses in its disk (plus the disk blocks the guest changes afterwards); taking
one pauses the lab for about a second, restoring takes a few seconds. After a restore the
guests' clocks are where they were at the snapshot: ``sync_clocks`` sets them to the host's.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar, cast

from labbuilder.adapters import libvirt as lv
from labbuilder.adapters.hypervisor import Hypervisor
from labbuilder.adapters.ssh import Conversation, SSHSession
from labbuilder.common.errors import (
    DiskSpaceError,
    GuestCommandError,
    GuestTransportError,
    HypervisorError,
    LabbuilderError,
    UsageError,
)
from labbuilder.common.sizes import format_size
from labbuilder.lifecycle.state import LabState, gateway_namespace, lab_lock, load_state_record

PREFIX = "lb-"  # libvirt snapshot names labbuilder owns
# Free disk a snapshot leaves besides its memory state: the guests go on writing, and QEMU
# pauses a guest whose disk cannot grow.
SPACE_MARGIN = 1 << 30
FORMAT = 1  # of the JSON description
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class SnapshotInfo:
    """One lab snapshot as libvirt holds it."""

    name: str  # labbuilder's name (the stage), e.g. "keystone"
    lab: str
    created: float  # seconds since the epoch, when it was taken
    description: str
    nodes: tuple[str, ...]  # nodes that hold it (from the same take)
    missing: tuple[str, ...]  # nodes of the lab that do not
    memory: bool  # every node's memory state is in it (False: disks only, reverting boots)
    meta: Mapping[str, Any] = field(default_factory=dict)  # what the caller stored with it
    disk_bytes: Mapping[str, int] = field(default_factory=dict)  # per node, when measured

    @property
    def complete(self) -> bool:
        return not self.missing

    @property
    def libvirt_name(self) -> str:
        return libvirt_name(self.name)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "lab": self.lab,
            "created": self.created,
            "created_iso": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created)),
            "description": self.description,
            "complete": self.complete,
            "nodes": list(self.nodes),
            "missing": list(self.missing),
            "memory": self.memory,
            "disk_bytes": dict(self.disk_bytes),
            "meta": dict(self.meta),
        }


def libvirt_name(name: str) -> str:
    return PREFIX + name


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise UsageError(
            f"{name!r} is not a valid snapshot name",
            "use letters, digits, '-', '_' and '.', starting with a letter or digit, at most "
            "63 characters (e.g. a stage name such as keystone)",
        )
    return name


# --- reading ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _NodeSnapshot:
    node: str
    name: str
    take: str
    created: float
    description: str
    memory: bool
    meta: Mapping[str, Any]
    disk_bytes: int | None


def lab_nodes(hypervisor: Hypervisor, lab_name: str) -> list[tuple[str, str]]:
    """(node, domain name) of every node of the lab on this host, by node name."""
    nodes = [(domain.node, domain.name) for domain in hypervisor.domains(lab_name)]
    if not nodes:
        raise UsageError(
            f"lab {lab_name} has no nodes on this host", "bring it up with `labbuilder up`"
        )
    return sorted(nodes, key=lambda pair: pair[0])


def _parse(node: str, lab_name: str, xml: str) -> _NodeSnapshot | None:
    """A node's snapshot, if labbuilder took it for this lab."""
    root = ET.fromstring(xml)
    full_name = root.findtext("name", "")
    if not full_name.startswith(PREFIX):
        return None
    try:
        record = json.loads(root.findtext("description", "") or "{}")
    except json.JSONDecodeError:
        return None
    if not isinstance(record, dict) or record.get("labbuilder") != FORMAT:
        return None
    if record.get("lab") != lab_name:
        return None
    memory = root.find("memory")
    created = record.get("created") or float(root.findtext("creationTime", "0") or 0)
    return _NodeSnapshot(
        node=node,
        name=full_name[len(PREFIX) :],
        take=str(record.get("take", "")),
        created=float(created),
        description=str(record.get("description", "")),
        memory=memory is not None and memory.get("snapshot") == "internal",
        meta=record.get("meta") or {},
        disk_bytes=None,
    )


def _collect(
    hypervisor: Hypervisor, lab_name: str, nodes: list[tuple[str, str]]
) -> list[SnapshotInfo]:
    def read(pair: tuple[str, str]) -> tuple[list[str], dict[str, int] | None]:
        xmls = [snapshot.xml for snapshot in hypervisor.snapshots(pair[1])]
        return xmls, hypervisor.snapshot_state_sizes(pair[1])

    found: dict[str, list[_NodeSnapshot]] = {}
    for (node, _), (xmls, sizes) in zip(nodes, raise_first(parallel(nodes, read)), strict=True):
        for xml in xmls:
            parsed = _parse(node, lab_name, xml)
            if parsed is not None:
                size = (sizes or {}).get(libvirt_name(parsed.name))
                found.setdefault(parsed.name, []).append(replace(parsed, disk_bytes=size))
    names = [node for node, _ in nodes]
    infos = []
    for name, held in found.items():
        # Every node's copy must come from the same take: the newest one decides.
        newest = max(held, key=lambda snap: snap.created)
        same = [snap for snap in held if snap.take == newest.take]
        infos.append(
            SnapshotInfo(
                name=name,
                lab=lab_name,
                created=newest.created,
                description=newest.description,
                nodes=tuple(snap.node for snap in same),
                missing=tuple(node for node in names if node not in {s.node for s in same}),
                memory=all(snap.memory for snap in same),
                meta=newest.meta,
                disk_bytes={s.node: s.disk_bytes for s in same if s.disk_bytes is not None},
            )
        )
    return sorted(infos, key=lambda info: (info.created, info.name))


def list_snapshots(hypervisor: Hypervisor, lab_name: str) -> list[SnapshotInfo]:
    """The lab's snapshots, oldest first, each saying which nodes hold it."""
    return _collect(hypervisor, lab_name, lab_nodes(hypervisor, lab_name))


def find_snapshot(hypervisor: Hypervisor, lab_name: str, name: str) -> SnapshotInfo:
    """The lab's snapshot ``name``; a UsageError naming the ones there are if it has none."""
    nodes = lab_nodes(hypervisor, lab_name)
    return _find(_collect(hypervisor, lab_name, nodes), lab_name, name)


def _find(infos: list[SnapshotInfo], lab_name: str, name: str) -> SnapshotInfo:
    for info in infos:
        if info.name == name:
            return info
    known = ", ".join(info.name for info in infos) or "none"
    raise UsageError(
        f"lab {lab_name} has no snapshot {name!r} (it has: {known})",
        "`labbuilder snapshot list` shows the lab's snapshots; "
        "`labbuilder snapshot take NAME` takes one",
    )


# --- taking -----------------------------------------------------------------------------------


def take_snapshot(
    hypervisor: Hypervisor,
    lab_name: str,
    name: str,
    *,
    description: str = "",
    memory: bool = True,
    meta: Mapping[str, Any] | None = None,
) -> SnapshotInfo:
    """Snapshot every node of the lab at one moment: pause all, snapshot all in parallel,
    resume all (also when something failed). A snapshot of the same name is replaced.

    With ``memory`` (the default) running nodes keep their memory state, so a restore finds
    them running as they were; a shut-off node's snapshot holds its disks. libvirt cannot take
    an internal snapshot of a running node without its memory, so ``memory=False`` needs every
    node shut off. ``meta`` (JSON-able) is stored with the snapshot, e.g. a recipe's hash.
    On failure nothing of the new snapshot is left on any node.
    """
    check_name(name)
    full_name = libvirt_name(name)
    nodes = lab_nodes(hypervisor, lab_name)
    running = [node for node, domain in nodes if hypervisor.is_active(domain)]
    if memory:
        check_space(lab_name, name, _space_needs(hypervisor, nodes, full_name))
    if not memory and running:
        raise HypervisorError(
            f"cannot take a snapshot of lab {lab_name} without memory: {', '.join(running)} "
            "running (libvirt takes internal snapshots of a running node only with its memory)",
            "take it with memory (the default), or shut the lab's nodes down first",
        )
    record: dict[str, Any] = {
        "labbuilder": FORMAT,
        "lab": lab_name,
        "take": uuid.uuid4().hex,
        "created": time.time(),
        "description": description,
        "nodes": [node for node, _ in nodes],
        "meta": dict(meta or {}),
    }
    try:
        json.dumps(record)
    except (TypeError, ValueError) as err:
        raise UsageError(f"snapshot metadata is not JSON: {err}") from None

    # Replacing: the old one goes first, so that a failed take leaves no mix of both.
    raise_first(parallel(nodes, lambda pair: hypervisor.delete_snapshot(pair[1], full_name)))

    root = ET.Element("domainsnapshot")
    ET.SubElement(root, "name").text = full_name
    ET.SubElement(root, "description").text = json.dumps(record)
    if not memory:
        ET.SubElement(root, "memory", snapshot="no")
    xml = ET.tostring(root, encoding="unicode")

    paused: list[tuple[str, str]] = []
    outcomes: list[tuple[None, LabbuilderError | None]] = []
    resume_errors: list[str] = []
    try:
        for node, domain in nodes:
            if hypervisor.domain_state(domain) == "running":
                hypervisor.suspend_domain(domain)
                paused.append((node, domain))
        outcomes = parallel(nodes, lambda pair: hypervisor.create_snapshot(pair[1], xml))
    except BaseException:  # interrupted (Ctrl-C) or a node would not pause
        parallel(nodes, lambda pair: hypervisor.delete_snapshot(pair[1], full_name))
        raise
    finally:
        for node, domain in paused:
            try:
                hypervisor.resume_domain(domain)
            except LabbuilderError as resume_error:
                resume_errors.append(f"{node}: {resume_error.message}")

    failed = [(node, err) for (node, _), (_, err) in zip(nodes, outcomes, strict=True) if err]
    if failed:
        made = [pair for pair, (_, err) in zip(nodes, outcomes, strict=True) if err is None]
        raise _take_failed(hypervisor, lab_name, name, failed, made, resume_errors)
    if resume_errors:
        raise HypervisorError(
            f"snapshot {name} of lab {lab_name} was taken, but nodes did not resume: "
            + "; ".join(resume_errors),
            "`labbuilder status` shows the nodes; `labbuilder snapshot restore "
            f"{name}` brings the lab back running",
        )

    return _find(_collect(hypervisor, lab_name, nodes), lab_name, name)


@dataclass(frozen=True)
class SpaceNeed:
    """Disk a snapshot's memory state takes on one node, in the directory of its first
    writable qcow2 disk (where QEMU keeps the state)."""

    node: str
    directory: Path
    size: int  # bytes


def _space_needs(
    hypervisor: Hypervisor, nodes: list[tuple[str, str]], full_name: str
) -> list[SpaceNeed]:
    """What a snapshot with memory adds per running node: its memory now, less the state of a
    snapshot of the same name that the take replaces (its clusters are reused)."""
    needs = []
    for node, name in nodes:
        domain = hypervisor.domain(name)
        if domain is None or not domain.active:
            continue
        paths = hypervisor.writable_disk_paths(name)
        if not paths:
            continue
        replaced = (hypervisor.snapshot_state_sizes(name) or {}).get(full_name, 0)
        memory = domain.memory
        needs.append(SpaceNeed(node, Path(paths[0]).parent, max(0, memory - replaced)))
    return needs


def check_space(lab_name: str, name: str, needs: Sequence[SpaceNeed]) -> None:
    """Refuse a snapshot that would leave less than ``SPACE_MARGIN`` free on a filesystem
    where the nodes keep their disks. Directories not on this host (a remote libvirt) are not
    checked."""
    by_device: dict[int, list[SpaceNeed]] = {}
    for need in needs:
        try:
            by_device.setdefault(need.directory.stat().st_dev, []).append(need)
        except OSError:
            continue
    for group in by_device.values():
        directory = group[0].directory
        free = shutil.disk_usage(directory).free
        total = sum(need.size for need in group)
        if total + SPACE_MARGIN > free:
            raise DiskSpaceError(
                f"snapshot {name} of lab {lab_name} needs about {format_size(total)} of disk "
                f"at {directory} for the memory of "
                + ", ".join(f"{need.node} ({format_size(need.size)})" for need in group)
                + f", and {format_size(SPACE_MARGIN)} must stay free for the guests' writes; "
                f"the disk has {format_size(free)} free",
                "free disk space there, or delete snapshots the lab no longer needs "
                "(`labbuilder snapshot list`, `labbuilder snapshot delete NAME`); "
                "`labbuilder install --no-snapshots` installs without them",
            )


def _take_failed(
    hypervisor: Hypervisor,
    lab_name: str,
    name: str,
    failed: list[tuple[str, LabbuilderError]],
    made: list[tuple[str, str]],
    resume_errors: list[str],
) -> HypervisorError:
    """Remove the snapshot from the nodes that took it, and say what happened."""
    undone = parallel(made, lambda pair: hypervisor.delete_snapshot(pair[1], libvirt_name(name)))
    leftover = [
        f"{node}: {err.message}"
        for (node, _), (_, err) in zip(made, undone, strict=True)
        if err is not None
    ]
    node, first = failed[0]
    message = f"snapshot {name} of lab {lab_name} failed on {node}: {first.message}"
    if len(failed) > 1:
        message += f" (and on {', '.join(other for other, _ in failed[1:])})"
    if leftover:
        message += "; could not remove it again from " + "; ".join(leftover)
    elif made:
        message += f"; removed it again from {', '.join(other for other, _ in made)}"
    if resume_errors:
        message += "; could not resume " + "; ".join(resume_errors)
    return HypervisorError(message, first.hint)


# --- restoring --------------------------------------------------------------------------------


def restore_snapshot(
    hypervisor: Hypervisor, lab_name: str, name: str, *, resume: bool = True
) -> float:
    """Bring every node of the lab back to the snapshot, running (with ``resume=False``, left
    paused if it went well); returns the seconds it took.

    All nodes are paused, reverted in parallel and resumed together, so that no node talks to
    another that is still in the time before. Refused, naming them, if nodes lack the snapshot.
    The guests' clocks come back at the snapshot's time: see ``sync_clocks``.
    """
    check_name(name)
    full_name = libvirt_name(name)
    nodes = lab_nodes(hypervisor, lab_name)
    info = _find(_collect(hypervisor, lab_name, nodes), lab_name, name)
    if info.missing:
        raise HypervisorError(
            f"snapshot {name} of lab {lab_name} is missing on {', '.join(info.missing)} "
            f"(held by {', '.join(info.nodes) or 'no node'}), so the lab cannot go back to it "
            "consistently",
            f"delete it (`labbuilder snapshot delete {name}`) and take it again",
        )
    started = time.monotonic()
    outcomes: list[tuple[None, LabbuilderError | None]] = []
    try:
        for _, domain in nodes:
            if hypervisor.domain_state(domain) == "running":
                hypervisor.suspend_domain(domain)
        outcomes = parallel(
            nodes, lambda pair: hypervisor.revert_snapshot(pair[1], full_name, running=False)
        )
    finally:
        reverted = len(outcomes) == len(nodes) and all(err is None for _, err in outcomes)
        resumed: list[tuple[None, LabbuilderError | None]] = (
            [(None, None)] * len(nodes)
            if reverted and not resume
            else parallel(nodes, lambda pair: _resume_if_paused(hypervisor, pair[1]))
        )
    failed = [
        (node, err) for (node, _), (_, err) in zip(nodes, outcomes, strict=True) if err is not None
    ]
    failed += [
        (node, err) for (node, _), (_, err) in zip(nodes, resumed, strict=True) if err is not None
    ]
    if failed:
        raise HypervisorError(
            f"restoring snapshot {name} of lab {lab_name} failed: "
            + "; ".join(f"{node}: {err.message}" for node, err in failed),
            failed[0][1].hint
            or "the lab's nodes may now be at different moments: restore again, or take the lab "
            "down and up",
        )
    return time.monotonic() - started


def _resume_if_paused(hypervisor: Hypervisor, domain: str) -> None:
    if hypervisor.domain_state(domain) == "paused":
        hypervisor.resume_domain(domain)


CLOCK_SAMPLES = 3  # quick round trips to a node, the shortest one measures its clock

# Runs as root on each node for the whole clock step, answering the host line by line: "now"
# gives the guest's time, "step OFFSET" sets the clock back by OFFSET seconds, "settle" makes
# chrony (where the lab runs it) forget what it measured before the step and measure its
# sources again at once (else it calls them too variable for minutes). bash's EPOCHREALTIME
# reads the clock without starting a process, so a round trip costs no fork; `date` stands in
# on an older bash.
CLOCK_DIALOG = r"""export LC_ALL=C
now() { t=${EPOCHREALTIME:-}; [ -n "$t" ] || t=$(date +%s.%N); }
while read -r word offset; do
  case $word in
    now) now; echo "$t" ;;
    step) now
      date -u -s "@$(awk -v t="$t" -v o="$offset" 'BEGIN { printf "%.6f", t - o }')" \
        >/dev/null || exit 1
      echo stepped ;;
    settle) if command -v chronyc >/dev/null; then
        { chronyc reset sources; chronyc burst 4/4; } >/dev/null 2>&1
      fi
      echo settled ;;
    *) exit 2 ;;
  esac
done
"""


CLOCK_SYNC_TIMEOUT = 60.0  # seconds a resumed node has to answer before it is brought back


def sync_clocks_after_take(hypervisor: Hypervisor, state: LabState, name: str) -> str:
    """``sync_clocks`` after snapshot ``name`` was taken and the lab resumed. A node that does
    not answer (seen under emulation: a resumed node's network silent for minutes, while a
    revert of the same snapshot came up well) is brought back, with the whole lab, from the
    snapshot just taken: the lab as it was when paused, nothing lost. Returns what was done
    about it ("" when every node answered)."""
    try:
        sync_clocks(state, timeout=CLOCK_SYNC_TIMEOUT)
        return ""
    except HypervisorError as err:
        restore_snapshot(hypervisor, state.lab, name)
        sync_clocks(state, timeout=CLOCK_SYNC_TIMEOUT)
        return f"{err.message}; the lab was brought back from snapshot {name}"


def sync_clocks(
    state: LabState,
    *,
    timeout: float = 60.0,
    also: Callable[[str, SSHSession], None] | None = None,
) -> dict[str, float]:
    """Set every node's clock to the host's over SSH (after a restore the guests' clocks are
    at the snapshot's time); returns by how many seconds each clock moved. ``also`` runs in
    the same session on each node afterwards (a class's student key, after a reset).

    Each node is logged in to once and answers a ``CLOCK_DIALOG`` on one channel. Its clock
    is stepped by its offset from the host's, measured around the quickest of a few round
    trips (a time sent from the host would arrive late by a loaded guest's latency, seconds
    under emulation, and the nodes would disagree by as much). Once every node is stepped,
    chrony, where the lab runs it, measures its sources again."""
    record = load_state_record(state)
    if record is None:
        return {}
    targets = []
    namespace = gateway_namespace(record)
    for node in record["plan"]["nodes"]:
        address = next((nic["address"] for nic in node["nics"] if nic["address"]), None)
        if address is not None:
            targets.append((str(node["name"]), str(address)))

    def step(target: tuple[str, str]) -> tuple[SSHSession, Conversation, float]:
        node, address = target
        deadline = time.monotonic() + timeout
        while True:
            session: SSHSession | None = None
            try:
                # logs in as it is made: a node just resumed may not answer yet
                session = SSHSession(
                    address,
                    record["user"],
                    state.key_path,
                    known_hosts=state.known_hosts_path,
                    node=node,
                    namespace=namespace,
                )
                dialog = session.converse("bash -c %s", CLOCK_DIALOG, sudo=True)
                offset = _clock_offset(dialog, timeout)
                if dialog.ask(f"step {offset:.6f}", timeout) != "stepped":
                    raise GuestCommandError(
                        f"node {node}: setting its clock failed", "`labbuilder ssh` to see why"
                    )
                return session, dialog, -offset
            except (OSError, EOFError, GuestTransportError) as err:
                if session is not None:
                    session.close()
                if time.monotonic() > deadline:
                    raise HypervisorError(
                        f"cannot set the clock of node {node} ({address}) after the restore: {err}",
                        "the node may not be running; `labbuilder status` shows it",
                    ) from None
                time.sleep(1)
            except BaseException:
                if session is not None:
                    session.close()
                raise

    def settle(item: tuple[str, SSHSession, Conversation]) -> None:
        node, session, dialog = item
        try:
            dialog.ask("settle", timeout)
            dialog.close(timeout).check(node)
            if also is not None:
                also(node, session)
        except (OSError, EOFError, GuestTransportError) as err:
            raise HypervisorError(
                f"cannot reach node {node} after setting its clock: {err}",
                "the node may not be running; `labbuilder status` shows it",
            ) from None

    stepped = parallel(targets, step)
    sessions = [
        (node, found[0], found[1])
        for (node, _), (found, _) in zip(targets, stepped, strict=True)
        if found
    ]
    try:
        moved = raise_first(stepped)
        raise_first(parallel(sessions, settle))
    finally:
        for _, session, _ in sessions:
            session.close()
    return {node: seconds for (node, _), (_, _, seconds) in zip(targets, moved, strict=True)}


def _clock_offset(dialog: Conversation, timeout: float) -> float:
    """The node's clock less the host's, in seconds: the guest's time at the middle of the
    quickest of ``CLOCK_SAMPLES`` round trips."""
    best: tuple[float, float] | None = None  # (round trip, offset)
    for _ in range(CLOCK_SAMPLES):
        sent = time.time()
        answer = dialog.ask("now", timeout)
        back = time.time()
        try:
            offset = float(answer) - (sent + back) / 2
        except ValueError:
            raise GuestCommandError(
                f"node {dialog.node} gave no time but {answer[:80]!r}",
                "its clock was left as it was; `labbuilder ssh` to see why",
            ) from None
        if best is None or back - sent < best[0]:
            best = (back - sent, offset)
    assert best is not None
    return best[1]


# --- deleting ---------------------------------------------------------------------------------


def delete_snapshot(hypervisor: Hypervisor, lab_name: str, name: str) -> SnapshotInfo:
    """Delete the snapshot ``name`` from every node that holds it."""
    check_name(name)
    nodes = lab_nodes(hypervisor, lab_name)
    info = _find(_collect(hypervisor, lab_name, nodes), lab_name, name)
    raise_first(
        parallel(nodes, lambda pair: hypervisor.delete_snapshot(pair[1], libvirt_name(name)))
    )
    return info


def delete_snapshots(hypervisor: Hypervisor, lab_name: str, after: str | None = None) -> list[str]:
    """Delete every labbuilder snapshot of the lab, or those taken after the snapshot ``after``
    (before re-running the stages that follow it); returns the names deleted, newest first."""
    nodes = lab_nodes(hypervisor, lab_name)
    infos = _collect(hypervisor, lab_name, nodes)
    if after is not None:
        check_name(after)
        index = infos.index(_find(infos, lab_name, after))
        infos = infos[index + 1 :]
    doomed = [info.name for info in reversed(infos)]

    def delete_all(pair: tuple[str, str]) -> None:
        for name in doomed:
            hypervisor.delete_snapshot(pair[1], libvirt_name(name))

    raise_first(parallel(nodes, delete_all))
    return doomed


# --- for the command line ---------------------------------------------------------------------


@contextmanager
def lab_connection(
    lab_name: str, uri: str, state: LabState, *, action: str | None = None
) -> Iterator[Hypervisor]:
    """The hypervisor holding the lab's snapshots; with ``action`` (a command changing the
    lab), holding the lab's lock, so that no `up` or `down` runs meanwhile."""
    if action is None:
        # not read-only: reading the disks' snapshot tables needs more
        with lv.LibvirtHypervisor.open(uri) as hypervisor:
            yield hypervisor
        return
    if not state.directory.exists():
        raise UsageError(
            f"lab {lab_name} is not up on this host", "bring it up with `labbuilder up`"
        )
    with lab_lock(state, action), lv.LibvirtHypervisor.open(uri) as hypervisor:
        return_if_away(hypervisor, state)
        yield hypervisor


RETURN_MARKER = "returning-to"  # names the snapshot holding the lab's own state, while away


def mark_away(state: LabState, snapshot: str) -> None:
    """Note that the lab leaves its own state, kept in ``snapshot``, for a while (a template
    is saved from a stage): if the command is killed meanwhile, ``return_if_away`` brings the
    lab back before any other command changes it."""
    (state.directory / RETURN_MARKER).write_text(snapshot + "\n")


def mark_back(state: LabState) -> None:
    (state.directory / RETURN_MARKER).unlink(missing_ok=True)


def return_if_away(
    hypervisor: Hypervisor, state: LabState, log: Callable[[str], None] | None = None
) -> str | None:
    """Bring the lab back to its own state if a command that left it was killed (the caller
    holds the lab's lock); returns the snapshot it came back from."""
    marker = state.directory / RETURN_MARKER
    try:
        snapshot = marker.read_text().strip()
    except FileNotFoundError:
        return None
    if not NAME_PATTERN.fullmatch(snapshot):
        mark_back(state)
        return None
    names = {info.name for info in list_snapshots(hypervisor, state.lab)}
    if snapshot in names:
        if log is not None:
            log(f"lab {state.lab}: an interrupted command left it; back to its own state")
        restore_snapshot(hypervisor, state.lab, snapshot)
        delete_snapshot(hypervisor, state.lab, snapshot)
        sync_clocks(state)
    mark_back(state)
    return snapshot


# --- helpers ----------------------------------------------------------------------------------


def parallel(
    items: Sequence[T], work: Callable[[T], R]
) -> list[tuple[R | None, LabbuilderError | None]]:
    """``work`` on every item in its own thread: (result, None) or (None, error) per item."""

    def guarded(item: T) -> tuple[R | None, LabbuilderError | None]:
        try:
            return work(item), None
        except LabbuilderError as err:
            return None, err

    if len(items) <= 1:
        return [guarded(item) for item in items]
    with ThreadPoolExecutor(max_workers=len(items)) as pool:
        return list(pool.map(guarded, items))


def raise_first(outcomes: list[tuple[R | None, LabbuilderError | None]]) -> list[R]:
    """The results, or the first error."""
    for _, err in outcomes:
        if err is not None:
            raise err
    return cast(list[R], [result for result, _ in outcomes])
