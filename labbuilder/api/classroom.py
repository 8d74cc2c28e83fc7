"""A class of labs: ``class plan | up | status | reset | down`` as functions.

Each student has a lab of their own, ``<class>-<student>``, isolated (the guide's addresses in
every lab), stamped from the class's template (``up --from-template``) or, without one, brought
up and installed from scratch through the class's stage. ``up`` makes at most
``limits.parallel`` labs at once, after the whole class was planned against the host (a class
that does not fit is refused before anything is made); a student's lab that fails is removed
again and named in the result, the others are kept.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from labbuilder.adapters import libvirt as lv
from labbuilder.adapters import relay, sshd
from labbuilder.adapters.ssh import SSHSession
from labbuilder.api import facade
from labbuilder.api import up as bringup
from labbuilder.classroom.access import (
    authorized_key_line,
    console_domain,
    parse_request,
    relay_target,
    sshd_config,
)
from labbuilder.classroom.handouts import (
    Entry,
    StudentLab,
    file_names,
    handout_pdf,
    render_handout,
    render_known_hosts,
    render_ssh_config,
)
from labbuilder.common.errors import LabbuilderError, PlanError, UsageError
from labbuilder.common.paths import pool_dir, pool_name, state_root
from labbuilder.host.facts import gather_host_facts
from labbuilder.lab.classplan import ClassPlan, plan_class, student_lab
from labbuilder.lab.view import plan_from_dict
from labbuilder.lifecycle import registry, snapshots, teardown, templates
from labbuilder.lifecycle import status as labstatus
from labbuilder.lifecycle.state import (
    LabState,
    ensure_private_dir,
    gateway_namespace,
    lab_lock,
    lab_state,
    load_secrets,
    load_state_record,
    new_ed25519_key,
    read_state_file,
    write_secret_file,
    write_state_file,
)
from labbuilder.model.classroom import ClassSpec
from labbuilder.model.lab import Lab, PlannedNode
from labbuilder.recipe.files import load_recipe

Log = Callable[[str], None]


@dataclass
class StudentResult:
    student: str
    lab: str
    ok: bool
    seconds: float
    action: str  # "stamped", "installed", "kept", "reset", "removed"
    error: str | None = None
    detail: dict[str, object] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {
            "student": self.student,
            "lab": self.lab,
            "ok": self.ok,
            "seconds": round(self.seconds, 1),
            "action": self.action,
            "error": self.error,
            **self.detail,
        }


def class_plan(spec: ClassSpec) -> ClassPlan:
    """Every student's lab planned against this host (the class's labs already up count as
    theirs); PlanError if the class does not fit, naming the numbers and the labs."""
    facts = gather_host_facts(spec.lab, state_root()).facts
    template = None
    if spec.template is not None:
        saved = templates.load_template(spec.template)
        recipe = load_recipe(spec.lab.recipe)
        if recipe.name != saved.recipe or recipe.digest != saved.recipe_digest:
            raise PlanError(
                f"{spec.source}: template {saved.name} was saved with recipe {saved.recipe} "
                f"(digest {saved.recipe_digest[:12]}), the class's lab installs {recipe.name} "
                f"(digest {recipe.digest[:12]})",
                "save the template again with the recipe the class uses",
            )
        template = saved.plan
    return plan_class(spec, facts, template)


def _parallel(
    spec: ClassSpec, students: Sequence[str], work: Callable[[str], StudentResult]
) -> list[StudentResult]:
    with ThreadPoolExecutor(max_workers=spec.limits.parallel, thread_name_prefix="student") as pool:
        return list(pool.map(lambda name: _guarded(spec, name, work), students))


def _guarded(spec: ClassSpec, student: str, work: Callable[[str], StudentResult]) -> StudentResult:
    started = time.monotonic()
    try:
        return work(student)
    except LabbuilderError as err:
        message = err.message.splitlines()[0] if err.message else str(err)
        return StudentResult(
            student, spec.lab_name(student), False, time.monotonic() - started, "failed", message
        )


def _is_up(lab: Lab) -> bool:
    with lv.LibvirtHypervisor.open(lab.libvirt_uri, readonly=True) as hypervisor:
        return bool(hypervisor.domains(lab.name))


def class_up(spec: ClassSpec, *, log: Log | None = None) -> list[StudentResult]:
    """Every student's lab up: stamped from the template, or up and installed from scratch.
    A lab that is up already is kept."""
    emit = log or (lambda _message: None)
    planned = class_plan(spec)

    def make(student: str) -> StudentResult:
        lab, _ = planned.for_student(student)
        started = time.monotonic()
        if _is_up(lab):
            return StudentResult(student, lab.name, True, 0.0, "kept")
        say: Log = lambda message: emit(f"{student}: {message}")  # noqa: E731
        if spec.template is not None:
            bringup.up(lab, from_template=spec.template, log=say)
            return StudentResult(student, lab.name, True, time.monotonic() - started, "stamped")
        bringup.up(lab, log=say)
        if spec.stage is not None:
            from labbuilder.api.install import Selection, install

            result = install(lab, Selection(until=spec.stage))
            if not result.ok:
                return StudentResult(
                    student, lab.name, False, time.monotonic() - started, "installed",
                    result.failure,
                )  # fmt: skip
        return StudentResult(student, lab.name, True, time.monotonic() - started, "installed")

    results = _parallel(spec, [s.name for s in spec.students], make)
    if any(result.ok for result in results):
        emit("the class's SSH entry and the students' files")
        entry = open_access(spec)
        made = [result for result in results if result.ok]
        snapshots.raise_first(
            snapshots.parallel([r.student for r in made], lambda s: authorize_student(spec, s))
        )  # a login per node: the students' labs at once
        for result in made:
            folder = write_student_files(spec, result.student, entry)
            result.detail["files"] = str(folder)
    return results


def class_status(spec: ClassSpec) -> list[dict[str, object]]:
    """Each student's lab as ``status`` shows it (nodes and their states), or "not up"."""
    rows: list[dict[str, object]] = []
    for student in spec.students:
        name = spec.lab_name(student.name)
        entry = registry.registration(name)
        if entry is None:
            rows.append({"student": student.name, "lab": name, "up": False, "nodes": []})
            continue
        status = labstatus.lab_status(name, entry.uri, lab_state(name, entry.state_dir))
        rows.append(
            {
                "student": student.name,
                "lab": name,
                "up": bool(status.nodes),
                "template": status.template,
                "gateway": status.gateway,
                "nodes": [{"name": n.name, "state": n.state} for n in status.nodes],
            }
        )
    return rows


def student_status(spec: ClassSpec, student: str) -> list[dict[str, object]]:
    """The nodes of the student's lab and their states (none if it is not up)."""
    name = spec.lab_name(student)
    entry = registry.registration(name)
    if entry is None:
        return []
    status = labstatus.lab_status(name, entry.uri, lab_state(name, entry.state_dir))
    return [{"name": n.name, "state": n.state} for n in status.nodes]


def student_ssh_config(spec: ClassSpec, student: str) -> Path:
    """An ssh_config (written in the lab's state) that reaches the student's lab's nodes with
    the lab's own key; refused for a student the class lacks or whose lab is not up."""
    _students(spec, [student])
    lab = student_lab(spec, student)
    if registry.registration(lab.name) is None:
        raise UsageError(f"{lab.name} is not up", f"`labbuilder class up {spec.source}` first")
    return facade.write_ssh_config(lab)


def entry_running(spec: ClassSpec) -> bool:
    return bool(sshd.pids(class_dir(spec) / "access" / "sshd_config"))


def _students(spec: ClassSpec, names: Sequence[str]) -> list[str]:
    known = [s.name for s in spec.students]
    for name in names:
        if name not in known:
            raise UsageError(
                f"{spec.source}: there is no student {name!r} in class {spec.name}",
                f"students: {', '.join(known)}",
            )
    return list(names) or known


def class_reset(
    spec: ClassSpec, stage: str, students: Sequence[str] = (), *, log: Log | None = None
) -> list[StudentResult]:
    """Bring the students' labs (all, or those named) back to ``stage``: the template's stage
    re-stamps the nodes from the template (networks and gateway stay); a later stage restores
    the lab's own snapshot of it."""
    emit = log or (lambda _message: None)
    chosen = _students(spec, students)
    template = templates.load_template(spec.template) if spec.template is not None else None

    def reset(student: str) -> StudentResult:
        name = spec.lab_name(student)
        entry = registry.registration(name)
        if entry is None:
            raise UsageError(f"{name} is not up", f"`labbuilder class up {spec.source}` first")
        state = lab_state(name, entry.state_dir)
        started = time.monotonic()
        with lab_lock(state, "labbuilder class reset"), lv.LibvirtHypervisor.open(entry.uri) as hv:
            if template is not None and stage == template.stage:
                emit(f"{student}: back to template {template.name}")
                # the template's nodes lack the student's key: added as their clocks are set
                also = (
                    student_key_adder(spec, student)
                    if (class_dir(spec) / "access").is_dir()
                    else None
                )
                templates.restamp(hv, template, state, pool_name(), pool_dir(), also=also)
            else:
                emit(f"{student}: back to snapshot {stage}")
                snapshots.restore_snapshot(hv, name, stage)
                snapshots.sync_clocks(state)
        return StudentResult(student, name, True, time.monotonic() - started, "reset")

    return _parallel(spec, chosen, reset)


def class_down(spec: ClassSpec) -> list[StudentResult]:
    """Every student's lab removed (what is not up is skipped)."""

    def remove(student: str) -> StudentResult:
        name = spec.lab_name(student)
        started = time.monotonic()
        entry = registry.registration(name)
        uri = entry.uri if entry is not None else spec.lab.libvirt_uri
        removed = teardown.down(name, uri)
        return StudentResult(
            student, name, True, time.monotonic() - started, "removed",
            detail={"domains": len(removed.domains), "gateway": removed.gateway},
        )  # fmt: skip

    results = _parallel(spec, [s.name for s in spec.students], remove)
    close_access(spec)
    return results


# --- the students' access -----------------------------------------------------------------------


def class_dir(spec: ClassSpec) -> Path:
    """``<state root>/classes/<class>/``: the entry (``access/``) and each student's files
    (``students/<name>/``: key, ssh_config, known_hosts, handout), all private to root."""
    return state_root() / "classes" / spec.name


def student_dir(spec: ClassSpec, student: str) -> Path:
    return class_dir(spec) / "students" / student


def student_key(spec: ClassSpec, student: str) -> str:
    """The student's public key: the class file's, else one made for them (its private half
    in their folder, to hand out)."""
    given = spec.student(student).ssh_key
    if given:
        return given
    private_path = student_dir(spec, student) / spec.lab_name(student)
    public_path = private_path.with_suffix(".pub")
    if not private_path.exists() or not public_path.exists():
        private, public = new_ed25519_key()
        write_secret_file(private_path, private)
        write_state_file(public_path, public + f" {spec.lab_name(student)}\n".encode())
    return read_state_file(public_path).strip()


def open_access(spec: ClassSpec) -> Entry:
    """The class's SSH entry running (its sshd, host key, authorized_keys), every student's key
    in it with the forced command that reaches their own lab only."""
    folder = class_dir(spec) / "access"
    ensure_private_dir(folder)
    key_path = folder / "ssh_host_ed25519_key"
    if not key_path.exists() or not key_path.with_suffix(".pub").exists():
        private, public = new_ed25519_key()
        write_secret_file(key_path, private)
        write_state_file(key_path.with_suffix(".pub"), public + b"\n")
    lines = [
        authorized_key_line(sys.executable, spec.lab_name(s.name), student_key(spec, s.name))
        for s in spec.students
    ]
    write_secret_file(folder / "authorized_keys", ("\n".join(lines) + "\n").encode())
    config = folder / "sshd_config"
    limits = spec.limits
    write_secret_file(
        config, sshd_config(folder, limits.access_address, limits.access_port).encode()
    )
    sshd.start(config, folder / "sshd.log", limits.access_address, limits.access_port)
    return Entry(
        host=limits.access_host or socket.getfqdn(),
        port=limits.access_port,
        host_key=" ".join(read_state_file(key_path.with_suffix(".pub")).split()[:2]),
    )


def close_access(spec: ClassSpec) -> bool:
    """The entry stopped and the class's folder (keys, handouts) removed; whether it ran."""
    stopped = sshd.stop(class_dir(spec) / "access" / "sshd_config")
    folder = class_dir(spec)
    if folder.is_dir() and not folder.is_symlink():
        shutil.rmtree(folder)
    return stopped


def _lab_record(lab: str) -> tuple[LabState, dict[str, object]]:
    entry = registry.registration(lab)
    record = None if entry is None else load_state_record(lab_state(lab, entry.state_dir))
    if entry is None or record is None:
        raise UsageError(f"lab {lab} is not up on this host", "ask the trainer")
    return lab_state(lab, entry.state_dir), record


def authorize_student(spec: ClassSpec, student: str) -> None:
    """The student's key allowed on every node of their lab (as the lab's login user), the
    nodes in parallel."""
    state, record = _lab_record(spec.lab_name(student))
    plan = plan_from_dict(record["plan"])  # type: ignore[arg-type]
    add_key = student_key_adder(spec, student)

    def authorize(node: PlannedNode) -> None:
        with SSHSession(
            node.management_address,
            str(record["user"]),
            state.key_path,
            known_hosts=state.known_hosts_path,
            node=node.name,
            namespace=gateway_namespace(record),
        ) as session:
            add_key(node.name, session)

    snapshots.raise_first(snapshots.parallel(list(plan.nodes), authorize))


def student_key_adder(spec: ClassSpec, student: str) -> Callable[[str, SSHSession], None]:
    """What adds the student's key to a node, in a session to it."""
    key = student_key(spec, student)

    def add(node: str, session: SSHSession) -> None:
        session.run(
            "mkdir -p ~/.ssh && touch ~/.ssh/authorized_keys && "
            "(grep -qxF %s ~/.ssh/authorized_keys || echo %s >> ~/.ssh/authorized_keys)",
            key,
            key,
            timeout=60,
        ).check(node)

    return add


def write_student_files(spec: ClassSpec, student: str, entry: Entry) -> Path:
    """The student's handout, ssh_config and known_hosts in their folder; the folder."""
    state, record = _lab_record(spec.lab_name(student))
    plan = plan_from_dict(record["plan"])  # type: ignore[arg-type]
    keys = {}
    for node in plan.nodes:
        public = state.directory / "host-keys" / f"{node.name}.pub"
        if public.exists():
            keys[node.name] = " ".join(read_state_file(public).split()[:2])
    template = record.get("template") or {}
    assert isinstance(template, dict)
    lab = StudentLab(
        class_name=spec.name,
        student=student,
        plan=plan,
        user=str(record["user"]),
        secrets=load_secrets(state),
        purposes=load_recipe(spec.lab.recipe).secrets,
        node_keys=keys,
        template=template.get("name"),
        stage=template.get("stage") or spec.stage,
    )
    folder = student_dir(spec, student)
    names = file_names(lab)
    handout = render_handout(lab, entry)
    write_secret_file(folder / "handout.md", handout.encode())
    write_secret_file(folder / "handout.pdf", handout_pdf(handout))
    write_secret_file(folder / names["config_file"], render_ssh_config(lab, entry).encode())
    write_secret_file(folder / names["known_hosts_file"], render_known_hosts(lab, entry).encode())
    return folder


def class_access(spec: ClassSpec) -> Entry:
    """The entry open, every student's key on their nodes, their files written."""
    entry = open_access(spec)
    for student in spec.students:
        authorize_student(spec, student.name)
        write_student_files(spec, student.name, entry)
    return entry


def entry(lab: str, request: str) -> None:
    """A student's request to the class's entry (its forced command): bytes to and from an
    address of their own lab, opened from the lab's gateway namespace, or a node's serial
    console."""
    asked = parse_request(request)
    _, record = _lab_record(lab)
    plan = plan_from_dict(record["plan"])  # type: ignore[arg-type]
    if asked.action == "console":
        lv.console_stdio(plan.libvirt_uri, console_domain(plan, asked.node))
        return
    address = relay_target(plan, asked.node)
    relay.pipe_stdio(relay.open_node(gateway_namespace(record), address, asked.port))


def entry_request() -> str:
    return os.environ.get("SSH_ORIGINAL_COMMAND", "")
