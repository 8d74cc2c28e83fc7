"""Templates: a lab at "after STAGE" kept read-only, from which new labs resume in seconds.

``save_template`` turns a lab's stage snapshot into a template:

- each node's memory, as libvirt saves it (``<node>.save``: ``adapters.savefile``);
- each node's disks as they were at the snapshot, compacted into qcow2 files of labbuilder's
  pool that back onto the same base volumes as the lab's (``template-<name>--<node>--<dev>``);
- each node's seed (cloud-init's NoCloud disk, which the saved guest has attached);
- the lab's record (plan, images and their manifests), its secrets, SSH key, host keys and
  known_hosts (the guests trust these), the recipe and its digest, the stage.

The lab itself is left as it was: its current state is snapshotted first, the lab goes back
to the stage paused, each node is saved, its disks copied, and the lab returns to its state.

``stamp_nodes`` makes a new lab's nodes from a template: thin overlays on the template's
disks, the seed, and the saved memory restored under the new lab's names and networks (all
nodes paused, then resumed together). The guests keep their addresses, MACs and host keys:
labs from one template share their secrets and keys, and live on networks of their own.

A template lives in ``<state root>/templates/<name>/`` (``template.json``, ``state/``, the
memory files, private to root) and its disks in the pool. Its files are read-only; a template
is deleted only when no lab on the host was made from it.

Owns templates; imports adapters, lab, libvirtxml, lifecycle and common.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labbuilder.adapters import processes, savefile, storage
from labbuilder.adapters.hypervisor import Hypervisor, lab_metadata
from labbuilder.adapters.ssh import SSHSession
from labbuilder.common.errors import DiskSpaceError, LabbuilderError, UsageError
from labbuilder.common.filelock import file_lock
from labbuilder.common.paths import lab_lock_path, state_root
from labbuilder.common.sizes import format_size
from labbuilder.lab.view import plan_from_dict
from labbuilder.libvirtxml.restamp import Restamp, RestampError, restamp_domain_xml
from labbuilder.lifecycle import registry, snapshots
from labbuilder.lifecycle.state import (
    LabState,
    ensure_private_dir,
    load_state_record,
    read_state_file,
    write_secret_file,
)
from labbuilder.model.lab import Plan, PlannedNode

FORMAT = 1
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_.-]{0,39}")
RETURN_SNAPSHOT = "template-return"  # the lab's own state while a template is saved from it
VOLUME_PREFIX = "template-"
# What of a lab's state a template keeps: the guests trust these keys and hold these secrets.
STATE_FILES = ("secrets.json", "id_ed25519", "id_ed25519.pub", "known_hosts")
STATE_FOLDERS = ("host-keys",)
SPACE_MARGIN = 1 << 30

Log = Callable[[str], None]


@dataclass(frozen=True)
class TemplateDisk:
    device: str  # "vda"
    volume: str  # the template's volume in the pool
    bytes: int  # what the file takes on disk


@dataclass(frozen=True)
class TemplateNode:
    name: str
    domain: str  # the domain it was saved from
    disks: tuple[TemplateDisk, ...]
    memory_bytes: int  # the memory file's size


@dataclass(frozen=True)
class Template:
    """A template as ``template.json`` describes it."""

    name: str
    directory: Path
    lab: str  # the lab it was saved from
    stage: str
    recipe: str
    recipe_digest: str
    created: float
    pool: str
    record: Mapping[str, Any]  # the lab's record (lab.json) when it was saved
    nodes: tuple[TemplateNode, ...]

    @property
    def plan(self) -> Plan:
        return plan_from_dict(self.record["plan"])

    def memory_path(self, node: str) -> Path:
        return self.directory / f"{node}.save"

    def seed_path(self, node: str) -> Path:
        return self.directory / f"{node}.seed.iso"

    @property
    def state_dir(self) -> Path:
        return self.directory / "state"

    @property
    def disk_bytes(self) -> int:
        return sum(disk.bytes for node in self.nodes for disk in node.disks)

    @property
    def memory_bytes(self) -> int:
        return sum(node.memory_bytes for node in self.nodes)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "lab": self.lab,
            "stage": self.stage,
            "recipe": self.recipe,
            "recipe_digest": self.recipe_digest,
            "created": self.created,
            "created_iso": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created)),
            "directory": str(self.directory),
            "pool": self.pool,
            "disk_bytes": self.disk_bytes,
            "memory_bytes": self.memory_bytes,
            "nodes": [
                {
                    "name": node.name,
                    "memory_bytes": node.memory_bytes,
                    "disks": [
                        {"device": d.device, "volume": d.volume, "bytes": d.bytes}
                        for d in node.disks
                    ],
                }
                for node in self.nodes
            ],
            "images": self.record.get("images", {}),
        }


def templates_dir() -> Path:
    return state_root() / "templates"


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise UsageError(
            f"{name!r} is not a valid template name",
            "use lower-case letters, digits, '-', '_' and '.', starting with a letter or digit, "
            "at most 40 characters (e.g. os101-image)",
        )
    return name


def volume_name(template: str, node: str, device: str) -> str:
    return f"{VOLUME_PREFIX}{template}--{node}--{device}.qcow2"


# --- reading ----------------------------------------------------------------------------------


def load_template(name: str) -> Template:
    """The template ``name``; a UsageError naming the templates there are if there is none."""
    check_name(name)
    directory = templates_dir() / name
    path = directory / "template.json"
    if not os.path.lexists(path):
        known = ", ".join(t.name for t in list_templates()) or "none"
        raise UsageError(
            f"there is no template {name!r} on this host (templates: {known})",
            "`labbuilder template save --lab LAB --stage STAGE NAME` makes one",
        )
    try:
        data = json.loads(read_state_file(path))
        return _from_dict(directory, data)
    except (ValueError, KeyError, TypeError) as err:
        raise UsageError(
            f"{path} is not a template description: {err}",
            f"`labbuilder template delete {name}` removes it",
        ) from None


def _from_dict(directory: Path, data: dict[str, Any]) -> Template:
    if data.get("labbuilder_template") != FORMAT:
        raise ValueError(f"format {data.get('labbuilder_template')!r}, not {FORMAT}")
    return Template(
        name=str(data["name"]),
        directory=directory,
        lab=str(data["lab"]),
        stage=str(data["stage"]),
        recipe=str(data["recipe"]),
        recipe_digest=str(data["recipe_digest"]),
        created=float(data["created"]),
        pool=str(data["pool"]),
        record=data["record"],
        nodes=tuple(
            TemplateNode(
                name=str(node["name"]),
                domain=str(node["domain"]),
                disks=tuple(
                    TemplateDisk(str(d["device"]), str(d["volume"]), int(d["bytes"]))
                    for d in node["disks"]
                ),
                memory_bytes=int(node["memory_bytes"]),
            )
            for node in data["nodes"]
        ),
    )


def _to_dict(template: Template) -> dict[str, Any]:
    return {
        "labbuilder_template": FORMAT,
        "name": template.name,
        "lab": template.lab,
        "stage": template.stage,
        "recipe": template.recipe,
        "recipe_digest": template.recipe_digest,
        "created": template.created,
        "pool": template.pool,
        "record": dict(template.record),
        "nodes": [
            {
                "name": node.name,
                "domain": node.domain,
                "memory_bytes": node.memory_bytes,
                "disks": [
                    {"device": d.device, "volume": d.volume, "bytes": d.bytes} for d in node.disks
                ],
            }
            for node in template.nodes
        ],
    }


def list_templates() -> list[Template]:
    """The host's templates (those whose description reads), by name."""
    found = []
    root = templates_dir()
    if not root.is_dir():
        return []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".") or not NAME_PATTERN.fullmatch(entry.name):
            continue
        with contextlib.suppress(UsageError):
            found.append(load_template(entry.name))
    return found


def labs_using(name: str) -> list[str]:
    """The labs on this host made from the template ``name`` (by their records)."""
    users = []
    for lab in registry.registered_labs():
        entry = registry.registration(lab)
        if entry is None:
            continue
        with contextlib.suppress(LabbuilderError, OSError, ValueError):
            record = load_state_record(LabState(lab, entry.state_dir))
            if record is not None and (record.get("template") or {}).get("name") == name:
                users.append(lab)
    return sorted(users)


# --- saving -----------------------------------------------------------------------------------


def save_template(
    hypervisor: Hypervisor,
    state: LabState,
    stage: str,
    name: str,
    *,
    pool: str,
    pool_path: Path,
    log: Log | None = None,
) -> Template:
    """Make the template ``name`` from the lab's snapshot ``stage`` (the caller holds the lab's
    lock). The lab is back in its own state afterwards, running. On failure nothing of the
    template is left."""
    emit = log or (lambda _message: None)
    check_name(name)
    lab_name = state.lab
    record = load_state_record(state)
    if record is None:
        raise _not_up(lab_name)
    final = templates_dir() / name
    if os.path.lexists(final):
        raise UsageError(
            f"template {name} exists already",
            f"choose another name, or `labbuilder template delete {name}` first",
        )
    info = snapshots.find_snapshot(hypervisor, lab_name, stage)
    if not info.complete or not info.memory:
        raise UsageError(
            f"snapshot {stage} of lab {lab_name} is not a whole lab's snapshot with memory "
            f"(missing on: {', '.join(info.missing) or 'none'})",
            "run the stage again (`labbuilder install --only STAGE --force`) to take it anew",
        )
    nodes = snapshots.lab_nodes(hypervisor, lab_name)
    _check_space(hypervisor, nodes, pool_path)

    ensure_private_dir(templates_dir())
    with file_lock(_save_lock(name), blocking=False) as locked:
        if not locked:
            raise UsageError(
                f"template {name} is being saved by another command",
                "wait for it, or choose another name",
            )
        try:
            return _save_locked(
                hypervisor, state, stage, name, record, info, nodes, pool, pool_path, emit
            )
        finally:
            _save_lock(name).unlink(missing_ok=True)


def _save_locked(
    hypervisor: Hypervisor,
    state: LabState,
    stage: str,
    name: str,
    record: dict[str, Any],
    info: snapshots.SnapshotInfo,
    nodes: list[tuple[str, str]],
    pool: str,
    pool_path: Path,
    emit: Log,
) -> Template:
    lab_name = state.lab
    plan = plan_from_dict(record["plan"])
    final = templates_dir() / name
    work = _partial_dir(name)
    shutil.rmtree(work, ignore_errors=True)
    ensure_private_dir(work)
    made_volumes: list[str] = []
    returned = False
    emit(f"snapshot of the lab's own state ({RETURN_SNAPSHOT})")
    snapshots.take_snapshot(
        hypervisor,
        lab_name,
        RETURN_SNAPSHOT,
        description="the lab's state while a template is saved",
    )
    snapshots.mark_away(state, RETURN_SNAPSHOT)
    try:
        emit(f"back to stage {stage}, paused")
        snapshots.restore_snapshot(hypervisor, lab_name, stage, resume=False)
        emit("saving each node's memory")
        snapshots.raise_first(
            snapshots.parallel(
                nodes, lambda pair: hypervisor.save_domain(pair[1], work / f"{pair[0]}.save")
            )
        )
        template_nodes = []
        for node in plan.nodes:
            emit(f"node {node.name}: copying its disks")
            disks = _copy_disks(hypervisor, plan, node, name, pool, pool_path, made_volumes)
            _copy_seed(hypervisor, plan, node, pool, work / f"{node.name}.seed.iso")
            template_nodes.append(
                TemplateNode(
                    name=node.name,
                    domain=node.domain,
                    disks=disks,
                    memory_bytes=(work / f"{node.name}.save").stat().st_size,
                )
            )
        hypervisor.refresh_pool(pool)
        emit("the lab back to its own state")
        snapshots.restore_snapshot(hypervisor, lab_name, RETURN_SNAPSHOT)
        returned = True
        _copy_state(state.directory, work / "state")
        template = Template(
            name=name,
            directory=final,
            lab=lab_name,
            stage=stage,
            recipe=str(info.meta.get("recipe", plan.recipe)),
            recipe_digest=str(info.meta.get("recipe_digest", "")),
            created=time.time(),
            pool=pool,
            record=record,
            nodes=tuple(template_nodes),
        )
        write_secret_file(work / "template.json", json.dumps(_to_dict(template), indent=1).encode())
        for entry in work.iterdir():
            if entry.is_file():
                entry.chmod(0o400)
        work.rename(final)
    except BaseException as err:
        shutil.rmtree(work, ignore_errors=True)
        for volume in made_volumes:
            with contextlib.suppress(OSError):
                (pool_path / volume).unlink()
        with contextlib.suppress(LabbuilderError):
            hypervisor.refresh_pool(pool)
        if not returned:
            try:
                snapshots.restore_snapshot(hypervisor, lab_name, RETURN_SNAPSHOT)
                returned = True
            except LabbuilderError as failed:
                err.add_note(
                    f"the lab could not go back to its own state ({failed.message}); it is kept "
                    f"in snapshot {RETURN_SNAPSHOT}: `labbuilder snapshot restore "
                    f"{RETURN_SNAPSHOT}`"
                )
        raise
    finally:
        if returned:
            with contextlib.suppress(LabbuilderError):
                snapshots.delete_snapshot(hypervisor, lab_name, RETURN_SNAPSHOT)
            snapshots.mark_back(state)
    snapshots.sync_clocks(state)
    return load_template(name)


def _check_space(hypervisor: Hypervisor, nodes: list[tuple[str, str]], pool_path: Path) -> None:
    """The memory files, the lab's own snapshot with memory, and the disks' copies (at most
    what the lab's volumes hold now) must fit, with a margin."""
    need = 0
    for _, domain_name in nodes:
        domain = hypervisor.domain(domain_name)
        if domain is not None and domain.active:
            need += 2 * domain.memory
        for path in hypervisor.writable_disk_paths(domain_name) or []:
            with contextlib.suppress(OSError):
                need += Path(path).stat().st_blocks * 512 // 2  # the snapshots' share is not copied
    free = shutil.disk_usage(pool_path if pool_path.exists() else state_root()).free
    if need + SPACE_MARGIN > free:
        raise DiskSpaceError(
            f"a template of this lab needs about {format_size(need)} of disk (its nodes' memory "
            f"twice and a copy of their disks), and {format_size(SPACE_MARGIN)} must stay "
            f"free; the disk has {format_size(free)} free",
            "free disk space, or delete templates (`labbuilder template list`) or snapshots "
            "the labs no longer need",
        )


def _copy_disks(
    hypervisor: Hypervisor,
    plan: Plan,
    node: PlannedNode,
    name: str,
    pool: str,
    pool_path: Path,
    made: list[str],
) -> tuple[TemplateDisk, ...]:
    """Each disk of the (saved, stopped) node as it is now, compacted into a new qcow2 file
    that backs onto the same base volume as the lab's disk, without its snapshots."""
    disks = []
    for disk in node.disks:
        source = hypervisor.find_volume(
            pool, storage.lab_volume_name(plan.lab, node.name, f"{disk.device}.qcow2")
        )
        if source is None:
            raise UsageError(f"node {node.name} of lab {plan.lab} has no disk {disk.device}")
        target = volume_name(name, node.name, disk.device)
        path = pool_path / target
        backing = hypervisor.volume_backing(source)
        argv = ["qemu-img", "convert", "-q", "-f", "qcow2", "-O", "qcow2"]
        if backing is not None:
            argv += ["-B", backing, "-F", "qcow2"]
        made.append(target)
        processes.run([*argv, source.path, str(path)])
        path.chmod(0o444)
        disks.append(TemplateDisk(disk.device, target, path.stat().st_blocks * 512))
    return tuple(disks)


def _copy_seed(
    hypervisor: Hypervisor, plan: Plan, node: PlannedNode, pool: str, target: Path
) -> None:
    seed = hypervisor.find_volume(pool, storage.lab_volume_name(plan.lab, node.name, "seed.iso"))
    if seed is None:
        raise UsageError(f"node {node.name} of lab {plan.lab} has no seed volume")
    shutil.copyfile(seed.path, target)


def _copy_state(source: Path, target: Path) -> None:
    """The lab state files a template keeps (secrets, keys, known_hosts), from ``source`` to
    ``target``, each written 0600; links and special files are not followed."""
    ensure_private_dir(target)
    for name in STATE_FILES:
        if os.path.lexists(source / name):
            write_secret_file(target / name, read_state_file(source / name).encode())
    for folder in STATE_FOLDERS:
        if (source / folder).is_dir():
            ensure_private_dir(target / folder)
            for entry in sorted((source / folder).iterdir()):
                if entry.is_file() and not entry.is_symlink():
                    write_secret_file(target / folder / entry.name, read_state_file(entry).encode())


# --- stamping ---------------------------------------------------------------------------------


def copy_state_into(template: Template, state: LabState) -> None:
    """The template's secrets, keys and known_hosts as the new lab's (its guests trust them)."""
    _copy_state(template.state_dir, state.directory)


def stamp_nodes(
    hypervisor: Hypervisor,
    template: Template,
    plan: Plan,
    digest: str,
    state: LabState,
    pool: str,
    *,
    log: Log | None = None,
) -> float:
    """The lab's nodes from the template, running: overlays on its disks, its seeds, its
    memory restored (every node paused first, then all resumed together). ``plan`` is the new
    lab's, with the template's MACs. Returns the seconds the restores took."""
    emit = log or (lambda _message: None)
    by_name = {node.name: node for node in template.nodes}
    state.console_dir.mkdir(parents=True, exist_ok=True)

    def make(node: PlannedNode) -> None:
        saved = by_name[node.name]
        emit(f"node {node.name}: overlays on the template's disks")
        disks = {}
        for disk in saved.disks:
            base = hypervisor.find_volume(template.pool, disk.volume)
            if base is None:
                raise UsageError(
                    f"template {template.name} lost its disk {disk.volume}",
                    f"`labbuilder template delete {template.name}` and save it again",
                )
            size = next(d.size for d in node.disks if d.device == disk.device)
            volume = storage.lab_volume_name(plan.lab, node.name, f"{disk.device}.qcow2")
            hypervisor.ensure_overlay(pool, volume, base, size)
            disks[disk.device] = (pool, volume)
        seed_name = storage.lab_volume_name(plan.lab, node.name, "seed.iso")
        seed = template.seed_path(node.name)
        if (old := hypervisor.find_volume(pool, seed_name)) is not None:
            hypervisor.delete_volume(old)
        with seed.open("rb") as data:
            hypervisor.upload(pool, seed_name, data, seed.stat().st_size)
        seed_device = f"vd{chr(ord('a') + len(node.disks))}"
        disks[seed_device] = (pool, seed_name)
        image = savefile.read_image(template.memory_path(node.name))
        xml = restamp_domain_xml(
            image.xml,
            Restamp(
                name=node.domain,
                uuid=str(uuid.uuid4()),
                metadata=_metadata(image.xml, plan, node, digest, state),
                disks=disks,
                networks={
                    nic.mac.lower(): plan.network(nic.network).libvirt_name for nic in node.nics
                },
                console_log=str(state.console_log(node.name)),
            ),
        )
        emit(f"node {node.name}: restoring its memory")
        hypervisor.restore_domain(image, xml, paused=True)

    started = time.monotonic()
    try:
        snapshots.raise_first(snapshots.parallel(list(plan.nodes), make))
    except RestampError as err:
        raise UsageError(
            f"template {template.name} does not fit lab {plan.lab}: {err}",
            "save the template again from a lab of this plan",
        ) from None
    resumed = snapshots.parallel(
        [(node.name, node.domain) for node in plan.nodes],
        lambda pair: hypervisor.resume_domain(pair[1]),
    )
    snapshots.raise_first(resumed)
    return time.monotonic() - started


def restamp(
    hypervisor: Hypervisor,
    template: Template,
    state: LabState,
    pool: str,
    pool_path: Path,
    *,
    log: Log | None = None,
    also: Callable[[str, SSHSession], None] | None = None,
) -> float:
    """Bring a lab made from ``template`` back to it: its nodes and their disks (snapshots
    included) are replaced by new ones resumed from the template; its networks and gateway
    stay. ``also`` runs on each node in the session that steps its clock. Returns the seconds
    it took, clocks stepped included."""
    started = time.monotonic()
    record = load_state_record(state)
    if record is None:
        raise _not_up(state.lab)
    plan = plan_from_dict(record["plan"])
    domains = hypervisor.domains(state.lab)
    digest = next((d.metadata.get("plan") for d in domains if d.metadata.get("plan")), None)
    if digest is None:
        raise UsageError(f"lab {state.lab} has no nodes on this host", "bring it up again")
    snapshots.raise_first(
        snapshots.parallel([d.name for d in domains], hypervisor.remove_domain)
    )  # a TCG guest takes seconds to stop: all at once
    for volume in hypervisor.lab_volumes(pool, str(pool_path), state.lab):
        hypervisor.delete_volume(volume)
    stamp_nodes(hypervisor, template, plan, digest, state, pool, log=log)
    snapshots.sync_clocks(state, also=also)
    return time.monotonic() - started


def _metadata(
    xml: str, plan: Plan, node: PlannedNode, digest: str, state: LabState
) -> dict[str, str]:
    saved = lab_metadata(xml)
    return {
        **saved,
        "name": plan.lab,
        "node": node.name,
        "role": str(node.role),
        "plan": digest,
        "state": str(state.directory.absolute()),
        "lock": str(lab_lock_path(plan.lab)),
    }


def stamped_record(
    template: Template, lab: str, source: str, plan: dict[str, Any]
) -> dict[str, Any]:
    """The new lab's record: the template's (user, images, the host's facts) for ``lab``."""
    return {
        **dict(template.record),
        "lab": lab,
        "source": source,
        "plan": plan,
        "template": {
            "name": template.name,
            "stage": template.stage,
            "recipe_digest": template.recipe_digest,
            "created": template.created,
        },
    }


# --- leftovers --------------------------------------------------------------------------------


def _save_lock(name: str) -> Path:
    return templates_dir() / f".{name}.lock"


def _partial_dir(name: str) -> Path:
    return templates_dir() / f".{name}.partial"


def collect_unfinished(hypervisor: Hypervisor, pool: str, pool_path: Path) -> list[str]:
    """Remove what killed `template save`s left (their unfinished folders and disk copies),
    skipping saves still running; returns the removed paths and volumes."""
    root = templates_dir()
    names: set[str] = set()
    if root.is_dir():
        names |= {
            entry.name[1 : -len(".partial")]
            for entry in root.iterdir()
            if entry.name.startswith(".") and entry.name.endswith(".partial")
        }
    volumes: dict[str, list[str]] = {}
    with contextlib.suppress(OSError):
        for entry in pool_path.iterdir():
            if entry.name.startswith(VOLUME_PREFIX) and "--" in entry.name:
                template = entry.name[len(VOLUME_PREFIX) :].split("--", 1)[0]
                volumes.setdefault(template, []).append(entry.name)
    names |= set(volumes)
    removed: list[str] = []
    for name in sorted(names):
        if not NAME_PATTERN.fullmatch(name) or (root / name / "template.json").exists():
            continue
        ensure_private_dir(root)
        with file_lock(_save_lock(name), blocking=False) as locked:
            if not locked:
                continue
            partial = _partial_dir(name)
            if partial.is_dir():
                shutil.rmtree(partial)
                removed.append(str(partial))
            for volume in volumes.get(name, []):
                (pool_path / volume).unlink(missing_ok=True)
                removed.append(volume)
        _save_lock(name).unlink(missing_ok=True)
    if any(not path.startswith("/") for path in removed):
        with contextlib.suppress(LabbuilderError):
            hypervisor.refresh_pool(pool)
    return removed


# --- deleting ---------------------------------------------------------------------------------


def delete_template(hypervisor: Hypervisor, name: str) -> Template:
    """Delete the template ``name``: refused while labs made from it are on the host."""
    template = load_template(name)
    users = labs_using(name)
    if users:
        raise UsageError(
            f"template {name} is in use by {', '.join(users)}",
            "take those labs down first (`labbuilder down --lab LAB`)",
        )
    for node in template.nodes:
        for disk in node.disks:
            volume = hypervisor.find_volume(template.pool, disk.volume)
            if volume is not None:
                hypervisor.delete_volume(volume)
    shutil.rmtree(template.directory)
    return template


def _not_up(lab: str) -> UsageError:
    return UsageError(f"lab {lab} is not up on this host", "bring it up with `labbuilder up`")
