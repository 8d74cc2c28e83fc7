"""Reaching a lab's nodes from the host: forward (a node's port on a port of the host), gateway
(a command run in an isolated lab's gateway namespace), relay (ssh's ProxyCommand)."""

from __future__ import annotations

import argparse
import os
import re

from rich.console import Console

from labbuilder.api import facade as api
from labbuilder.cli.common import Subparsers, add_lab_arguments, selected_lab
from labbuilder.common.errors import UsageError


def register(commands: Subparsers) -> None:
    forward = commands.add_parser(
        "forward",
        help="forward a port on this host to a node's port (the dashboard, the APIs)",
        description=(
            "Listen on a port of this host and relay every connection to a node's port, "
            "for example `labbuilder forward controller:80 --port 8080`, then open "
            "http://localhost:8080/horizon. An isolated lab's nodes are reached from its "
            "gateway namespace; others directly. Runs until Ctrl-C."
        ),
    )
    add_lab_arguments(forward, positional=False)
    forward.add_argument("target", metavar="NODE:PORT", help="the node and its port")
    forward.add_argument(
        "--port",
        type=int,
        metavar="PORT",
        help="the port on this host (default: the node's port; 0 picks a free one)",
    )
    forward.add_argument(
        "--address",
        default="127.0.0.1",
        metavar="ADDRESS",
        help="the host address to listen on (default 127.0.0.1: this host only)",
    )
    forward.set_defaults(handler=cmd_forward)

    gateway = commands.add_parser(
        "gateway",
        help="run a command in an isolated lab's gateway namespace (ping a floating IP)",
        description=(
            "Run a command where an isolated lab's gateways are (10.0.0.1, 203.0.113.1): what "
            "the guide does from the host, for example `labbuilder gateway -- ping -c 3 "
            "203.0.113.101`. Without a command: a shell there."
        ),
    )
    add_lab_arguments(gateway, positional=False)
    gateway.add_argument("command", nargs=argparse.REMAINDER, help="the command and arguments")
    gateway.set_defaults(handler=cmd_gateway)

    relay = commands.add_parser(
        "relay",
        help="relay standard input and output to a lab node's port (ssh's ProxyCommand)",
        description=(
            "Connect standard input and output to HOST:PORT as the lab sees it. The ssh_config "
            "of an isolated lab (`labbuilder ssh-config`) uses it as its ProxyCommand."
        ),
    )
    relay.add_argument("lab_name", metavar="LAB", help="the name of a lab that is up")
    relay.add_argument("host", help="a node's address")
    relay.add_argument("port", type=int, help="the port")
    relay.set_defaults(handler=cmd_relay)


def parse_target(text: str) -> tuple[str, int]:
    match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9-]*):(\d{1,5})", text)
    if match is None or not 0 < int(match.group(2)) < 65536:
        raise UsageError(
            f"NODE:PORT = {text!r} is not a node and a port", "for example controller:80"
        )
    return match.group(1), int(match.group(2))


def cmd_forward(args: argparse.Namespace, console: Console) -> int:
    node, port = parse_target(args.target)
    listen_port = port if args.port is None else args.port
    if not 0 <= listen_port < 65536:
        raise UsageError(f"--port {listen_port} is not a port", "give 1-65535, or 0 for any")
    lab = selected_lab(args)
    forward = api.forward(lab.name, node, port, (args.address, listen_port))
    host, bound = forward.address
    console.print(
        f"forwarding {host}:{bound} to {node}:{port} of lab {lab.name}; Ctrl-C stops",
        markup=False,
        highlight=False,
    )
    try:
        forward.serve_forever()
    finally:
        forward.close()
    return 0


def cmd_gateway(args: argparse.Namespace, console: Console) -> int:
    lab = selected_lab(args)
    command = [part for part in args.command if part != "--"] or [
        os.environ.get("SHELL", "/bin/sh")
    ]
    api.enter_gateway(lab.name)
    try:
        os.execvp(command[0], command)
    except FileNotFoundError:
        raise UsageError(f"{command[0]}: no such program", "give a program on PATH") from None
    return 0  # not reached


def cmd_relay(args: argparse.Namespace, console: Console) -> int:
    api.relay_stdio(args.lab_name, args.host, args.port)
    return 0
