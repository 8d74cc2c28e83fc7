"""Snapshot commands: ``snapshot list | take | restore | delete`` for a whole lab."""

from __future__ import annotations

import argparse
import json
import time
from contextlib import AbstractContextManager
from typing import Any

from rich.console import Console

from labbuilder.cli.common import (
    Subparsers,
    add_lab_arguments,
    add_plain_row,
    plain_table,
    selected_lab,
)
from labbuilder.common.errors import UsageError
from labbuilder.lifecycle import snapshots
from labbuilder.lifecycle.state import lab_state
from labbuilder.model.lab import Lab


def register(commands: Subparsers) -> None:
    snapshot = commands.add_parser(
        "snapshot",
        help="take, list, restore and delete live snapshots of a whole lab",
        description=(
            "Live snapshots of every node of a lab at one consistent moment: the nodes are "
            "paused together, each takes an internal snapshot with its memory (kept in its "
            "qcow2 disk), and all resume; a restore brings every node back running, as it was, "
            "and sets the guests' clocks to the host's. A snapshot exists on all nodes or on "
            "none. Each costs about the memory the guests use in disk space (`snapshot list` "
            "shows it); a take that could leave less than 1 GB free where the disks are is "
            "refused before the nodes pause. `labbuilder down` removes them with the lab."
        ),
    )
    actions = snapshot.add_subparsers(dest="action", metavar="ACTION", required=True)

    listing = actions.add_parser(
        "list",
        help="list the lab's snapshots, oldest first",
        description=(
            "List the lab's snapshots, oldest first: when each was taken, whether every node "
            "holds it (complete), whether it has the nodes' memory, and the disk it took."
        ),
    )
    add_lab(listing)
    listing.add_argument("--json", action="store_true", help="print the list as JSON")
    listing.set_defaults(handler=cmd_list)

    take = actions.add_parser(
        "take",
        help="snapshot every node of the lab now (replacing a snapshot of that name)",
        description=(
            "Pause every node of the lab, snapshot all of them in parallel with their memory, "
            "and resume them (the lab is paused for about a second per GB of memory in use). "
            "A snapshot of the same name is replaced. If any node fails, the snapshot is "
            "removed from the others."
        ),
    )
    take.add_argument("name", metavar="NAME", help="the snapshot's name, e.g. a stage: keystone")
    add_lab(take)
    take.add_argument("--description", default="", help="a note kept with the snapshot")
    take.add_argument("--json", action="store_true", help="print the snapshot as JSON")
    take.set_defaults(handler=cmd_take)

    restore = actions.add_parser(
        "restore",
        help="bring every node of the lab back to a snapshot, running",
        description=(
            "Pause every node, revert all of them in parallel to the snapshot, and resume them "
            "together: the lab runs again as it was when the snapshot was taken. Then every "
            "node's clock is set to the host's over SSH. Refused if a node lacks the snapshot."
        ),
    )
    restore.add_argument("name", metavar="NAME", help="the snapshot, see `snapshot list`")
    add_lab(restore)
    restore.add_argument(
        "--no-clock-sync",
        action="store_true",
        help="leave the guests' clocks at the snapshot's time",
    )
    restore.add_argument("--json", action="store_true", help="print the result as JSON")
    restore.set_defaults(handler=cmd_restore)

    delete = actions.add_parser(
        "delete",
        help="delete a snapshot, those taken after one, or all",
        description=(
            "Delete the snapshot NAME from every node, or with --after NAME those taken after "
            "it (before running the following stages again), or with --all every snapshot of "
            "the lab. The disk space goes back to the host."
        ),
    )
    delete.add_argument("name", metavar="NAME", nargs="?", help="the snapshot to delete")
    add_lab(delete)
    which = delete.add_mutually_exclusive_group()
    which.add_argument("--all", action="store_true", help="delete every snapshot of the lab")
    which.add_argument("--after", metavar="NAME", help="delete the snapshots taken after NAME")
    delete.add_argument("--json", action="store_true", help="print what was deleted as JSON")
    delete.set_defaults(handler=cmd_delete)


def add_lab(parser: argparse.ArgumentParser) -> None:
    # Only the lab's name and libvirt URI matter here, so sizes below the guide's minimums
    # (a lab brought up with `up --allow-small`) are accepted without asking again.
    add_lab_arguments(parser)


def cmd_list(args: argparse.Namespace, console: Console) -> int:
    lab = selected_lab(args)
    with snapshots.lab_connection(lab.name, lab.libvirt_uri, lab_state(lab.name)) as conn:
        infos = snapshots.list_snapshots(conn, lab.name)
    if args.json:
        console.print_json(json.dumps([info.as_dict() for info in infos]))
        return 0
    if not infos:
        console.print(f"lab {lab.name} has no snapshots; take one with `labbuilder snapshot take`")
        return 0
    columns = ("snapshot", "taken", "complete", "memory", "disk", "description")
    table = plain_table(f"snapshots of lab {lab.name}", columns)
    for info in infos:
        complete = "yes" if info.complete else f"no: missing on {', '.join(info.missing)}"
        add_plain_row(
            table,
            info.name,
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.created)),
            complete,
            "yes" if info.memory else "no (disks)",
            disk_text(info),
            info.description,
        )
    console.print(table)
    return 0


def cmd_take(args: argparse.Namespace, console: Console) -> int:
    lab = selected_lab(args)
    snapshots.check_name(args.name)
    started = time.monotonic()
    with changing(lab, f"labbuilder snapshot take {args.name}") as conn:
        info = snapshots.take_snapshot(conn, lab.name, args.name, description=args.description)
    seconds = time.monotonic() - started
    if args.json:
        console.print_json(json.dumps({**info.as_dict(), "seconds": round(seconds, 2)}))
        return 0
    console.print(
        f"lab {lab.name}: snapshot {info.name} taken on {nodes(len(info.nodes))} in "
        f"{seconds:.1f} s (disk: {disk_text(info)})"
    )
    return 0


def cmd_restore(args: argparse.Namespace, console: Console) -> int:
    lab = selected_lab(args)
    snapshots.check_name(args.name)
    state = lab_state(lab.name)
    with changing(lab, f"labbuilder snapshot restore {args.name}") as conn:
        info = snapshots.find_snapshot(conn, lab.name, args.name)
        seconds = snapshots.restore_snapshot(conn, lab.name, args.name)
        skew = {} if args.no_clock_sync else snapshots.sync_clocks(state)
    if args.json:
        console.print_json(
            json.dumps(
                {
                    "lab": lab.name,
                    "snapshot": info.name,
                    "seconds": round(seconds, 2),
                    "nodes": list(info.nodes),
                    "clock_seconds": {node: round(s, 1) for node, s in skew.items()},
                }
            )
        )
        return 0
    taken = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.created))
    console.print(
        f"lab {lab.name} is back at snapshot {info.name} (taken {taken}): "
        f"{nodes(len(info.nodes))} reverted in {seconds:.1f} s"
    )
    if skew:
        moved = max(skew.values(), key=abs)
        console.print(f"clocks set to the host's (moved by up to {moved:.0f} s)")
    elif not args.no_clock_sync:
        console.print("note: the guests' clocks are at the snapshot's time", style="yellow")
    return 0


def cmd_delete(args: argparse.Namespace, console: Console) -> int:
    name = args.name
    bulk = args.all or args.after is not None
    if name is not None and args.lab_file is None and args.file is None and looks_like_file(name):
        args.lab_file, name = name, None  # `delete --all lab.toml`
    if bulk:
        if name is not None:
            raise UsageError(
                f"give a snapshot NAME or {'--all' if args.all else '--after'}, not both"
            )
    elif name is None:
        raise UsageError("say which snapshots to delete: NAME, --after NAME or --all")
    lab = selected_lab(args)
    with changing(lab, "labbuilder snapshot delete") as conn:
        if name is not None:
            deleted = [snapshots.delete_snapshot(conn, lab.name, name).name]
        else:
            deleted = snapshots.delete_snapshots(conn, lab.name, after=args.after)
    if args.json:
        console.print_json(json.dumps({"lab": lab.name, "deleted": deleted}))
        return 0
    if deleted:
        noun = "snapshot" if len(deleted) == 1 else "snapshots"
        console.print(f"lab {lab.name}: deleted {noun} {', '.join(deleted)}")
    else:
        console.print(f"lab {lab.name}: no snapshots to delete")
    return 0


def nodes(count: int) -> str:
    return f"{count} node" if count == 1 else f"{count} nodes"


def looks_like_file(name: str) -> bool:
    return name.endswith(".toml") or "/" in name


def changing(lab: Lab, action: str) -> AbstractContextManager[Any]:
    """A connection for changing the lab's snapshots, holding the lab's lock."""
    return snapshots.lab_connection(lab.name, lab.libvirt_uri, lab_state(lab.name), action=action)


def disk_text(info: snapshots.SnapshotInfo) -> str:
    if not info.disk_bytes:
        return "?"
    total = sum(info.disk_bytes.values())
    return f"{total / 2**20:.0f} MB" + ("" if len(info.disk_bytes) == len(info.nodes) else "+")
