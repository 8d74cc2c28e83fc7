"""The planner: ``plan(lab, host) -> Plan``, a pure function (no I/O, no clock, no randomness).

It derives everything ``up`` creates, from names and indices only: libvirt network and bridge
names, MACs, NIC order, addresses, ``/etc/hosts``, disks and resource totals. It refuses a lab
that would harm the host (a subnet the host already routes, an address the host needs, more
memory or disk than the host has) before anything is created, or with ``auto_subnets`` moves
the lab's networks to free subnets.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import netaddr

from labbuilder.common.errors import PlanError
from labbuilder.common.sizes import format_size
from labbuilder.model.addressing import ip_network, move_address, node_address, overlaps
from labbuilder.model.lab import (
    GatewayLink,
    HostFacts,
    Lab,
    LabUse,
    NetworkKind,
    NetworkSpec,
    NicRole,
    NodeSpec,
    Plan,
    PlannedDisk,
    PlannedGateway,
    PlannedNetwork,
    PlannedNic,
    PlannedNode,
    Totals,
)

BRIDGE_ABBREVIATION = {NicRole.MANAGEMENT: "mgmt", NicRole.TUNNEL: "tun", NicRole.EXTERNAL: "ext"}
# Where --auto-subnets looks for free subnets, in this order (the private ranges).
FREE_SUBNET_POOLS = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")
# An isolated lab's uplink subnet inside its namespace: the first that meets no lab network.
UPLINK_SUBNETS = ("10.0.2.0/24", "172.31.254.0/24", "192.168.254.0/24", "100.127.254.0/24")
NAMESPACE_PREFIX = "lbns-"
# Capacity across the labs of a host (README, "Capacity"): running nodes' vCPUs up to nova's own
# default allocation ratio per host CPU; their memory at full size up to the host's memory less
# a reserve for the host, and 1.5 times that while KSM merges the guests' identical pages.
VCPUS_PER_CPU = 16
HOST_MEMORY_RESERVE = 1024 * 1024 * 1024
KSM_OVERCOMMIT = 1.5


@dataclass(frozen=True)
class Conflict:
    """A lab network that would clash with something the host already uses."""

    network: NetworkSpec
    reason: str


def plan(lab: Lab, host: HostFacts, *, auto_subnets: bool = False) -> Plan:
    """Plan ``lab`` on a host described by ``host``. Raises PlanError on any conflict."""
    networks, moves = place_networks(lab, host, auto_subnets)
    lab = replace(
        lab, networks=networks, nodes=tuple(move_node(lab, node, moves) for node in lab.nodes)
    )
    planned_networks = tuple(plan_network(lab, net, moves.get(net.name)) for net in lab.networks)
    check_bridges(lab, planned_networks, host)
    macs = plan_macs(lab, host)
    nodes = tuple(plan_node(lab, node_index, macs) for node_index in range(len(lab.nodes)))
    totals = Totals(
        vcpus=sum(node.vcpus for node in nodes),
        memory=sum(node.memory for node in nodes),
        disk=sum(disk.size for node in nodes for disk in node.disks),
    )
    check_capacity(lab, nodes, totals, host)
    check_shared_capacity(lab, totals, host)
    gateway = plan_gateway(lab, planned_networks) if lab.options.isolated else None
    warnings = list(lab.warnings)
    warnings += [
        f"networks.{name}: {old} overlaps what the host uses; planned as {new} (--auto-subnets)"
        for name, (old, new) in moves.items()
    ]
    return Plan(
        lab=lab.name,
        networking=lab.networking,
        image=lab.image,
        recipe=lab.recipe,
        libvirt_uri=lab.libvirt_uri,
        networks=planned_networks,
        nodes=nodes,
        hosts=tuple((node.management_address, node.name) for node in nodes),
        totals=totals,
        warnings=tuple(warnings),
        gateway=gateway,
    )


# --- networks -------------------------------------------------------------------------------


def host_subnets(lab: Lab, host: HostFacts) -> list[tuple[str, str]]:
    """(CIDR, what uses it) for everything on the host that a lab network must not overlap.

    The lab's own networks (left from an earlier ``up``) do not count against it.
    """
    own_bridges = {bridge_name(lab, net) for net in lab.networks}
    used = [
        (route.destination, f"the host's route {route.destination} via {route.dev}")
        for route in host.routes
        if route.destination != "0.0.0.0/0" and route.dev not in own_bridges
    ]
    for network in host.libvirt_networks:
        if network.lab == lab.name:
            continue
        owner = f"lab {network.lab}'s" if network.lab else "the"
        used += [
            (cidr, f"{owner} libvirt network {network.name} ({cidr})") for cidr in network.cidrs
        ]
    used += [
        (f"{address}/32", f"{what} at {address}") for what, address in host.protected_addresses
    ]
    return used


def network_conflicts(net: NetworkSpec, used: list[tuple[str, str]]) -> list[Conflict]:
    # An isolated network gets no host address and so adds no route: it cannot clash.
    if net.kind == NetworkKind.ISOLATED:
        return []
    return [Conflict(net, f"overlaps {what}") for cidr, what in used if overlaps(net.cidr, cidr)]


def place_networks(
    lab: Lab, host: HostFacts, auto_subnets: bool
) -> tuple[tuple[NetworkSpec, ...], dict[str, tuple[str, str]]]:
    """The lab's networks, moved to free subnets where allowed; and the moves made. An isolated
    lab's networks take no host address or route: whatever the host uses, they stay."""
    if lab.options.isolated:
        return lab.networks, {}
    used = host_subnets(lab, host)
    conflicts = [c for net in lab.networks for c in network_conflicts(net, used)]
    if not conflicts:
        return lab.networks, {}
    taken = [cidr for cidr, _ in used] + [net.cidr for net in lab.networks]
    if not auto_subnets:
        lines = []
        for conflict in conflicts:
            net = conflict.network
            free = next(free_subnets(ip_network(net.cidr).prefixlen, taken), None)
            suggestion = ""
            if free is not None:
                taken.append(free)
                suggestion = f'; set networks.{net.name}.cidr = "{free}"'
            lines.append(
                f'{lab.source}: networks.{net.name}.cidr = "{net.cidr}" {conflict.reason}'
                f"{suggestion}"
            )
        raise PlanError(
            "\n".join(lines),
            "isolate the lab (options.isolated = true, the default on qemu:///system: its "
            "gateways in a namespace of its own, off the host), choose free subnets in the "
            "lab file, or pass --auto-subnets to let labbuilder move the lab's networks",
        )
    moves: dict[str, tuple[str, str]] = {}
    networks = []
    for net in lab.networks:
        if network_conflicts(net, used):
            free = next(free_subnets(ip_network(net.cidr).prefixlen, taken), None)
            if free is None:
                raise PlanError(
                    f"no free /{ip_network(net.cidr).prefixlen} subnet for networks.{net.name}"
                )
            taken.append(free)
            moves[net.name] = (net.cidr, free)
            net = move_network(net, free)
        networks.append(net)
    return tuple(networks), moves


def free_subnets(prefix: int, taken: list[str]) -> Iterator[str]:
    """Free /``prefix`` subnets of the private pools, in order. A candidate that overlaps a taken
    range jumps past it, so the search takes steps per taken range, not per subnet (a /30 search
    across a routed 10.0.0.0/8 would otherwise try four million candidates)."""
    size = 2 ** (32 - prefix)
    ranges = [(net.first, net.last) for net in (netaddr.IPNetwork(cidr) for cidr in taken)]
    for pool in FREE_SUBNET_POOLS:
        pool_net = netaddr.IPNetwork(pool)
        if prefix < pool_net.prefixlen:
            continue
        start = pool_net.first
        while start + size - 1 <= pool_net.last:
            last = start + size - 1
            blocking = [end for first, end in ranges if first <= last and start <= end]
            if not blocking:
                yield f"{netaddr.IPAddress(start)}/{prefix}"
                start += size
                continue
            start = (max(blocking) // size + 1) * size  # the next aligned subnet past them


def move_network(net: NetworkSpec, cidr: str) -> NetworkSpec:
    def move_range(bounds: tuple[str, str] | None) -> tuple[str, str] | None:
        if bounds is None:
            return None
        return (move_address(bounds[0], net.cidr, cidr), move_address(bounds[1], net.cidr, cidr))

    return replace(
        net,
        cidr=cidr,
        gateway=move_address(net.gateway, net.cidr, cidr) if net.gateway else None,
        dhcp_range=move_range(net.dhcp_range),
        floating_range=move_range(net.floating_range),
    )


def move_node(lab: Lab, node: NodeSpec, moves: dict[str, tuple[str, str]]) -> NodeSpec:
    """The node with its explicit addresses moved along with their networks."""
    addresses = []
    for role, address in node.addresses:
        net = lab.network(role)
        if net is not None and net.name in moves:
            address = move_address(address, *moves[net.name])
        addresses.append((role, address))
    return replace(node, addresses=tuple(addresses))


def lab_tag(lab_name: str, length: int = 6) -> str:
    return hashlib.sha256(lab_name.encode()).hexdigest()[:length]


def bridge_name(lab: Lab, net: NetworkSpec) -> str:
    """``lb<6 hex of the lab's name>-<mgmt|tun|ext>``: at most 13 characters (Linux allows 15)."""
    return f"lb{lab_tag(lab.name)}-{BRIDGE_ABBREVIATION[net.role]}"


def plan_network(lab: Lab, net: NetworkSpec, move: tuple[str, str] | None) -> PlannedNetwork:
    network = ip_network(net.cidr)
    return PlannedNetwork(
        name=net.name,
        role=net.role,
        kind=net.kind,
        libvirt_name=f"{lab.name}-{net.name}",
        bridge=bridge_name(lab, net),
        cidr=net.cidr,
        netmask=str(network.netmask),
        gateway=net.gateway,
        dhcp_range=net.dhcp_range,
        floating_range=net.floating_range,
        remapped_from=move[0] if move else None,
    )


def namespace_name(lab_name: str) -> str:
    """An isolated lab's network namespace: ``lbns-<lab>`` (a lab name is at most 63 chars)."""
    return NAMESPACE_PREFIX + lab_name


def plan_gateway(lab: Lab, networks: tuple[PlannedNetwork, ...]) -> PlannedGateway:
    """The namespace that holds an isolated lab's gateways: one leg per network with a gateway
    (in the lab file's order), and an uplink subnet that meets none of the lab's networks."""
    links = tuple(
        GatewayLink(
            network=net.name,
            host_ifname=f"lbg{lab_tag(lab.name)}{index}",
            inner_ifname=f"gw-{BRIDGE_ABBREVIATION[net.role]}",
            address=net.gateway,
            prefix=ip_network(net.cidr).prefixlen,
            mac=gateway_mac(net.name, net.gateway),
        )
        for index, net in enumerate(networks)
        if net.gateway is not None
    )
    uplink = next(
        (cidr for cidr in UPLINK_SUBNETS if not any(overlaps(cidr, net.cidr) for net in networks)),
        None,
    )
    if uplink is None:  # four /24s in four ranges: a lab would need networks in all of them
        raise PlanError(
            f"{lab.source}: the lab's networks leave no subnet for its gateway's uplink "
            f"(one of {', '.join(UPLINK_SUBNETS)})",
            "move one of the lab's networks off these subnets",
        )
    return PlannedGateway(
        namespace=namespace_name(lab.name),
        links=links,
        uplink_cidr=uplink,
        uplink_dns=str(ip_network(uplink).network + 3),
    )


def through_uplink(plan: Plan, host: HostFacts) -> tuple[str, ...]:
    """Addresses an isolated lab's guests must reach outside although they lie in one of the
    lab's subnets: the host's package mirror, proxy or DNS server (this host's mirror is in the
    guide's 203.0.113.0/24). Its gateway routes each (a /32) through its uplink; an address the
    lab itself uses (a node's, a gateway) stays the lab's."""
    used = {nic.address for node in plan.nodes for nic in node.nics if nic.address}
    used |= {net.gateway for net in plan.networks if net.gateway}
    found = [
        address
        for _, address in host.protected_addresses
        if "." in address
        and address not in used
        and any(netaddr.IPAddress(address) in netaddr.IPNetwork(net.cidr) for net in plan.networks)
    ]
    return tuple(dict.fromkeys(found))


def check_bridges(lab: Lab, networks: tuple[PlannedNetwork, ...], host: HostFacts) -> None:
    for planned in networks:
        for other in host.libvirt_networks:
            if other.bridge == planned.bridge and other.lab != lab.name:
                raise PlanError(
                    f"{lab.source}: bridge {planned.bridge} for networks.{planned.name} is "
                    f"already used by libvirt network {other.name}",
                    "rename the lab (bridge names derive from the lab's name)",
                )


# --- nodes ----------------------------------------------------------------------------------


def plan_macs(lab: Lab, host: HostFacts) -> dict[tuple[str, NicRole], str]:
    """A MAC per (node, NIC): the lab file's, else derived from lab, node and NIC names.

    A derived MAC that another lab's (or another domain's) NIC already uses, or that repeats
    inside the lab, is derived again with a counter: stable across runs, unique on the host.
    """
    taken = {mac.lower() for owner, mac in host.used_macs if owner != lab.name}
    taken |= {mac.lower() for node in lab.nodes for _, mac in node.macs}
    macs: dict[tuple[str, NicRole], str] = {}
    for node in lab.nodes:
        explicit = dict(node.macs)
        for role in node.nics:
            if role in explicit:
                macs[node.name, role] = explicit[role].lower()
                continue
            attempt = 0
            while (mac := derive_mac(lab.name, node.name, role, attempt)) in taken:
                attempt += 1
            taken.add(mac)
            macs[node.name, role] = mac
    return macs


def gateway_mac(network: str, address: str) -> str:
    """An isolated lab's gateway MAC on ``network``: from the network's name and gateway
    address only, so every lab of a plan has the same (each lab is a layer-2 domain of its
    own), and a node restored from a template need not learn its gateway again (Linux keeps
    a neighbour entry up to a minute: SSH to a stamped lab would wait that long). Locally
    administered, apart from the guests' 52:54:00."""
    digest = hashlib.sha256(f"gateway/{network}/{address}".encode()).digest()
    return "02:6c:62:" + ":".join(f"{byte:02x}" for byte in digest[:3])


def derive_mac(lab: str, node: str, nic: NicRole, attempt: int = 0) -> str:
    digest = hashlib.sha256(f"{lab}/{node}/{nic}/{attempt}".encode()).digest()
    return "52:54:00:" + ":".join(f"{byte:02x}" for byte in digest[:3])


def plan_node(lab: Lab, node_index: int, macs: dict[tuple[str, NicRole], str]) -> PlannedNode:
    node = lab.nodes[node_index]
    nics = []
    for device_index, role in enumerate(node.nics):
        net = lab.network(role)
        assert net is not None  # the lab checks guarantee it
        nics.append(
            PlannedNic(
                device=f"eth{device_index}",
                network=net.name,
                mac=macs[node.name, role],
                address=node_address(net, node),
                prefix=ip_network(net.cidr).prefixlen,
                gateway=net.gateway if role == NicRole.MANAGEMENT else None,
            )
        )
    disks = [PlannedDisk("vda", node.disk, "root")]
    disks += [
        PlannedDisk(f"vd{chr(ord('b') + i)}", extra.size, extra.purpose)
        for i, extra in enumerate(node.extra_disks)
    ]
    return PlannedNode(
        name=node.name,
        role=node.role,
        domain=f"{lab.name}-{node.name}",
        vcpus=node.vcpus,
        memory=node.memory,
        nics=tuple(nics),
        disks=tuple(disks),
        recipe_minimum=node.recipe_minimum,
    )


def check_capacity(
    lab: Lab, nodes: tuple[PlannedNode, ...], totals: Totals, host: HostFacts
) -> None:
    if host.cpus is not None:
        for node in nodes:
            if node.vcpus > host.cpus:
                hint = f"set its vcpus to {host.cpus} or fewer"
                if "vcpus" in node.recipe_minimum:
                    hint += (
                        f" and pass --allow-small (its recipe's minimum is {node.vcpus}, "
                        "measured under emulation)"
                    )
                raise PlanError(
                    f"{lab.source}: node {node.name} has {node.vcpus} vCPUs, but the host has "
                    f"only {host.cpus} CPUs",
                    hint,
                )
    if host.memory_available is not None and totals.memory > host.memory_available:
        raise PlanError(
            f"{lab.source}: the lab needs {format_size(totals.memory)} of memory "
            f"({', '.join(f'{n.name} {format_size(n.memory)}' for n in nodes)}), but the host "
            f"has {format_size(host.memory_available)} available",
            "free memory on the host, or give the nodes less memory (--allow-small allows "
            "less than the guide's and the recipe's minimums)",
        )
    if host.disk_free is not None and totals.disk > host.disk_free:
        raise PlanError(
            f"{lab.source}: the lab's disks can grow to {format_size(totals.disk)}, but the "
            f"host has {format_size(host.disk_free)} free where they are stored",
            "free disk space, or give the nodes smaller disks",
        )


def check_shared_capacity(lab: Lab, totals: Totals, host: HostFacts) -> None:
    """The lab beside every lab already on the host: their running nodes' vCPUs and memory (at
    full size) and what their disks may still grow by, with this lab's, against the host."""
    others = host.labs

    def listed(amount: Callable[[LabUse], int], show: Callable[[int], str]) -> str:
        named = [f"{use.lab} {show(amount(use))}" for use in others if amount(use)]
        return f" ({', '.join(named)})" if named else ""

    hint = "bring a lab down (`labbuilder list` shows them), or make this one smaller"
    if host.cpus is not None:
        used = sum(use.vcpus for use in others)
        limit = host.cpus * VCPUS_PER_CPU
        if used + totals.vcpus > limit:
            raise PlanError(
                f"{lab.source}: the lab's {totals.vcpus} vCPUs and the {used} of the labs "
                f"running on this host{listed(lambda u: u.vcpus, str)} come to "
                f"{used + totals.vcpus}, more than its {host.cpus} CPUs take "
                f"({VCPUS_PER_CPU} vCPUs per CPU: {limit})",
                hint,
            )
    if host.memory_total is not None:
        ratio = KSM_OVERCOMMIT if host.ksm else 1.0
        limit = int(max(0, host.memory_total - HOST_MEMORY_RESERVE) * ratio)
        used = sum(use.memory for use in others)
        if used + totals.memory > limit:
            policy = (
                f"{KSM_OVERCOMMIT:g} times its memory less {format_size(HOST_MEMORY_RESERVE)}, "
                "with KSM running"
                if host.ksm
                else f"its memory less {format_size(HOST_MEMORY_RESERVE)}; with KSM running "
                f"(`labbuilder doctor --enable-ksm`) {KSM_OVERCOMMIT:g} times that"
            )
            raise PlanError(
                f"{lab.source}: the lab's {format_size(totals.memory)} of memory and the "
                f"{format_size(used)} of the labs running on this host"
                f"{listed(lambda u: u.memory, format_size)} come to "
                f"{format_size(used + totals.memory)}, more than the "
                f"{format_size(limit)} its nodes may have together ({policy})",
                hint,
            )
    if host.disk_free is not None:
        growth = sum(use.disk_growth for use in others)
        if growth and totals.disk + growth > host.disk_free:
            raise PlanError(
                f"{lab.source}: the lab's disks can grow to {format_size(totals.disk)}, and "
                f"the disks of the labs on this host{listed(lambda u: u.disk_growth, format_size)}"
                f" by {format_size(growth)} more, but the host has "
                f"{format_size(host.disk_free)} free where they are stored",
                hint.replace("make this one smaller", "free disk space"),
            )
