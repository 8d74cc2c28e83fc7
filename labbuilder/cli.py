"""The command line: builds the parser from ``labbuilder.commands``, runs a handler, and turns
errors into messages and exit codes.

Exit codes: 0 ok, 1 failure, 2 bad input or usage. The one ``except LabbuilderError`` below is
where every error reaches the user; tracebacks appear only with ``--debug``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import libvirt
from rich.console import Console

from labbuilder import __version__
from labbuilder.commands import host, images, install, lab, snapshot
from labbuilder.commands.common import Handler
from labbuilder.errors import LabbuilderError

COMMAND_MODULES = (lab, install, snapshot, images, host)


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
    for module in COMMAND_MODULES:
        module.register(commands)
    return parser


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
    except libvirt.libvirtError as err:
        # Adapters translate the errors they expect; this is the net for the rest.
        if args.debug:
            raise
        errors.print(f"error: libvirt: {err.get_error_message()}", markup=False)
        errors.print("hint: run again with --debug to see where it happened", markup=False)
        return 1
    except KeyboardInterrupt:
        errors.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
