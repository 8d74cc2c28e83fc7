"""The command line: parses arguments, calls ``labbuilder.api``, prints, picks the exit code.

Exit codes: 0 ok, 1 failure, 2 bad input or usage. The one ``except LabbuilderError`` below is
where every error reaches the user; tracebacks appear only with ``--debug``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from labbuilder import __version__, api
from labbuilder.errors import LabbuilderError
from labbuilder.planview import plan_as_dict, plan_tables

Handler = Callable[[argparse.Namespace, Console], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="labbuilder",
        description=(
            "Build a virtualised OpenStack lab on this KVM/libvirt host and install OpenStack "
            "into it by following the installation guide, step by step."
        ),
        epilog="Run `labbuilder COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"labbuilder {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    plan = commands.add_parser(
        "plan",
        help="show what `up` would create for a lab, without creating anything",
        description=(
            "Validate a lab and print its plan: libvirt networks and bridges, and per node its "
            "vCPUs, memory, disks, NICs in the guide's order (eth0, eth1, eth2), addresses and "
            "MACs. The plan is checked against this host: a subnet the host already routes, or "
            "more memory or disk than the host has, is refused before anything is created."
        ),
    )
    add_lab_arguments(plan)
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.add_argument(
        "--auto-subnets",
        action="store_true",
        help="move lab networks that overlap the host's to free subnets instead of refusing",
    )
    plan.add_argument(
        "--no-host-check",
        action="store_true",
        help="plan without looking at this host (no route, libvirt or capacity checks)",
    )
    plan.set_defaults(handler=cmd_plan)

    labs = commands.add_parser(
        "labs",
        help="list the built-in labs",
        description=(
            "List the built-in labs, named after the guide's architectures. Use one with "
            "`labbuilder plan --lab NAME`, or write a lab file of your own: every key you leave "
            "out takes the guide's value (README: lab file reference)."
        ),
    )
    labs.add_argument("--json", action="store_true", help="print the list as JSON")
    labs.set_defaults(handler=cmd_labs)
    return parser


def add_lab_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("lab_file", nargs="?", type=Path, metavar="LAB.toml", help="a lab file")
    parser.add_argument(
        "--lab",
        metavar="NAME",
        help=f"a built-in lab (see `labbuilder labs`); default {api.DEFAULT_LAB}",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="allow sizes below the guide's minimums (they become warnings)",
    )


def cmd_plan(args: argparse.Namespace, console: Console) -> int:
    lab = api.load_lab(args.lab_file, args.lab, force=args.force)
    result = api.plan_lab(lab, auto_subnets=args.auto_subnets, host_check=not args.no_host_check)
    if args.json:
        data = plan_as_dict(result.plan)
        data["host_notes"] = list(result.notes)
        console.print_json(json.dumps(data))
        return 0
    console.print(plan_tables(result.plan), soft_wrap=True)
    for note in result.notes:
        console.print(f"note: {note}", style="yellow")
    return 0


def cmd_labs(args: argparse.Namespace, console: Console) -> int:
    labs = api.list_labs()
    if args.json:
        console.print_json(
            json.dumps(
                [
                    {
                        "name": lab.name,
                        "description": lab.description,
                        "networking": str(lab.networking),
                        "nodes": [node.name for node in lab.nodes],
                    }
                    for lab in labs
                ]
            )
        )
        return 0
    table = Table(title="built-in labs")
    for column in ("name", "networking", "nodes", "description"):
        table.add_column(column)
    for lab in labs:
        table.add_row(
            lab.name, str(lab.networking), ", ".join(n.name for n in lab.nodes), lab.description
        )
    console.print(table)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    console = Console(emoji=False, highlight=False)
    if not console.is_terminal:
        console.width = max(console.width, 160)  # pipes and logs get whole lines, not "…"
    errors = Console(stderr=True, emoji=False, highlight=False, soft_wrap=True)
    handler: Handler = args.handler
    try:
        return handler(args, console)
    except LabbuilderError as err:
        if args.debug:
            raise
        errors.print(f"error: {err.message}", markup=False)
        if err.hint:
            errors.print(f"hint: {err.hint}", markup=False)
        return err.exit_code
    except KeyboardInterrupt:
        errors.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
