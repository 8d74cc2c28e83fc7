"""Arguments and helpers shared by the subcommands."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from labbuilder import api
from labbuilder.model import Lab

Handler = Callable[[argparse.Namespace, Console], int]
Subparsers = Any  # argparse's _SubParsersAction is private


def add_lab_arguments(parser: argparse.ArgumentParser, *, force: bool = True) -> None:
    """Select a lab the way `plan` does: a lab file, or a built-in lab by name."""
    parser.add_argument("lab_file", nargs="?", type=Path, metavar="LAB.toml", help="a lab file")
    parser.add_argument(
        "--lab",
        metavar="NAME",
        help=f"a built-in lab (see `labbuilder labs`); default {api.DEFAULT_LAB}",
    )
    if force:
        parser.add_argument(
            "--force",
            action="store_true",
            help="allow sizes below the guide's minimums (they become warnings)",
        )


def add_lab_option(parser: argparse.ArgumentParser) -> None:
    """For commands that take a node or command as positional arguments: lab by option only."""
    parser.add_argument(
        "--lab",
        metavar="NAME_OR_FILE",
        help=f"the lab: a built-in lab's name or a lab file (default {api.DEFAULT_LAB})",
    )


def selected_lab(args: argparse.Namespace) -> Lab:
    file = getattr(args, "lab_file", None)
    name = getattr(args, "lab", None)
    if file is None and name is not None and (name.endswith(".toml") or "/" in name):
        file, name = Path(name), None
    return api.load_lab(file, name, force=getattr(args, "force", False))
