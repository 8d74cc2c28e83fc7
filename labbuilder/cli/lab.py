"""Lab commands: plan, labs, up, down, status, ssh, ssh-config, console, list, gc."""

from __future__ import annotations

import argparse
import json
import os

from rich.console import Console

from labbuilder.api import facade as api
from labbuilder.cli.common import (
    Sizes,
    Subparsers,
    add_json,
    add_lab_arguments,
    add_plain_row,
    plain_table,
    selected_lab,
)
from labbuilder.cli.run import cmd_up_install
from labbuilder.cli.upwatch import (
    up_watched,
)
from labbuilder.lab.view import plan_as_dict, plan_tables
from labbuilder.lifecycle.teardown import Removed


def register(commands: Subparsers) -> None:
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
    add_lab_arguments(plan, allow_small=True)
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    add_auto_subnets(plan)
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

    up = commands.add_parser(
        "up",
        help="create the lab's networks and nodes and wait until every node is ready",
        description=(
            "Bring a lab up: probe the host, create its libvirt networks, disks (thin overlays "
            "on the shared base image) and seed ISOs, start every node in parallel, and wait "
            "for each to climb the readiness ladder: running, NIC link, port 22, SSH login, "
            "configured by cloud-init. Running it again on a running lab changes nothing; on a "
            "partial lab it completes what is missing."
        ),
    )
    add_lab_arguments(up, allow_small=True)
    add_auto_subnets(up)
    up.add_argument("--json", action="store_true", help="print the result as JSON")
    up.add_argument(
        "--from-template",
        metavar="NAME",
        help="make the lab's nodes resume, running, from the template NAME (`labbuilder "
        "template save`): thin overlays on its disks, its memory, secrets and keys, the lab's "
        "own networks; refused if the lab's plan or recipe differs from the template's. "
        "`install` then goes on after the template's stage",
    )
    up.add_argument(
        "--install",
        action="store_true",
        help="then install the lab's recipe through its core path to a launched instance (and "
        "the optional stages the lab file selects), as `labbuilder run --keep` does: the lab "
        "is kept whether the install passes or fails, and the reports' folder is printed",
    )
    up.epilog = (
        "Exit codes: 0 the lab is up (with --install: and the install passed), 1 a failure (the "
        "report says where), 2 bad input, refused before anything is created (a lab below the "
        "guide's or its recipe's minimum sizes: --allow-small), 130 interrupted."
    )
    up.set_defaults(handler=cmd_up)

    down = commands.add_parser(
        "down",
        help="remove the lab: domains, networks, gateway, volumes, firewall rules and state",
        description=(
            "Remove everything of the lab from this host, found through libvirt's own state "
            "(labbuilder's metadata), so it works after a crash or a killed `up` too."
        ),
    )
    add_lab_arguments(down)
    add_json(down, "what was removed")
    down.set_defaults(handler=cmd_down)

    status = commands.add_parser(
        "status",
        help="show the lab's nodes: state, addresses, acceleration",
        description="Show the lab's nodes and networks as libvirt sees them.",
    )
    add_lab_arguments(status)
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.set_defaults(handler=cmd_status)

    ssh = commands.add_parser(
        "ssh",
        help="open a shell on a node, or run a command there",
        description="SSH to a node with the lab's key: `labbuilder ssh controller hostname`.",
    )
    add_lab_arguments(ssh, positional=False)
    ssh.add_argument("node", help="the node's name, e.g. controller")
    ssh.add_argument("remote", nargs=argparse.REMAINDER, help="a command to run instead of a shell")
    ssh.set_defaults(handler=cmd_ssh)

    ssh_config = commands.add_parser(
        "ssh-config",
        help="print an ssh_config for plain `ssh -F`",
        description=(
            "Print an ssh_config with every node of the lab (by its name and as <lab>-<node>), "
            "for `ssh -F FILE controller`, scp, rsync or Ansible. It is also kept in the lab's "
            "state directory."
        ),
    )
    add_lab_arguments(ssh_config)
    ssh_config.set_defaults(handler=cmd_ssh_config)

    console = commands.add_parser(
        "console",
        help="attach to a node's serial console",
        description="Attach to a node's serial console (leave with Ctrl-]). Log in as the "
        "lab's user with the console password from the lab's secrets file.",
    )
    add_lab_arguments(console, positional=False)
    console.add_argument("node", help="the node's name, e.g. controller")
    console.set_defaults(handler=cmd_console)

    listing = commands.add_parser(
        "list",
        help="list the labs on this host",
        description="List every lab that has domains, networks, volumes or state on this host.",
    )
    listing.add_argument("--uri", default="qemu:///system", help="libvirt URI")
    listing.add_argument("--json", action="store_true", help="print the list as JSON")
    listing.set_defaults(handler=cmd_list)

    gc = commands.add_parser(
        "gc",
        help="remove leftovers of labs that no longer exist",
        description=(
            "Find labbuilder-tagged domains, networks, volumes and firewall rules whose lab has "
            "no state on this host any more (a crash, deleted state) and remove them; bring "
            "back a lab that an interrupted `template save` left at a stage, and remove what "
            "interrupted `template save`s left (unfinished folders and disk copies)."
        ),
    )
    gc.add_argument("--uri", default="qemu:///system", help="libvirt URI")
    gc.add_argument(
        "--match", default="*", metavar="GLOB", help="only labs whose name matches, e.g. 'ci-*'"
    )
    add_json(gc, "what was removed")
    gc.set_defaults(handler=cmd_gc)


def add_auto_subnets(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--auto-subnets",
        action="store_true",
        help="a lab with host gateways (options.isolated = false): move its networks that "
        "overlap the host's to free subnets instead of refusing (an isolated lab keeps its "
        "subnets whatever the host uses)",
    )


def cmd_plan(args: argparse.Namespace, console: Console) -> int:
    lab = selected_lab(args, Sizes.FLAG)
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
        rows = [
            {
                "name": lab.name,
                "description": lab.description,
                "networking": str(lab.networking),
                "nodes": [node.name for node in lab.nodes],
            }
            for lab in labs
        ]
        console.print_json(json.dumps(rows))
        return 0
    table = plain_table("built-in labs", ("name", "networking", "nodes", "description"))
    for lab in labs:
        nodes = ", ".join(n.name for n in lab.nodes)
        add_plain_row(table, lab.name, str(lab.networking), nodes, lab.description)
    console.print(table)
    return 0


def cmd_up(args: argparse.Namespace, console: Console) -> int:
    if args.install:
        return cmd_up_install(args, console)
    lab = selected_lab(args, Sizes.FLAG)
    result = up_watched(lab, auto_subnets=args.auto_subnets, from_template=args.from_template)
    if args.json:
        console.print_json(
            json.dumps(
                {
                    "lab": lab.name,
                    "seconds": round(result.seconds, 1),
                    "acceleration": result.acceleration,
                    "virt_type": result.virt_type,
                    "rungs": result.rungs,
                    "created": result.created,
                    "template": result.template,
                }
            )
        )
        return 0
    verb = "is up" if result.created else "was already up; checked"
    if result.template:
        verb = f"is up from template {result.template}"
    console.print(
        f"lab {lab.name} {verb} in {result.seconds:.0f} s "
        f"({result.acceleration}); try `labbuilder ssh controller hostname`"
    )
    return 0


def cmd_down(args: argparse.Namespace, console: Console) -> int:
    lab = selected_lab(args)
    removed = api.down(lab)
    if args.json:
        console.print_json(json.dumps({"lab": lab.name, **removed_dict(removed)}))
        return 0
    console.print(
        f"lab {lab.name}: removed {len(removed.domains)} domains, {len(removed.networks)} "
        f"networks, {len(removed.volumes)} volumes"
        + (", firewall rules" if removed.firewall else "")
        + (", gateway namespace" if removed.gateway else "")
        + (", state" if removed.state_dir else "")
    )
    return 0


def cmd_status(args: argparse.Namespace, console: Console) -> int:
    lab = selected_lab(args)
    status = api.status(lab)
    if args.json:
        console.print_json(
            json.dumps(
                {
                    "lab": status.lab,
                    "virt_type": status.virt_type,
                    "nodes": [node.__dict__ for node in status.nodes],
                    "networks": [{"name": n, "active": a} for n, a in status.networks],
                    "gateway": status.gateway,
                    "template": status.template,
                    "template_stage": status.template_stage,
                    "uplink": status.uplink,
                }
            )
        )
        return 0 if status.nodes else 1
    if not status.nodes:
        console.print(f"lab {lab.name} has no nodes on this host")
        return 1
    columns = ("node", "role", "state", "addresses", "acceleration", "domain")
    table = plain_table(f"lab {status.lab}", columns)
    for node in status.nodes:
        add_plain_row(table,
            node.name, node.role, node.state, "\n".join(node.addresses), node.acceleration,
            node.domain,
        )  # fmt: skip
    console.print(table)
    if status.template is not None:
        console.print(f"made from template {status.template} (after stage {status.template_stage})")
    if status.gateway is not None:
        console.print(
            f"isolated: gateways in namespace {status.gateway}, uplink "
            + ("running" if status.uplink else "NOT running (`labbuilder up` starts it)"),
            markup=False,
            highlight=False,
        )
    return 0


def cmd_ssh(args: argparse.Namespace, console: Console) -> int:
    lab = selected_lab(args)
    config = api.write_ssh_config(lab)
    remote = [part for part in args.remote if part != "--"]
    os.execvp("ssh", ["ssh", "-F", str(config), args.node, *remote])
    return 0  # not reached


def cmd_ssh_config(args: argparse.Namespace, console: Console) -> int:
    lab = selected_lab(args)
    console.print(api.ssh_config(lab), markup=False, highlight=False, soft_wrap=True)
    return 0


def cmd_console(args: argparse.Namespace, console: Console) -> int:
    lab = selected_lab(args)
    domain = api.node_domain(lab, args.node)
    os.execvp("virsh", ["virsh", "-c", lab.libvirt_uri, "console", domain])
    return 0  # not reached


def cmd_list(args: argparse.Namespace, console: Console) -> int:
    labs = api.labs_on_host(args.uri)
    if args.json:
        console.print_json(json.dumps(labs))
        return 0
    table = plain_table("labs on this host", ("lab", "domains", "networks", "volumes", "state"))
    for lab, counts in sorted(labs.items()):
        add_plain_row(table, lab, *(str(counts[k]) for k in ("domains", "networks", "volumes")),
                      "yes" if counts["state"] else "no")  # fmt: skip
    console.print(table)
    return 0


def removed_dict(removed: Removed) -> dict[str, object]:
    return {
        "domains": list(removed.domains),
        "networks": list(removed.networks),
        "volumes": list(removed.volumes),
        "firewall": bool(removed.firewall),
        "gateway": bool(removed.gateway),
        "state_dir": removed.state_dir,
        "left": list(removed.left),
        "returned": removed.returned,
    }


def cmd_gc(args: argparse.Namespace, console: Console) -> int:
    removed = api.gc(args.uri, args.match)
    unfinished = api.gc_templates(args.uri)
    if args.json:
        console.print_json(
            json.dumps(
                {
                    "labs": {lab: removed_dict(what) for lab, what in removed.items()},
                    "templates": unfinished,
                }
            )
        )
        return 0
    if not removed and not unfinished:
        console.print("nothing to remove")
    for lab, what in removed.items():
        if what.returned:
            console.print(
                f"lab {lab}: back to its own state (snapshot {what.returned}), which an "
                "interrupted command had left"
            )
            continue
        console.print(
            f"lab {lab}: removed {len(what.domains)} domains, {len(what.networks)} networks, "
            f"{len(what.volumes)} volumes"
            + (", firewall rules" if what.firewall else "")
            + (", gateway namespace" if what.gateway else "")
        )
    for leftover in unfinished:
        console.print(f"removed {leftover}, left by an interrupted `template save`")
    return 0
    if not removed:
        console.print("nothing to remove")
    for lab, what in removed.items():
        console.print(
            f"lab {lab}: removed {len(what.domains)} domains, {len(what.networks)} networks, "
            f"{len(what.volumes)} volumes"
            + (", firewall rules" if what.firewall else "")
            + (", gateway namespace" if what.gateway else "")
        )
    return 0
