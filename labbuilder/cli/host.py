"""Host commands: doctor (what this host offers a lab, and what follows from it)."""

from __future__ import annotations

import argparse
import json

from rich.console import Console

from labbuilder.api import facade as api
from labbuilder.cli.common import Subparsers
from labbuilder.common.errors import UsageError
from labbuilder.host.probe import render_findings


def register(commands: Subparsers) -> None:
    doctor = commands.add_parser(
        "doctor",
        help="check this host: libvirt, real acceleration, nested virtualization, resources",
        description=(
            "Probe the host the way `up` does and show each finding and what follows from it: "
            "libvirt and QEMU versions, whether KVM really runs a guest (a tiny guest is "
            "booted to prove it), nested virtualization, CPUs, memory, disk, routes, libvirt "
            "networks, and where the package mirror lives. Exit code 1 when a finding fails."
        ),
    )
    doctor.add_argument("--uri", default="qemu:///system", help="libvirt URI to probe")
    doctor.add_argument("--json", action="store_true", help="print the findings as JSON")
    doctor.add_argument(
        "--enable-nested",
        action="store_true",
        help="turn nested virtualization on (reload kvm_intel/kvm_amd with nested=1 when no "
        "guest runs, and keep it in /etc/modprobe.d), after saying what it will do",
    )
    doctor.add_argument(
        "--enable-ksm",
        action="store_true",
        help="start the kernel's same-page merging (KSM) so that labs of one image share their "
        "identical memory pages, and `plan` lets their nodes have 1.5 times the host's memory; "
        "lasts until the host restarts",
    )
    doctor.set_defaults(handler=cmd_doctor)


def cmd_doctor(args: argparse.Namespace, console: Console) -> int:
    if args.enable_ksm:
        if args.enable_nested:
            raise UsageError(
                "give --enable-ksm or --enable-nested, not both", "run them one by one"
            )
        done = api.enable_ksm()
        if args.json:
            console.print_json(json.dumps({"enable_ksm": done, "already_on": not done}))
        else:
            console.print("KSM was running already" if not done else "ran: " + "; ".join(done))
        return 0
    probe = api.doctor(args.uri)
    if args.enable_nested:
        kvm_works = str(probe.acceleration) == "kvm"
        planned = api.enable_nested(args.uri, kvm_works=kvm_works, dry_run=True)
        if planned:
            if not args.json:
                console.print("labbuilder will run:\n  " + "\n  ".join(planned))
            api.enable_nested(args.uri, kvm_works=kvm_works, dry_run=False)
        if args.json:
            console.print_json(json.dumps({"enable_nested": planned, "already_on": not planned}))
        elif not planned:
            console.print("nested virtualization is already on")
        else:
            console.print("done; run `labbuilder doctor` again to see the result")
        return 0
    if args.json:
        console.print_json(
            json.dumps(
                {
                    "acceleration": str(probe.acceleration),
                    "domain_type": str(probe.domain_type),
                    "virt_type": str(probe.virt_type),
                    "nested": probe.nested,
                    "cpu_passthrough": probe.cpu_passthrough,
                    "libvirt_version": probe.libvirt_version,
                    "qemu_version": probe.qemu_version,
                    "seconds": round(probe.seconds, 1),
                    "findings": [
                        {
                            "name": f.name,
                            "status": str(f.status),
                            "detail": f.detail,
                            "consequence": f.consequence,
                            "fix": f.fix,
                        }
                        for f in probe.findings
                    ],
                }
            )
        )
    else:
        console.print(render_findings(probe))
    return 1 if str(probe.status) == "fail" else 0
