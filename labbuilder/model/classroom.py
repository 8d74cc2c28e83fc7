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
