"""The command line: builds the parser from ``labbuilder.commands``, runs a handler, and turns
errors into messages and exit codes.

Exit codes: 0 ok, 1 failure, 2 bad input or usage, 130 interrupted (Ctrl-C). Every error reaches
the user here as one ``error: ...`` line and a ``hint: ...`` line; tracebacks appear only with
``--debug``. Commands that leave reports (``up``, ``install``, ``run``) write them before their
error comes here.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence

from rich.console import Console

from labbuilder import __version__
from labbuilder.adapters.libvirterrors import hypervisor_error
from labbuilder.cli import (
    classroom,
    gateway,
    host,
    images,
    install,
    lab,
    recipe,
    run,
    snapshot,
    template,
    verify,
)
from labbuilder.cli.common import Handler, check_environment
from labbuilder.common.errors import LabbuilderError

COMMAND_MODULES = (
    lab,
    gateway,
    install,
    run,
    verify,
    recipe,
    snapshot,
    template,
    classroom,
    images,
    host,
)
EXIT_INTERRUPTED = 130


class Parser(argparse.ArgumentParser):
    """argparse, with its errors in labbuilder's form: one ``error:`` line and a hint, exit 2."""

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        parsed, extras = self.parse_known_args(args, namespace)
        # argparse leaves an optional positional LAB.toml unread when an option comes between
        # it and the positional before it (`template save NAME --stage S LAB.toml`)
        lone = len(extras) == 1 and not extras[0].startswith("-")
        if lone and getattr(parsed, "lab_file", "") is None:
            parsed.lab_file, extras = extras[0], []
        if extras:
            command = getattr(parsed, "command", None)
            where = f"{self.prog} {command}" if command else self.prog
            hint = f"`{where} --help` lists its options"
            if "--force" in extras and command in ("plan", "up"):
                hint = "--allow-small allows sizes below the guide's minimums"
            elif "--allow-small" in extras and command == "install":
                hint = (
                    "sizes are decided when the lab comes up (`up --allow-small`); "
                    "`install --force` runs finished steps again"
                )
            self.exit(2, f"error: {where}: unknown arguments: {' '.join(extras)}\nhint: {hint}\n")
        return parsed

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(
            2,
            f"error: {self.prog}: {one_line(message)}\n"
            f"hint: `{self.prog} --help` lists the arguments\n",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="labbuilder",
        description=(
            "Build a virtualised OpenStack lab on this KVM/libvirt host and install OpenStack "
            "into it by following the installation guide, step by step."
        ),
        epilog="Run `labbuilder COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"labbuilder {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=Parser
    )
    for module in COMMAND_MODULES:
        module.register(commands)
    return parser


def one_line(text: str) -> str:
    """``text`` on one line: its lines joined with "; " (control characters shown escaped)."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    joined = "; ".join(lines)
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in joined)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.debug:
        # paramiko logs a failed (re)connection with its traceback; the error comes here.
        logging.getLogger("paramiko").addHandler(logging.NullHandler())
        logging.getLogger("paramiko").propagate = False
    # Nothing labbuilder creates is writable by group or others, whatever the caller's umask.
    os.umask(os.umask(0) | 0o022)
    # Values (lab names, descriptions, output of guests) are printed literally, never as markup.
    console = Console(emoji=False, highlight=False, markup=False)
    if not console.is_terminal:
        console.width = max(console.width, 160)  # pipes and logs get whole lines, not "…"
    errors = Console(stderr=True, emoji=False, highlight=False, markup=False, soft_wrap=True)
    handler: Handler = args.handler

    def report(message: str, hint: str | None, code: int) -> int:
        if args.debug:
            errors.file.write(traceback.format_exc())
        errors.print(f"error: {one_line(message)}")
        errors.print(f"hint: {one_line(hint or 'run again with --debug to see where it happened')}")
        return code

    try:
        check_environment()
        return handler(args, console)
    except BaseException as err:
        code = handle(err, report)
        leave_stuck_threads(code)
        return code


def handle(err: BaseException, report: Callable[[str, str | None, int], int]) -> int:
    """The exit code for ``err``, after ``report`` showed it (with any notes in the hint)."""
    notes = "; ".join(getattr(err, "__notes__", ()))

    def with_notes(hint: str | None) -> str | None:
        return "; ".join(part for part in (hint, notes) if part) or None

    try:
        raise err
    except (SystemExit, GeneratorExit):
        raise
    except LabbuilderError:
        assert isinstance(err, LabbuilderError)
        return report(err.message, with_notes(err.hint), err.exit_code)
    except KeyboardInterrupt:
        return report(
            "interrupted",
            with_notes(
                "run the same command again to go on (`up` and `install` continue where they "
                "stopped)"
            ),
            EXIT_INTERRUPTED,
        )
    except OSError:
        return report(str(err), with_notes("run again with --debug to see where it happened"), 1)
    except Exception:  # noqa: BLE001 - the last resort: one line, not a traceback
        # Adapters translate the errors they expect; this is the net for libvirt's others.
        libvirt_error = hypervisor_error(err)
        if libvirt_error is not None:
            return report(
                libvirt_error.message,
                with_notes("run again with --debug to see where it happened"),
                libvirt_error.exit_code,
            )
        return report(
            f"unexpected {type(err).__name__}: {err}",
            with_notes("run again with --debug to see the traceback, and report it"),
            1,
        )


def leave_stuck_threads(code: int) -> None:
    """After an error or Ctrl-C, the threads of a run that stopped (waiting for a guest or a
    connection) may not end soon, and Python waits for a thread pool's threads at exit. The
    reports are written and the error shown: leave without waiting for them."""
    deadline = time.monotonic() + 2.0
    for thread in run_threads():
        thread.join(max(0.0, deadline - time.monotonic()))
    if run_threads():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_threads() -> list[threading.Thread]:
    """Threads of labbuilder's runs still alive: thread pools' and the install's."""
    return [
        thread
        for thread in threading.enumerate()
        if thread.is_alive()
        and thread is not threading.current_thread()
        and thread.name.startswith(("ThreadPoolExecutor-", "labbuilder-"))
    ]


if __name__ == "__main__":
    sys.exit(main())
