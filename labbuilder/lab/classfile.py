"""Class files (TOML) → ``ClassSpec``: a class of students, each with a lab of their own.

Validated like a lab file: every problem is one ``LabFileError`` naming the file, the key
path, the value and the rule (exit 2). A class file is data too: its lab is a built-in lab or
a lab file inside the class file's folder; a student's SSH key must be a plain OpenSSH public
key line (no options: it is written into the class's own authorized_keys, behind a forced
command).

    name = "os101"
    lab = "guide-3node"          # a built-in lab or a lab file beside this file
    template = "os101-image"     # students start from this template ...
    [[students]]
    name = "alice"
    [[students]]
    name = "bob"
    ssh_key = "ssh-ed25519 AAAA... bob@laptop"
    [limits]                     # all optional
    parallel = 2                 # labs made at once
    access_port = 2222           # the students' SSH entry on this host
    board_port = 8080            # the trainer's board

Imports lab files, the model and common.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import struct
from dataclasses import replace
from pathlib import Path
from typing import Any

from labbuilder.common.errors import LabFileError
from labbuilder.common.tomlread import (
    Where,
    check_keys,
    expect,
    parse_int,
    parse_line,
    parse_name,
    parse_str,
    parse_table,
)
from labbuilder.lab.check import check_lab_recipe
from labbuilder.lab.files import load_builtin_lab, load_lab_file, parse_toml
from labbuilder.lab.refs import read_lab_text
from labbuilder.model.classroom import ClassLimits, ClassSpec, Student
from labbuilder.recipe.files import load_recipe
from labbuilder.recipe.sizes import fit_lab

TOP_KEYS = ("name", "description", "lab", "template", "stage", "students", "limits")
STUDENT_KEYS = ("name", "ssh_key")
LIMIT_KEYS = (
    "parallel",
    "access_port",
    "access_address",
    "access_host",
    "board_port",
    "board_address",
    "check_every",
)
MAX_STUDENTS = 64
MAX_CLASS_NAME = 20
MAX_STUDENT_NAME = 16
STUDENT_NAME = re.compile(r"[a-z][a-z0-9]*")
TEMPLATE_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,39}")
STAGE_NAME = re.compile(r"[a-z][a-z0-9-]{0,62}")
KEY_TYPES = (
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
)
KEY_COMMENT = re.compile(r"[A-Za-z0-9@._+:=-]{0,100}")
HINT = "the README's class file reference gives each key's rule"


def load_class_file(path: Path) -> ClassSpec:
    """Read and validate a class file (a regular file of at most 1 MiB of UTF-8 TOML)."""
    source = str(path)
    data = parse_toml(read_lab_text(path), source)
    try:
        return class_from_data(data, source=source, folder=path.parent)
    except LabFileError as err:
        err.hint = err.hint or HINT
        raise


def class_from_data(data: dict[str, Any], *, source: str, folder: Path) -> ClassSpec:
    where = Where(source)
    check_keys(data, TOP_KEYS, where)
    name = parse_name(data.get("name"), where.key("name"), max_length=MAX_CLASS_NAME)
    if "lab" not in data:
        raise where.problem("'lab' is missing", 'name the students\' lab: lab = "guide-3node"')
    lab_ref = parse_str(data["lab"], where.key("lab"))
    lab = _load_lab(lab_ref, where.key("lab"), folder)
    template = None
    if "template" in data:
        template = parse_str(data["template"], where.key("template"))
        if not TEMPLATE_NAME.fullmatch(template):
            raise where.key("template").error(
                template,
                "is not a template name",
                "`labbuilder template list` shows the host's templates",
            )
    stage = None
    if "stage" in data:
        stage = parse_str(data["stage"], where.key("stage"))
        if not STAGE_NAME.fullmatch(stage):
            raise where.key("stage").error(stage, "is not a stage name", 'e.g. stage = "image"')
        if template is not None:
            raise where.key("stage").error(
                stage,
                "is given with a template, whose stage it is already",
                "remove 'stage', or 'template' to install every lab from scratch through it",
            )
    students = _students(data.get("students"), where.key("students"))
    limits = _limits(data.get("limits", {}), where.key("limits"))
    for student in students:
        lab_name = f"{name}-{student.name}"
        if len(lab_name) > 40:
            raise where.key("students").problem(
                f"student {student.name}'s lab would be named {lab_name}, longer than a lab "
                "name may be (40 characters)",
                "shorten the class's or the student's name",
            )
    recipe = load_recipe(lab.recipe)
    check_lab_recipe(lab, recipe)
    lab = fit_lab(lab, recipe)  # sizes the lab leaves out: the recipe's minimums
    lab = replace(lab, name=name, options=replace(lab.options, isolated=True))
    return ClassSpec(
        name=name,
        source=source,
        lab=lab,
        lab_ref=lab_ref,
        template=template,
        stage=stage,
        students=students,
        limits=limits,
        description=parse_line(
            data.get("description", ""), where.key("description"), max_length=200
        ),
    )


def _load_lab(ref: str, where: Where, folder: Path) -> Any:
    if not ref.endswith(".toml") and "/" not in ref:
        try:
            return load_builtin_lab(ref)
        except LabFileError as err:
            raise where.error(ref, "is not a built-in lab", err.hint) from None
    path = (folder / ref).resolve()
    if path.parent != folder.resolve() and folder.resolve() not in path.parents:
        raise where.error(
            ref,
            "is outside the class file's folder",
            "put the lab file beside the class file (or in a folder under it)",
        )
    return load_lab_file(path)


def _students(value: object, where: Where) -> tuple[Student, ...]:
    if value is None:
        raise where.problem("'students' is missing", 'add [[students]] tables: name = "alice"')
    items = expect(value, list, "a list of [[students]] tables", where)
    if not items:
        raise where.error(items, "is empty", "a class has at least one student")
    if len(items) > MAX_STUDENTS:
        raise where.error(f"{len(items)} students", f"is more than {MAX_STUDENTS}")
    students = []
    seen: set[str] = set()
    for index, item in enumerate(items):
        at = where.item(index)
        table = parse_table(item, at)
        check_keys(table, STUDENT_KEYS, at)
        name = parse_str(table.get("name"), at.key("name"))
        if not STUDENT_NAME.fullmatch(name) or len(name) > MAX_STUDENT_NAME:
            raise at.key("name").error(
                name,
                "is not a valid student name",
                f"use lower-case letters and digits, starting with a letter, at most "
                f"{MAX_STUDENT_NAME} characters (the lab is <class>-<student>)",
            )
        if name in seen:
            raise at.key("name").error(name, "is given twice", "each student once")
        seen.add(name)
        key = None
        if "ssh_key" in table:
            key = parse_ssh_key(table["ssh_key"], at.key("ssh_key"))
        students.append(Student(name, key))
    return tuple(students)


def parse_ssh_key(value: object, where: Where) -> str:
    """An OpenSSH public key line: a key type, its base64 blob (which names the same type) and
    an optional plain comment; nothing else (no options, no second line)."""
    text = parse_str(value, where).strip()
    hint = 'paste the student\'s public key, e.g. "ssh-ed25519 AAAAC3Nza... alice@laptop"'
    parts = text.split(" ")
    if len(parts) not in (2, 3) or parts[0] not in KEY_TYPES:
        raise where.error(text, "is not an OpenSSH public key line", hint)
    try:
        blob = base64.b64decode(parts[1], validate=True)
        (length,) = struct.unpack(">I", blob[:4])
        kind = blob[4 : 4 + length].decode()
    except (binascii.Error, struct.error, UnicodeDecodeError, ValueError):
        raise where.error(text, "has a key that is not base64 of an SSH key", hint) from None
    if kind != parts[0]:
        raise where.error(text, f"says {parts[0]} but holds a {kind} key", hint)
    if len(parts) == 3 and not KEY_COMMENT.fullmatch(parts[2]):
        raise where.error(
            text, "has a comment with characters other than letters, digits and @._+:=-", hint
        )
    return text


def _limits(value: object, where: Where) -> ClassLimits:
    table = parse_table(value, where)
    check_keys(table, LIMIT_KEYS, where)
    defaults = ClassLimits()
    address = parse_str(
        table.get("board_address", defaults.board_address), where.key("board_address")
    )
    if not _is_address(address):
        raise where.key("board_address").error(address, "is not an IP address")
    listen = parse_str(
        table.get("access_address", defaults.access_address), where.key("access_address")
    )
    if not _is_address(listen):
        raise where.key("access_address").error(listen, "is not an IP address")
    host = parse_str(table.get("access_host", ""), where.key("access_host"))
    if host and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}", host):
        raise where.key("access_host").error(host, "is not a host name or address")
    return ClassLimits(
        access_address=listen,
        access_host=host,
        parallel=parse_int(
            table.get("parallel", defaults.parallel), where.key("parallel"), minimum=1, maximum=16
        ),
        access_port=parse_int(
            table.get("access_port", defaults.access_port),
            where.key("access_port"),
            minimum=1024,
            maximum=65535,
        ),
        board_port=parse_int(
            table.get("board_port", defaults.board_port),
            where.key("board_port"),
            minimum=1024,
            maximum=65535,
        ),
        board_address=address,
        check_every=parse_int(
            table.get("check_every", defaults.check_every),
            where.key("check_every"),
            minimum=5,
            maximum=3600,
        ),
    )


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
