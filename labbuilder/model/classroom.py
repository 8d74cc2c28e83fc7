"""A class: one lab per student, stamped from one template (or installed from scratch), and
the host's limits for it. Frozen records; ``labbuilder.lab.classfile`` reads them from a class
file."""

from __future__ import annotations

from dataclasses import dataclass

from labbuilder.model.lab import Lab


@dataclass(frozen=True)
class Student:
    name: str  # lower-case letters and digits: the lab is "<class>-<name>"
    ssh_key: str | None = None  # an OpenSSH public key line (type, base64, comment)


@dataclass(frozen=True)
class ClassLimits:
    parallel: int = 2  # labs made at once
    access_port: int = 2222  # the students' SSH entry on this host
    access_address: str = "0.0.0.0"  # where the entry listens
    access_host: str = ""  # how students name this host ("": its fully qualified name)
    board_port: int = 8080  # the trainer's board (127.0.0.1 unless board_address says)
    board_address: str = "127.0.0.1"
    check_every: int = 30  # seconds between the board's rounds of checks


@dataclass(frozen=True)
class ClassSpec:
    name: str
    source: str  # the class file
    lab: Lab  # the students' lab, named after the class (each student's lab renames it)
    lab_ref: str  # as the class file says: a built-in lab or a lab file
    template: str | None  # students start from this template...
    stage: str | None  # ...or, without one, from scratch installed through this stage
    students: tuple[Student, ...]
    limits: ClassLimits
    description: str = ""

    def lab_name(self, student: str) -> str:
        return f"{self.name}-{student}"

    def student(self, name: str) -> Student:
        return next(s for s in self.students if s.name == name)


# --- the trainer's board ----------------------------------------------------------------------

# A stage of a student's lab, as its checks found it now.
PASSED = "passed"  # every step done, its checks pass (or skipped by the plan)
FAILED = "failed"  # a done step's check fails now, or a node cannot be reached
PARTIAL = "partial"  # some steps done, others not yet (a stage the student is in)
NOT_DONE = "not done"  # no step of the stage done yet
UNKNOWN = "unknown"  # not looked at yet, or the lab is not up


@dataclass(frozen=True)
class BoardCell:
    stage: str
    status: str  # one of the above
    since: float | None  # when the status last changed (epoch seconds)
    detail: str = ""  # the first failing step and why


@dataclass(frozen=True)
class BoardRow:
    student: str
    lab: str
    nodes: tuple[tuple[str, str], ...]  # (node, domain state)
    cells: tuple[BoardCell, ...]  # one per board stage, in order
    checked: float | None  # when the last round of checks on this lab ended
    busy: str = ""  # what is being done to the lab (a reset), or ""
    error: str = ""  # why the lab could not be looked at

    @property
    def last_change(self) -> float | None:
        times = [cell.since for cell in self.cells if cell.since is not None]
        return max(times) if times else None


@dataclass(frozen=True)
class BoardView:
    class_name: str
    stages: tuple[tuple[str, str], ...]  # (stage, title), the recipe's order
    reset_stage: str  # where a reset takes a student's lab
    rows: tuple[BoardRow, ...]
    check_every: int
    round_seconds: float | None  # how long the last round of checks took
    rounds: int  # rounds finished since the board started
    updated: float | None  # when the last round ended
