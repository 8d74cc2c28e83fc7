"""The trainer's board of a class: each student's lab looked at on a schedule.

``ClassBoard`` runs rounds of checks in a thread of its own: every ``limits.check_every``
seconds, every student's lab is looked at, the labs in parallel (``install.check_lab``: the
recipe's checks of the steps done before, run again; nothing is run or changed) and their
nodes' states read from libvirt. Each stage of each lab becomes a cell (passed, failed, partial,
not done) that remembers when its status last changed. A lab whose lock is held (a reset, an
install) is shown busy and looked at in a later round. ``reset`` brings one student's lab back
to the class's starting stage in the background (``class_reset``).

What the web page shows is ``view()``, a frozen ``BoardView`` (``labbuilder.classroom.board``
renders it).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from labbuilder.api import classroom
from labbuilder.api import install as installer
from labbuilder.api.facade import plan_lab
from labbuilder.common.errors import LabbuilderError, UsageError
from labbuilder.common.filelock import is_locked
from labbuilder.common.paths import lab_lock_path
from labbuilder.install.engine import StageOutcome, Status
from labbuilder.lab.classplan import student_lab
from labbuilder.lab.view import plan_from_dict
from labbuilder.lifecycle import registry, templates
from labbuilder.lifecycle.state import lab_state, load_state_record
from labbuilder.model.classroom import (
    FAILED,
    NOT_DONE,
    PARTIAL,
    PASSED,
    UNKNOWN,
    BoardCell,
    BoardRow,
    BoardView,
    ClassSpec,
)
from labbuilder.recipe.files import load_recipe
from labbuilder.recipe.render import applicable_stages

Log = Callable[[str], None]
DONE = {Status.DONE_BEFORE, Status.SKIPPED, Status.OK, Status.GUARDED}


def stage_status(outcome: StageOutcome) -> tuple[str, str]:
    """A stage's cell from its steps as ``Engine.check`` found them, and the first failure."""
    failed = [step for step in outcome.steps if step.status == Status.FAILED]
    if failed:
        first = failed[0]
        return FAILED, f"{first.node} {first.step}: {first.reason}"
    done = [step for step in outcome.steps if step.status in DONE]
    if len(done) == len(outcome.steps):
        return PASSED, ""
    if any(step.status != Status.SKIPPED for step in done):
        return PARTIAL, ""
    return NOT_DONE, ""


def reset_stage(spec: ClassSpec) -> str:
    if spec.template is not None:
        return templates.load_template(spec.template).stage
    assert spec.stage is not None  # the class file has one or the other
    return spec.stage


def board_stages(spec: ClassSpec) -> tuple[tuple[str, str], ...]:
    """The stages a student's lab has (the recipe's, for the lab's plan), in order."""
    recipe = load_recipe(spec.lab.recipe)
    lab = student_lab(spec, spec.students[0].name)
    record = load_state_record(lab_state(lab.name))
    if record is not None:
        plan = plan_from_dict(record["plan"])
    else:
        plan = plan_lab(lab, host_check=False).plan
    optional = lab.options.optional_stages
    return tuple((stage.name, stage.title) for stage in applicable_stages(recipe, plan, optional))


class ClassBoard:
    """The board's data, kept up to date by a thread of checks (``start``/``stop``)."""

    def __init__(self, spec: ClassSpec, *, log: Log | None = None) -> None:
        self.spec = spec
        self.log = log or (lambda _message: None)
        self.stages = board_stages(spec)
        self.reset_to = reset_stage(spec)
        self._lock = threading.Lock()
        self._rows: dict[str, BoardRow] = {
            s.name: BoardRow(
                student=s.name,
                lab=spec.lab_name(s.name),
                nodes=(),
                cells=tuple(BoardCell(name, UNKNOWN, None) for name, _ in self.stages),
                checked=None,
            )
            for s in spec.students
        }
        self._generation = {s.name: 0 for s in spec.students}  # bumped by each reset
        self._busy: dict[str, str] = {}
        self._round_seconds: float | None = None
        self._rounds = 0
        self._updated: float | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    # --- the page's view ---------------------------------------------------------------------

    def view(self) -> BoardView:
        with self._lock:
            rows = tuple(
                _with_busy(self._rows[s.name], self._busy.get(s.name, ""))
                for s in self.spec.students
            )
            return BoardView(
                class_name=self.spec.name,
                stages=self.stages,
                reset_stage=self.reset_to,
                rows=rows,
                check_every=self.spec.limits.check_every,
                round_seconds=self._round_seconds,
                rounds=self._rounds,
                updated=self._updated,
            )

    # --- the schedule ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="labbuilder-board", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.check_round()
            wait = self.spec.limits.check_every - (time.monotonic() - started)
            self._wake.wait(max(0.0, wait))
            self._wake.clear()

    def check_round(self) -> float:
        """Look at every student's lab once, in parallel; returns the seconds it took."""
        started = time.monotonic()
        students = [s.name for s in self.spec.students]
        workers = max(1, min(len(students), 2 * self.spec.limits.parallel))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(self._look, students))
        seconds = time.monotonic() - started
        with self._lock:
            self._round_seconds = seconds
            self._rounds += 1
            self._updated = time.time()
        return seconds

    def _look(self, student: str) -> None:
        with self._lock:
            generation = self._generation[student]
            if student in self._busy:
                return
        lab = student_lab(self.spec, student)
        if is_locked(lab_lock_path(lab.name)):
            return  # a command changes the lab now: looked at next round
        nodes: tuple[tuple[str, str], ...] = ()
        found: dict[str, tuple[str, str]] = {}
        error = ""
        try:
            entry = registry.registration(lab.name)
            if entry is None:
                error = "not up"
            else:
                row = classroom.student_status(self.spec, student)
                nodes = tuple((str(n["name"]), str(n["state"])) for n in row)
                stopped = [node for node, state in nodes if state != "running"]
                if not nodes:
                    error = "no nodes"
                else:  # a node that is not running fails its steps, named "unreachable"
                    error = f"not running: {', '.join(stopped)}" if stopped else ""
                    outcomes = installer.check_lab(lab)
                    found = {outcome.name: stage_status(outcome) for outcome in outcomes}
        except LabbuilderError as err:
            error = err.message
        except Exception as err:  # noqa: BLE001 - one lab's trouble shows in its row
            error = f"{type(err).__name__}: {err}"
        now = time.time()
        with self._lock:
            if self._generation[student] != generation or student in self._busy:
                return  # reset meanwhile: what was found is of the lab before
            old = {cell.stage: cell for cell in self._rows[student].cells}
            cells = []
            for name, _ in self.stages:
                status, detail = found.get(name, (UNKNOWN, ""))
                before = old[name]
                since = before.since if before.status == status else now
                cells.append(BoardCell(name, status, since, detail))
            self._rows[student] = BoardRow(
                student=student,
                lab=lab.name,
                nodes=nodes,
                cells=tuple(cells),
                checked=now,
                error=error,
            )

    # --- resets ------------------------------------------------------------------------------

    def reset(self, student: str) -> None:
        """Bring the student's lab back to the class's starting stage, in the background."""
        if student not in self._generation:
            raise UsageError(f"there is no student {student!r} in class {self.spec.name}")
        with self._lock:
            if student in self._busy:
                return
            self._busy[student] = f"reset to {self.reset_to}"
            self._generation[student] += 1
        thread = threading.Thread(
            target=self._reset, args=(student,), name=f"labbuilder-reset-{student}", daemon=True
        )
        thread.start()

    def _reset(self, student: str) -> None:
        error = ""
        try:
            self.log(f"{student}: reset to {self.reset_to}")
            classroom.class_reset(self.spec, self.reset_to, [student])
        except LabbuilderError as err:
            error = f"reset failed: {err.message}"
        except Exception as err:  # noqa: BLE001 - shown in the student's row
            error = f"reset failed: {type(err).__name__}: {err}"
        with self._lock:
            del self._busy[student]
            self._generation[student] += 1
            self._rows[student] = replace(self._rows[student], error=error)
        self._wake.set()  # look at it again now


def _with_busy(row: BoardRow, busy: str) -> BoardRow:
    return replace(row, busy=busy) if busy else row
