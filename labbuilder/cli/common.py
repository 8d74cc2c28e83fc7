"""Arguments and helpers shared by the subcommands.

Every command that acts on a lab selects it the same way: ``--lab NAME`` for a built-in lab,
``-f``/``--file LAB.toml`` for a lab file, or the lab file as a positional argument where the
command has one for it (the same as ``--file``). Neither means the default lab.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
from collections.abc import Callable, Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from labbuilder.api import facade as api
from labbuilder.common.errors import UsageError
from labbuilder.lifecycle.state import check_state_root, lab_state, load_state_record
from labbuilder.model.lab import Lab

Handler = Callable[[argparse.Namespace, Console], int]
Subparsers = Any  # argparse's _SubParsersAction is private

POOL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")


class Sizes(StrEnum):
    """How a command treats node sizes below the guide's minimums."""

    FLAG = "flag"  # refused unless --allow-small (plan, up, run)
    ACCEPT = "accept"  # accepted: the command acts on a lab that exists (down, status, ...)
    IF_UP = "if-up"  # accepted when the lab is up (``up --allow-small`` decided), else refused


def add_lab_arguments(
    parser: argparse.ArgumentParser, *, positional: bool = True, allow_small: bool = False
) -> None:
    """``--lab NAME``, ``-f/--file LAB.toml`` and (``positional``) a positional LAB.toml."""
    if positional:
        parser.add_argument(
            "lab_file", nargs="?", metavar="LAB.toml", help="a lab file (the same as --file)"
        )
    parser.add_argument("-f", "--file", dest="file", metavar="LAB.toml", help="a lab file")
    parser.add_argument(
        "--lab",
        metavar="NAME",
        help=f"a built-in lab (see `labbuilder labs`); default {api.DEFAULT_LAB}",
    )
    if allow_small:
        parser.add_argument(
            "--allow-small",
            action="store_true",
            help="allow node sizes below the guide's or the recipe's minimums (they become "
            "warnings)",
        )


def add_json(parser: argparse.ArgumentParser, what: str = "the result") -> None:
    parser.add_argument("--json", action="store_true", help=f"print {what} as JSON")


def lab_selection(args: argparse.Namespace) -> tuple[Path | None, str | None]:
    """The lab file and built-in lab name given on the command line, checked."""
    positional = getattr(args, "lab_file", None)
    option = getattr(args, "file", None)
    name = getattr(args, "lab", None)
    if positional is not None and option is not None:
        raise UsageError(
            f"the lab file is given twice: {positional!r} and --file {option!r}",
            "give it once, as LAB.toml or with --file",
        )
    file = option if option is not None else positional
    flag = "--file" if option is not None else "LAB.toml"
    if file is not None and not str(file).strip():
        raise UsageError(
            f"{flag} {file!r}: the lab file's path is empty",
            "give a lab file's path, or --lab NAME for a built-in lab",
        )
    if name is not None:
        if not name.strip():
            raise UsageError(
                f"--lab {name!r}: the lab's name is empty",
                f"give a built-in lab's name (`labbuilder labs`), or leave --lab out for the "
                f"default lab {api.DEFAULT_LAB}",
            )
        if "/" in name or name.endswith(".toml") or name in (".", ".."):
            raise UsageError(
                f"--lab {name!r}: --lab takes a built-in lab's name, not a path",
                f"give a lab file with --file {name}",
            )
    if file is not None and name is not None:
        raise UsageError(
            f"give a lab file or --lab NAME, not both ({file!r} and --lab {name!r})",
            "--lab names a built-in lab; --file or LAB.toml a lab file",
        )
    return (Path(file) if file is not None else None), name


def selected_lab(args: argparse.Namespace, sizes: Sizes = Sizes.ACCEPT) -> Lab:
    """The lab the command line selects (``api.DEFAULT_LAB`` when it names none)."""
    file, name = lab_selection(args)
    recipe = getattr(args, "recipe", None)  # `install --recipe`: the lab is checked against it
    if sizes == Sizes.FLAG:
        allow_small = bool(getattr(args, "allow_small", False))
        return api.load_lab(file, name, allow_small=allow_small, recipe=recipe)
    # Commands that plan or install check the lab against its recipe; the others (down,
    # status, ssh, snapshots) must work on a lab whose file no longer suits its recipe.
    lab = api.load_lab(
        file, name, allow_small=True, recipe=recipe, check_recipe=sizes == Sizes.IF_UP
    )
    if sizes == Sizes.IF_UP and lab.warnings and load_state_record(lab_state(lab.name)) is None:
        api.load_lab(file, name, recipe=recipe)  # not up: refuse the sizes as `up` would
    return lab


def lab_option(lab: Lab) -> str:
    """The option that selects ``lab`` again: ``--lab NAME`` or ``--file PATH`` (quoted)."""
    if lab.source.startswith("built-in lab "):
        return f"--lab {lab.source.removeprefix('built-in lab ')}"
    return f"--file {shlex.quote(lab.source)}"


def check_environment(environ: Mapping[str, str] | None = None) -> None:
    """The environment variables labbuilder reads, checked before a command runs."""
    env = os.environ if environ is None else environ
    for variable in ("LABBUILDER_STATE_DIR", "LABBUILDER_POOL_DIR", "LABBUILDER_CACHE_DIR"):
        value = env.get(variable)
        if not value:
            continue  # unset or empty: the default
        if not value.strip() or "\0" in value or "\n" in value:
            raise UsageError(
                f"{variable}={value!r} is not a directory's path",
                f"unset {variable}, or set it to an absolute path",
            )
        if not Path(value).is_absolute():
            raise UsageError(
                f"{variable}={value!r} is a relative path",
                f"set {variable} to an absolute path, e.g. {Path(value).absolute()}",
            )
    pool = env.get("LABBUILDER_POOL")
    if pool and not POOL_NAME.match(pool):
        raise UsageError(
            f"LABBUILDER_POOL={pool!r} is not a valid storage pool name",
            "use 1-64 letters, digits, '_', '.', '+' or '-', starting with a letter or digit",
        )
    check_state_root()


def plain_table(title: str, columns: tuple[str, ...], **options: Any) -> Table:
    """A table whose title and cells are shown literally (values are never rich markup)."""
    table = Table(title=Text(title), **options)
    for column in columns:
        table.add_column(column)
    return table


def add_plain_row(table: Table, *cells: str | Text) -> None:
    table.add_row(*(cell if isinstance(cell, Text) else Text(cell) for cell in cells))
