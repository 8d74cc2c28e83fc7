"""Template commands: ``template save | list | show | delete``; ``up --from-template`` uses them."""

from __future__ import annotations

import argparse
import json
import time
from urllib.parse import urlsplit

from rich.console import Console

from labbuilder.adapters import libvirt as lv
from labbuilder.cli.common import (
    Subparsers,
    add_json,
    add_lab_arguments,
    add_plain_row,
    plain_table,
    selected_lab,
)
from labbuilder.common.errors import UsageError
from labbuilder.common.paths import pool_dir, pool_name
from labbuilder.common.sizes import format_size
from labbuilder.lifecycle import snapshots, templates
from labbuilder.lifecycle.state import lab_state


def register(commands: Subparsers) -> None:
    template = commands.add_parser(
        "template",
        help="save a lab at 'after STAGE' as a template; list, show and delete templates",
        description=(
            "A template is a lab at 'after STAGE' kept read-only: each node's disks and memory, "
            "the lab's record, secrets, keys and known_hosts, the recipe's digest and the "
            "images' manifests. `labbuilder up LAB.toml --from-template NAME` makes a new lab "
            "whose nodes resume from it, running, in seconds: thin overlays on the template's "
            "disks, its memory restored, the lab's own networks. Labs from one template share "
            "its secrets and SSH host keys."
        ),
    )
    actions = template.add_subparsers(dest="action", metavar="ACTION", required=True)

    save = actions.add_parser(
        "save",
        help="turn a lab's stage snapshot into a template",
        description=(
            "Make the template NAME from the lab's snapshot STAGE (the one `install` took "
            "after that stage). The lab keeps its own state: it is snapshotted, goes back to "
            "STAGE paused while each node's memory is saved and its disks copied, and returns "
            "to where it was, running. Needs about the nodes' memory twice and the disks' "
            "changes in free disk."
        ),
    )
    save.add_argument("name", metavar="NAME", help="the template's name, e.g. os101-image")
    save.add_argument(
        "--stage", required=True, metavar="STAGE", help="the lab's stage snapshot, e.g. image"
    )
    add_lab_arguments(save)
    add_json(save, "the template")
    save.set_defaults(handler=cmd_save)

    listing = actions.add_parser("list", help="list the host's templates")
    add_json(listing, "the list")
    listing.set_defaults(handler=cmd_list)

    show = actions.add_parser(
        "show", help="show a template: its lab, stage, recipe, nodes, sizes and plan"
    )
    show.add_argument("name", metavar="NAME")
    add_json(show, "the template")
    show.set_defaults(handler=cmd_show)

    delete = actions.add_parser(
        "delete",
        help="delete a template (refused while labs made from it are up)",
    )
    delete.add_argument("name", metavar="NAME")
    add_json(delete, "what was deleted")
    delete.set_defaults(handler=cmd_delete)


def cmd_save(args: argparse.Namespace, console: Console) -> int:
    lab = selected_lab(args)
    templates.check_name(args.name)
    snapshots.check_name(args.stage)
    if urlsplit(lab.libvirt_uri).hostname not in (None, "", "localhost"):
        raise UsageError(
            f"lab {lab.name} runs on {lab.libvirt_uri}: templates are made on the host "
            "that runs the lab",
            "run `labbuilder template save` on that host",
        )
    started = time.monotonic()
    state = lab_state(lab.name)
    action = f"labbuilder template save {args.name}"
    with snapshots.lab_connection(lab.name, lab.libvirt_uri, state, action=action) as conn:
        saved = templates.save_template(
            conn,
            state,
            args.stage,
            args.name,
            pool=pool_name(),
            pool_path=pool_dir(),
            log=lambda message: console.print(message, style="dim") if not args.json else None,
        )
    seconds = time.monotonic() - started
    if args.json:
        console.print_json(json.dumps({**saved.as_dict(), "seconds": round(seconds, 1)}))
        return 0
    console.print(
        f"template {saved.name} saved from lab {lab.name} after stage {saved.stage} in "
        f"{seconds:.0f} s: disks {format_size(saved.disk_bytes)}, memory "
        f"{format_size(saved.memory_bytes)}; use it with `labbuilder up LAB.toml "
        f"--from-template {saved.name}`"
    )
    return 0


def cmd_list(args: argparse.Namespace, console: Console) -> int:
    found = templates.list_templates()
    if args.json:
        console.print_json(json.dumps([t.as_dict() for t in found]))
        return 0
    if not found:
        console.print("no templates; `labbuilder template save` makes one")
        return 0
    table = plain_table(
        "templates", ("template", "lab", "stage", "recipe", "saved", "disk", "memory")
    )
    for item in found:
        add_plain_row(
            table,
            item.name,
            item.lab,
            item.stage,
            item.recipe,
            time.strftime("%Y-%m-%d %H:%M", time.localtime(item.created)),
            format_size(item.disk_bytes),
            format_size(item.memory_bytes),
        )
    console.print(table)
    return 0


def cmd_show(args: argparse.Namespace, console: Console) -> int:
    item = templates.load_template(args.name)
    data = item.as_dict()
    data["users"] = templates.labs_using(item.name)
    if args.json:
        data["plan"] = item.record.get("plan")
        console.print_json(json.dumps(data))
        return 0
    console.print(
        f"template {item.name}: lab {item.lab} after stage {item.stage} of recipe "
        f"{item.recipe} (digest {item.recipe_digest[:12]}), saved "
        f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(item.created))}"
    )
    plan = item.plan
    for node in plan.nodes:
        saved = next(n for n in item.nodes if n.name == node.name)
        nics = ", ".join(f"{nic.device} {nic.address or '-'}" for nic in node.nics)
        console.print(
            f"  {node.name} ({node.role}): {node.vcpus} vCPUs, {format_size(node.memory)}; "
            f"{nics}; disk {format_size(sum(d.bytes for d in saved.disks))}, memory state "
            f"{format_size(saved.memory_bytes)}"
        )
    for net in plan.networks:
        console.print(f"  network {net.name}: {net.cidr}, gateway {net.gateway or '-'}")
    console.print(f"  labs made from it: {', '.join(data['users']) or 'none'}")
    return 0


def cmd_delete(args: argparse.Namespace, console: Console) -> int:
    item = templates.load_template(args.name)
    with lv.LibvirtHypervisor.open(item.plan.libvirt_uri) as conn:
        deleted = templates.delete_template(conn, args.name)
    if args.json:
        console.print_json(json.dumps({"deleted": deleted.name}))
        return 0
    size = format_size(deleted.disk_bytes + deleted.memory_bytes)
    console.print(f"template {deleted.name} deleted ({size})")
    return 0
