"""``python -m labbuilder.adapters.nsexec [--netns NAME] --hosts FILE -- PROGRAM [ARG ...]``:
run a program where a lab's nodes are, by their names: in the lab's gateway namespace (an
isolated lab; none: the host's own network) and with ``FILE`` as its ``/etc/hosts`` (a mount
namespace of its own). What ``labbuilder verify`` runs Tempest through; the host's network and
files stay as they are.

May import: ``adapters.netns``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from labbuilder.adapters import netns


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m labbuilder.adapters.nsexec")
    parser.add_argument("--netns", help="the network namespace (default: the host's)")
    parser.add_argument("--hosts", required=True, type=Path, help="the program's /etc/hosts")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the program to run")
    try:
        netns.see_hosts(args.hosts.resolve(strict=True))
        if args.netns:
            netns.enter(args.netns)
        os.execvp(command[0], command)
    except OSError as err:
        print(f"nsexec: {command[0]}: {err}", file=sys.stderr)  # noqa: T201
        raise SystemExit(127) from None


if __name__ == "__main__":
    main()
