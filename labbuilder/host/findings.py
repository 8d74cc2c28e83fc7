"""The host probe's findings in words, and as a table for the CLI. Pure: facts in, text out."""

from __future__ import annotations

from collections.abc import Callable
from ipaddress import ip_network

from rich.table import Table
from rich.text import Text

from labbuilder.common.sizes import format_size
from labbuilder.model import guide
from labbuilder.model.lab import NetworkKind
from labbuilder.model.probe import (
    Acceleration,
    Decision,
    Finding,
    HostProbe,
    HostProbeFacts,
    Resolved,
    Status,
)

ENABLE_NESTED = "labbuilder doctor --enable-nested"
FIX_DEV_KVM = "chgrp kvm /dev/kvm && chmod 0660 /dev/kvm"
FIX_LIBVIRTD = "systemctl start libvirtd   (without systemd: libvirtd -d)"
FULL_PROOF = "labbuilder images build debian-12 && labbuilder doctor"
TCG = "domains use plain QEMU (TCG), many times slower than KVM; compute nodes get virt_type = qemu"
STYLE = {Status.OK: "green", Status.WARN: "yellow", Status.FAIL: "bold red"}


def findings(facts: HostProbeFacts, decision: Decision) -> tuple[Finding, ...]:
    return (
        libvirt_finding(facts),
        acceleration_finding(facts, decision),
        nested_finding(facts, decision),
        cpus_finding(facts),
        memory_finding(facts),
        ksm_finding(facts),
        disk_finding(facts),
        routes_finding(facts),
        networks_finding(facts),
        addresses_finding("package mirror", facts.mirrors, "no apt sources or apt proxy found"),
        addresses_finding(
            "DNS servers",
            tuple(Resolved("DNS server", server, (server,)) for server in facts.nameservers),
            "no IPv4 nameserver in /etc/resolv.conf",
        ),
    )


def libvirt_finding(facts: HostProbeFacts) -> Finding:
    if facts.libvirt_error is not None:
        return Finding(
            "libvirt",
            Status.FAIL,
            facts.libvirt_error,
            "no lab can be created; acceleration and libvirt networks were not checked",
            FIX_LIBVIRTD if facts.libvirt_version is None else None,  # None: it failed midway
        )
    return Finding(
        "libvirt",
        Status.OK,
        f"libvirt {facts.libvirt_version}, QEMU {facts.qemu_version or 'version unknown'}, "
        f"at {facts.uri}",
        "labs can create their networks and domains here",
    )


def acceleration_finding(facts: HostProbeFacts, decision: Decision) -> Finding:
    boot, linux, dev_kvm = facts.kvm_boot, facts.kvm_linux, facts.dev_kvm
    if decision.acceleration == Acceleration.KVM and boot is not None:
        if linux is not None:
            return Finding(
                "acceleration",
                Status.OK,
                f"a probe guest with domain type kvm {linux.reason} ({dev_kvm.describe()})",
                "domains use KVM (domain type kvm)",
            )
        return Finding(
            "acceleration",
            Status.WARN,
            f"a probe guest with domain type kvm {boot.reason} ({dev_kvm.describe()}); only "
            f"16-bit real mode was proven, not a 64-bit Linux kernel "
            f"({facts.linux_not_tried or 'none was booted'})",
            "domains use KVM (domain type kvm), unproven for Linux: where KVM runs only real "
            'mode, lab nodes hang at boot or pause with "KVM internal error"; building an '
            "image gives doctor a kernel to boot",
            FULL_PROOF,
        )
    if boot is None:
        detail = f"KVM not tested: {facts.kvm_not_tried or 'no probe guest was booted'}"
    elif boot.marker_seen and linux is not None:
        detail = (
            f"KVM runs 16-bit real mode (a boot sector {boot.reason}) but not Linux: in a "
            f"probe guest with domain type kvm, {linux.reason}"
        )
    else:
        detail = f"a probe guest with domain type kvm did not run: {boot.reason}"
    detail += f"; {dev_kvm.describe()}"
    fix = None
    if dev_kvm.root_only:
        detail += " (only root may open it; libvirt runs QEMU as its own user)"
        fix = FIX_DEV_KVM
    elif not dev_kvm.exists and facts.nested.module is not None:
        fix = f"modprobe {facts.nested.module}"
    elif not dev_kvm.exists:
        detail += "; the CPU offers this host no VT-x/AMD-V (no vmx/svm in /proc/cpuinfo)"
    if boot is not None and linux is not None and facts.kvm_modules:
        detail += f"; KVM modules loaded: {', '.join(facts.kvm_modules)}"
    return Finding("acceleration", Status.WARN, detail, TCG, fix)


def nested_detail(facts: HostProbeFacts) -> str:
    nested = facts.nested
    if nested.cpu_flag is None:
        return "the CPU offers this host neither vmx (VT-x) nor svm (AMD-V) (/proc/cpuinfo)"
    if nested.parameter is None:
        return f"the CPU has {nested.cpu_flag}, but {nested.module} is not loaded"
    return f"the CPU has {nested.cpu_flag}; {nested.module} nested={nested.parameter}"


def nested_finding(facts: HostProbeFacts, decision: Decision) -> Finding:
    name, detail = "nested virtualization", nested_detail(facts)
    if decision.acceleration == Acceleration.TCG:
        return Finding(
            name,
            Status.WARN,
            detail,
            "no effect while the domains run under TCG: instances on the compute nodes run "
            "under plain QEMU (virt_type = qemu)",
        )
    if decision.cpu_passthrough:
        return Finding(
            name,
            Status.OK,
            detail,
            "compute nodes get a host-passthrough CPU and virt_type = kvm: instances run "
            "under nested KVM",
        )
    enabled = facts.nested.enabled
    return Finding(
        name,
        Status.WARN,
        detail,
        "compute nodes get virt_type = qemu: instances inside the lab run under plain QEMU "
        "(TCG), slowly",
        ENABLE_NESTED if enabled is False and facts.nested.cpu_flag is not None else None,
    )


def cpus_finding(facts: HostProbeFacts) -> Finding:
    if facts.cpus is None:
        return Finding("CPUs", Status.WARN, "the number of CPUs is unknown", "not checked")
    shared = ", ".join(f"{lab.name} {lab.vcpus}" for lab in facts.labs)
    return _capacity(
        "CPUs",
        f"{facts.cpus} CPUs",
        facts.cpus,
        [(lab.name, lab.max_node_vcpus) for lab in facts.labs],
        lambda amount: f"{amount} vCPUs",
        "nodes with at most that many vCPUs fit",
        f"; the labs' vCPUs ({shared}) share the CPUs" if shared else "",
    )


def memory_finding(facts: HostProbeFacts) -> Finding:
    if facts.memory_available is None:
        return Finding(
            "memory", Status.WARN, "no MemAvailable in /proc/meminfo", "memory was not checked"
        )
    return _capacity(
        "memory",
        f"{format_size(facts.memory_available)} available (MemAvailable)",
        facts.memory_available,
        [(lab.name, lab.memory) for lab in facts.labs],
        format_size,
        "enough for every built-in lab",
    )


ENABLE_KSM = "labbuilder doctor --enable-ksm"


def ksm_finding(facts: HostProbeFacts) -> Finding:
    """KSM: whether labs' identical memory pages are merged, and what `plan` allows then."""
    ksm = facts.ksm
    if ksm.run is None:
        return Finding(
            "memory sharing (KSM)",
            Status.OK,
            "this kernel has no KSM",
            "labs' memory counts in full: their running nodes together get the host's memory "
            "less 1 GB",
        )
    if ksm.run == 1:
        saved = format_size(ksm.pages_sharing * 4096)
        return Finding(
            "memory sharing (KSM)",
            Status.OK,
            f"running: {ksm.pages_sharing} guest pages share {ksm.pages_shared} ({saved} saved)",
            "labs' running nodes together may have 1.5 times the host's memory less 1 GB",
        )
    return Finding(
        "memory sharing (KSM)",
        Status.OK,
        "available, not running",
        "labs' memory counts in full: their running nodes together get the host's memory less "
        "1 GB; with KSM running 1.5 times that (labs of one image share many pages)",
        ENABLE_KSM,
    )


def disk_finding(facts: HostProbeFacts) -> Finding:
    where = str(facts.disk_path)
    if facts.disk_path != facts.storage:
        where += f" (where {facts.storage} will be)"
    if facts.disk_free is None:
        return Finding("disk", Status.WARN, f"free space at {where} unknown", "not checked")
    return _capacity(
        "disk",
        f"{format_size(facts.disk_free)} free at {where}",
        facts.disk_free,
        [(lab.name, lab.disk) for lab in facts.labs],
        format_size,
        "enough for every built-in lab's disks at their full size",
    )


def _capacity(
    name: str,
    detail: str,
    have: int,
    needs: list[tuple[str, int]],
    show: Callable[[int], str],
    enough: str,
    extra: str = "",
) -> Finding:
    """ok when every built-in lab fits, warn when some do, fail when none does."""
    fits = [f"{lab} {show(need)}" for lab, need in needs if need <= have]
    refused = [f"{lab} (needs {show(need)})" for lab, need in needs if need > have]
    if not refused:
        return Finding(name, Status.OK, detail, f"{enough}: {', '.join(fits) or '-'}{extra}")
    consequence = "`plan` refuses " + ", ".join(refused)
    if fits:
        return Finding(name, Status.WARN, detail, f"{consequence}; fits: {', '.join(fits)}")
    return Finding(name, Status.FAIL, detail, f"{consequence}: every built-in lab")


# --- addresses ------------------------------------------------------------------------------


def guide_networks() -> list[tuple[str, str]]:
    """(role, CIDR) of the guide's networks that take host addresses (not isolated ones)."""
    found: dict[tuple[str, str], None] = {}
    for defaults in guide.NETWORKS.values():
        for net in defaults:
            if net.kind != NetworkKind.ISOLATED:
                found[(str(net.role), net.cidr)] = None
    return list(found)


def _clashes(cidr: str) -> list[tuple[str, str]]:
    """The guide networks (role, CIDR) that ``cidr`` (or an address) overlaps."""
    network = ip_network(cidr, strict=False)
    return [(role, net) for role, net in guide_networks() if network.overlaps(ip_network(net))]


def _must_move(roles: list[str]) -> str:
    unique = list(dict.fromkeys(roles))
    noun = "network" if len(unique) == 1 else "networks"
    return (
        f"isolated labs (the default on qemu:///system) keep the guide's addresses; a lab "
        f"with host gateways (options.isolated = false) must move its {' and '.join(unique)} "
        f"{noun} (--auto-subnets)"
    )


def _guide_cidrs() -> str:
    return ", ".join(cidr for _, cidr in guide_networks())


def routes_finding(facts: HostProbeFacts) -> Finding:
    routes = [route for route in facts.routes if route.destination != "0.0.0.0/0"]
    detail = "routes: " + ", ".join(f"{r.destination} via {r.dev}" for r in routes)
    if not routes:
        detail = "only a default route" if facts.routes else "no IPv4 routes"
    clashes = [
        (f"{route.destination} via {route.dev}", role, cidr)
        for route in routes
        for role, cidr in _clashes(route.destination)
    ]
    return _overlap_finding("routes", detail, clashes, "the host's routes")


def networks_finding(facts: HostProbeFacts) -> Finding:
    name = "libvirt networks"
    if facts.libvirt_networks is None:
        return Finding(name, Status.WARN, "not listed: libvirt was not reachable", "not checked")
    shown, clashes = [], []
    for network in facts.libvirt_networks:
        owner = f", lab {network.lab}'s" if network.lab else ""
        shown.append(f"{network.name} {' '.join(network.cidrs) or 'no IPv4'}{owner}")
        if network.lab is None:  # a lab's own networks are for that lab to reuse
            clashes += [(network.name, r, c) for cidr in network.cidrs for r, c in _clashes(cidr)]
    detail = ", ".join(shown) if shown else "none"
    return _overlap_finding(name, detail, clashes, "the existing libvirt networks")


def addresses_finding(name: str, resolved: tuple[Resolved, ...], none: str) -> Finding:
    """Addresses the host needs (mirror, proxy, DNS) must stay outside the lab's networks."""
    if not resolved:
        return Finding(name, Status.OK, none, "nothing for the lab's networks to avoid")
    parts, clashes, unresolved = [], [], []
    for item in resolved:
        if item.error is not None:
            unresolved.append(f"could not resolve {item.what} {item.host}: {item.error}")
            continue
        inside = [(a, r, c) for a in item.addresses for r, c in _clashes(f"{a}/32")]
        for address, role, cidr in inside:
            clashes.append((address, role, cidr))
            text = f"{item.host} resolves to {address}, inside the guide's {role} network {cidr}"
            parts.append(text if item.host != address else f"{address} is inside {cidr}")
        if not inside:
            parts.append(
                item.host
                if item.addresses == (item.host,)
                else f"{item.host} resolves to {', '.join(item.addresses)}"
            )
    detail = "; ".join(parts + unresolved)
    if clashes:
        return Finding(name, Status.WARN, detail, _must_move([role for _, role, _ in clashes]))
    if unresolved:
        return Finding(name, Status.WARN, detail, "addresses not resolved were not checked")
    return Finding(name, Status.OK, detail, f"outside the guide's networks ({_guide_cidrs()})")


def _overlap_finding(
    name: str, detail: str, clashes: list[tuple[str, str, str]], what: str
) -> Finding:
    if not clashes:
        return Finding(
            name, Status.OK, detail, f"the guide's networks ({_guide_cidrs()}) are free of {what}"
        )
    overlaps = "; ".join(f"{thing} overlaps the guide's {r} network {c}" for thing, r, c in clashes)
    return Finding(
        name, Status.WARN, f"{detail}; {overlaps}", _must_move([r for _, r, _ in clashes])
    )


# --- the table ------------------------------------------------------------------------------


def render_findings(probe: HostProbe) -> Table:
    """One row per finding: status, name, detail, consequence, fix."""
    table = Table(
        title=f"labbuilder doctor: {probe.uri}",
        caption=(
            f"acceleration {probe.acceleration}, domain type {probe.domain_type}, compute "
            f"nodes virt_type = {probe.virt_type}, "
            f"{'host-passthrough CPU' if probe.cpu_passthrough else 'default CPU model'}"
        ),
    )
    for column in ("status", "check", "found", "consequence", "fix"):
        table.add_column(column)
    for finding in probe.findings:
        table.add_row(
            Text(str(finding.status), style=STYLE[finding.status]),
            Text(finding.name),
            Text(finding.detail),
            Text(finding.consequence),
            Text(finding.fix or "-"),
        )
    return table
