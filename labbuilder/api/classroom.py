"""A class of labs: ``class plan | up | status | reset | down`` as functions.

Each student has a lab of their own, ``<class>-<student>``, isolated (the guide's addresses in
every lab), stamped from the class's template (``up --from-template``) or, without one, brought
up and installed from scratch through the class's stage. ``up`` makes at most
``limits.parallel`` labs at once, after the whole class was planned against the host (a class
that does not fit is refused before anything is made); a student's lab that fails is removed
again and named in the result, the others are kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from labbuilder.adapters import libvirt as lv
from labbuilder.api import up as bringup
from labbuilder.common.errors import LabbuilderError, PlanError, UsageError
from labbuilder.common.paths import pool_dir, pool_name, state_root
from labbuilder.host.facts import gather_host_facts
from labbuilder.lab.classplan import ClassPlan, plan_class
from labbuilder.lifecycle import registry, snapshots, teardown, templates
from labbuilder.lifecycle import status as labstatus
from labbuilder.lifecycle.state import lab_lock, lab_state
from labbuilder.model.classroom import ClassSpec
from labbuilder.model.lab import Lab
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

    return _parallel(spec, [s.name for s in spec.students], make)


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
                templates.restamp(hv, template, state, pool_name(), pool_dir())
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

    return _parallel(spec, [s.name for s in spec.students], remove)
