"""Class commands: ``class plan | up | status | reset | down CLASS.toml``."""

from __future__ import annotations

import argparse
import json
import os
import secrets
from pathlib import Path
from typing import Any

from rich.console import Console

from labbuilder.adapters import web
from labbuilder.api import classroom
from labbuilder.api.board import ClassBoard
from labbuilder.api.classroom import StudentResult
from labbuilder.classroom.board import board_dict, make_app
from labbuilder.cli.common import Subparsers, add_json, add_plain_row, plain_table
from labbuilder.common.errors import UsageError
from labbuilder.common.sizes import format_size
from labbuilder.lab.classfile import load_class_file
from labbuilder.model.classroom import ClassSpec


def register(commands: Subparsers) -> None:
    group = commands.add_parser(
        "class",
        help="a class: one isolated lab per student, from a template; status, reset, down",
        description=(
            "A class file names the students' lab (a built-in lab or a lab file), the template "
            "they start from (or a stage to install from scratch through), the students and "
            "the host's limits. Each student gets a lab of their own, <class>-<student>, "
            "isolated, with the guide's addresses. `class plan` checks that the class fits "
            "this host; `class up` makes the labs (a few at once), opens the class's SSH entry "
            "(each student's key reaches their own lab only) and writes each student's handout "
            "(Markdown and PDF), ssh_config and known_hosts; `class status` shows them; "
            "`class reset` brings labs back to a stage in seconds; `class down` removes them "
            "all."
        ),
    )
    actions = group.add_subparsers(dest="action", metavar="ACTION", required=True)

    plan = actions.add_parser(
        "plan", help="check that the class fits this host and show each student's lab"
    )
    _class_file(plan)
    add_json(plan, "the plan")
    plan.set_defaults(handler=cmd_plan)

    up = actions.add_parser(
        "up",
        help="make every student's lab (labs already up are kept)",
        description=(
            "Plan the whole class against this host first (refused with the numbers when it "
            "does not fit), then make the students' labs, `limits.parallel` at once: stamped "
            "from the template, or brought up and installed through `stage`. A lab that fails "
            "is removed again and named; exit 1 if any failed."
        ),
    )
    _class_file(up)
    add_json(up, "each student's result")
    up.set_defaults(handler=cmd_up)

    status = actions.add_parser("status", help="each student's lab and its nodes")
    _class_file(status)
    add_json(status, "the class's labs")
    status.set_defaults(handler=cmd_status)

    reset = actions.add_parser(
        "reset",
        help="bring students' labs back to a stage",
        description=(
            "Bring every student's lab (or those named with --student) back to STAGE: the "
            "template's stage makes the nodes anew from the template (the lab's networks "
            "stay); a later stage restores the lab's own snapshot of it."
        ),
    )
    _class_file(reset)
    reset.add_argument("--to", required=True, metavar="STAGE", help="e.g. image")
    reset.add_argument(
        "--student", action="append", default=[], metavar="NAME", help="only this student (repeat)"
    )
    add_json(reset, "each student's result")
    reset.set_defaults(handler=cmd_reset)

    board = actions.add_parser(
        "board",
        help="the trainer's board: a web page of every student's stages, checked on a schedule",
        description=(
            "Serve a local web page with one row per student and one column per stage: each "
            "cell says whether that stage's checks pass on the student's lab now (the "
            "recipe's checks of the steps done, run again every `limits.check_every` "
            "seconds, the labs in parallel; nothing is run or changed on them), with the "
            "nodes' states and the time of the last change. The page reloads itself, "
            "/board.json serves the same data, and a button resets a student's lab to the "
            "class's starting stage. Ctrl-C stops it. With --once: one round of checks, the "
            "board printed, no server."
        ),
    )
    _class_file(board)
    board.add_argument(
        "--port", type=int, metavar="P", help="port to listen on (default: limits.board_port)"
    )
    board.add_argument(
        "--address",
        metavar="ADDR",
        help="address to listen on (default: limits.board_address, 127.0.0.1)",
    )
    board.add_argument(
        "--once", action="store_true", help="check every lab once, print the board and exit"
    )
    add_json(board, "the board (with --once)")
    board.set_defaults(handler=cmd_board)

    ssh = actions.add_parser(
        "ssh",
        help="SSH to a node of a student's lab (as `labbuilder ssh`, with the lab's key)",
        description=(
            "SSH to NODE of STUDENT's lab with the lab's own key, as `labbuilder ssh` does for "
            "a lab: `labbuilder class ssh os101.toml alice controller 'sudo systemctl status "
            "glance-api'`. For the trainer on this host; students use their handout's ssh_config."
        ),
    )
    _class_file(ssh)
    ssh.add_argument("student", metavar="STUDENT", help="the student's name")
    ssh.add_argument("node", metavar="NODE", help="the node's name, e.g. controller")
    ssh.add_argument("remote", nargs=argparse.REMAINDER, help="a command to run instead of a shell")
    ssh.set_defaults(handler=cmd_ssh)

    entry = actions.add_parser(
        "entry",
        help="(the class's SSH entry runs it for a student) relay to their lab, or a console",
        description=(
            "Run by the class's own sshd for a student's key, never by hand: reads the "
            "student's request from SSH_ORIGINAL_COMMAND: `relay HOST PORT` (as the "
            "student's ssh_config asks) relays to that address of the student's own lab, "
            "from the lab's gateway namespace; `console NODE` opens that node's serial "
            "console (Ctrl-] leaves). Any other request is refused."
        ),
    )
    entry.add_argument("lab_name", metavar="LAB", help="the student's lab")
    entry.set_defaults(handler=cmd_entry)

    down = actions.add_parser("down", help="remove every student's lab")
    _class_file(down)
    add_json(down, "what was removed")
    down.set_defaults(handler=cmd_down)


def _class_file(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("class_file", metavar="CLASS.toml", help="the class file")


def _load(args: argparse.Namespace) -> ClassSpec:
    return load_class_file(Path(args.class_file))


def cmd_plan(args: argparse.Namespace, console: Console) -> int:
    spec = _load(args)
    planned = classroom.class_plan(spec)
    rows = [
        {
            "student": student,
            "lab": lab.name,
            "vcpus": plan.totals.vcpus,
            "memory": plan.totals.memory,
            "disk": plan.totals.disk,
            "addresses": {node.name: node.management_address for node in plan.nodes},
            "namespace": plan.gateway.namespace if plan.gateway else None,
        }
        for student, lab, plan in planned.labs
    ]
    if args.json:
        data = {"class": spec.name, "template": spec.template, "stage": spec.stage, "labs": rows}
        console.print_json(json.dumps(data))
        return 0
    start = f"template {spec.template}" if spec.template else f"from scratch through {spec.stage}"
    table = plain_table(
        f"class {spec.name}: {len(rows)} labs of {spec.lab_ref}, {start}",
        ("student", "lab", "vCPUs", "memory", "disk", "nodes", "gateways"),
    )
    for student, lab, plan in planned.labs:
        add_plain_row(
            table,
            student,
            lab.name,
            str(plan.totals.vcpus),
            format_size(plan.totals.memory),
            format_size(plan.totals.disk),
            ", ".join(f"{n.name} {n.management_address}" for n in plan.nodes),
            plan.gateway.namespace if plan.gateway else "-",
        )
    console.print(table)
    console.print("the class fits this host")
    return 0


def _results(console: Console, results: list[StudentResult], as_json: bool, what: str) -> int:
    failed = [r for r in results if not r.ok]
    if as_json:
        console.print_json(json.dumps([r.as_dict() for r in results]))
        return 1 if failed else 0
    for result in results:
        if result.ok:
            done = f"{result.action} ({result.seconds:.0f} s)"
            files = (
                f"; handout and files in {result.detail['files']}"
                if "files" in result.detail
                else ""
            )
            console.print(f"{result.student}: {result.lab} {done}{files}")
        else:
            console.print(f"{result.student}: {result.lab} FAILED: {result.error}", style="red")
    console.print(f"{len(results) - len(failed)} of {len(results)} labs {what}")
    return 1 if failed else 0


def cmd_up(args: argparse.Namespace, console: Console) -> int:
    spec = _load(args)
    log = None if args.json else (lambda message: console.print(message, style="dim"))
    return _results(console, classroom.class_up(spec, log=log), args.json, "up")


def cmd_status(args: argparse.Namespace, console: Console) -> int:
    spec = _load(args)
    rows = classroom.class_status(spec)
    entry = {"port": spec.limits.access_port, "running": classroom.entry_running(spec)}
    if args.json:
        console.print_json(json.dumps({"class": spec.name, "labs": rows, "entry": entry}))
        return 0
    table = plain_table(f"class {spec.name}", ("student", "lab", "nodes"))
    for row in rows:
        nodes = row["nodes"]
        assert isinstance(nodes, list)
        shown = ", ".join(f"{n['name']} {n['state']}" for n in nodes) or "not up"
        add_plain_row(table, str(row["student"]), str(row["lab"]), shown)
    console.print(table)
    state = "running" if entry["running"] else "not running"
    console.print(f"the students' SSH entry on port {entry['port']}: {state}")
    return 0


def cmd_reset(args: argparse.Namespace, console: Console) -> int:
    spec = _load(args)
    log = None if args.json else (lambda message: console.print(message, style="dim"))
    results = classroom.class_reset(spec, args.to, args.student, log=log)
    return _results(console, results, args.json, f"back at {args.to}")


def cmd_board(args: argparse.Namespace, console: Console) -> int:
    spec = _load(args)
    if args.port is not None and not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port} is not a port", "give 1-65535 (0: any free port)")
    if args.json and not args.once:
        raise UsageError("--json prints the board of one round", "add --once")
    board = ClassBoard(spec, log=None if args.json else lambda m: console.print(m, style="dim"))
    if args.once:
        board.check_round()
        data = board_dict(board.view())
        if args.json:
            console.print_json(json.dumps(data))
            return 0
        _print_board(console, data)
        return 0
    address = args.address or spec.limits.board_address
    port = spec.limits.board_port if args.port is None else args.port
    app = make_app(board, secrets.token_urlsafe(16))
    try:
        server = web.WebServer(app, address, port)
    except OSError as err:
        raise UsageError(
            f"the board cannot listen on {address}:{port}: {err.strerror or err}",
            "choose another --port (or limits.board_port in the class file)",
        ) from None
    console.print(
        f"class {spec.name}: the board is on {server.url} (checks every "
        f"{spec.limits.check_every} s; Ctrl-C stops it)",
        soft_wrap=True,  # the URL on one line, in a log too
    )
    board.start()
    try:
        server.run()
    finally:
        board.stop()
    return 0


def _print_board(console: Console, data: dict[str, Any]) -> None:
    stages = [stage["name"] for stage in data["stages"]]
    table = plain_table(f"class {data['class']}", ("student", *stages, "nodes"))
    for row in data["students"]:
        nodes = ", ".join(f"{n['name']} {n['state']}" for n in row["nodes"]) or row["error"]
        add_plain_row(table, row["student"], *(row["stages"][s]["status"] for s in stages), nodes)
    console.print(table)
    console.print(f"one round of checks: {data['round_seconds']} s")


def cmd_ssh(args: argparse.Namespace, console: Console) -> int:
    spec = _load(args)
    config = classroom.student_ssh_config(spec, args.student)
    remote = [part for part in args.remote if part != "--"]
    os.execvp("ssh", ["ssh", "-F", str(config), args.node, *remote])
    return 0  # not reached


def cmd_entry(args: argparse.Namespace, console: Console) -> int:
    classroom.entry(args.lab_name, classroom.entry_request())
    return 0


def cmd_down(args: argparse.Namespace, console: Console) -> int:
    spec = _load(args)
    return _results(console, classroom.class_down(spec), args.json, "removed")
