"""Whether a lab can be stamped from a template, and the plan it then has: pure functions.

A template holds each node's disk and memory as they were in the lab it was saved from, so a
lab made from it must be that lab again under another name: the same nodes and roles, sizes,
networks and addresses. The guests' NICs keep the MACs they were saved with (their memory
holds them), so the new lab's plan takes the template's MACs; labs have their networks to
themselves, so equal MACs in two labs never meet. Whether the lab is isolated may differ.

Imports the model and common only.
"""

from __future__ import annotations

from dataclasses import replace

from labbuilder.common.sizes import format_size
from labbuilder.model.lab import Plan, PlannedNode


def template_differences(plan: Plan, template: Plan) -> list[str]:
    """What keeps ``plan`` from resuming ``template``'s nodes, one phrase each ("" if none):
    a node, a size, an address, a network that is not the same."""
    found: list[str] = []
    ours = {node.name: node for node in plan.nodes}
    theirs = {node.name: node for node in template.nodes}
    if set(ours) != set(theirs):
        found.append(
            f"nodes {', '.join(sorted(ours))} in the lab, {', '.join(sorted(theirs))} in the "
            "template"
        )
    for name in sorted(set(ours) & set(theirs)):
        found += _node_differences(ours[name], theirs[name])
    for what, value, template_value in (
        ("image", plan.image, template.image),
        ("recipe", plan.recipe, template.recipe),
        ("networking", str(plan.networking), str(template.networking)),
    ):
        if value != template_value:
            found.append(f"{what} {value} in the lab, {template_value} in the template")
    nets = {net.name: net for net in plan.networks}
    other_nets = {net.name: net for net in template.networks}
    if set(nets) != set(other_nets):
        found.append(
            f"networks {', '.join(sorted(nets))} in the lab, {', '.join(sorted(other_nets))} in "
            "the template"
        )
    for name in sorted(set(nets) & set(other_nets)):
        net, other_net = nets[name], other_nets[name]
        compared: tuple[tuple[str, object, object], ...] = (
            ("subnet", net.cidr, other_net.cidr),
            ("gateway", net.gateway, other_net.gateway),
            ("floating range", net.floating_range, other_net.floating_range),
        )
        for what, mine, other in compared:
            if mine != other:
                found.append(
                    f"network {name}: {what} {_show(mine)} in the lab, {_show(other)} in the "
                    "template"
                )
    if plan.hosts != template.hosts and not found:
        found.append("the nodes' /etc/hosts entries differ")
    return found


def _node_differences(node: PlannedNode, other: PlannedNode) -> list[str]:
    found = []
    for what, mine, theirs in (
        ("role", str(node.role), str(other.role)),
        ("vCPUs", str(node.vcpus), str(other.vcpus)),
        ("memory", format_size(node.memory), format_size(other.memory)),
    ):
        if mine != theirs:
            found.append(f"node {node.name}: {what} {mine} in the lab, {theirs} in the template")
    disks = [(d.device, d.size, d.purpose) for d in node.disks]
    other_disks = [(d.device, d.size, d.purpose) for d in other.disks]
    if disks != other_disks:
        found.append(
            f"node {node.name}: disks {_disks(disks)} in the lab, {_disks(other_disks)} in the "
            "template"
        )
    nics = [(n.device, n.network, n.address, n.prefix, n.gateway) for n in node.nics]
    other_nics = [(n.device, n.network, n.address, n.prefix, n.gateway) for n in other.nics]
    if nics != other_nics:
        found.append(
            f"node {node.name}: NICs {_nics(nics)} in the lab, {_nics(other_nics)} in the template"
        )
    return found


def _show(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return "-".join(str(part) for part in value)
    return str(value)


def _disks(disks: list[tuple[str, int, str]]) -> str:
    return ", ".join(f"{device} {format_size(size)} ({purpose})" for device, size, purpose in disks)


def _nics(nics: list[tuple[str, str, str | None, int, str | None]]) -> str:
    return ", ".join(
        f"{device} {network} {address + '/' + str(prefix) if address else 'no address'}"
        for device, network, address, prefix, _ in nics
    )


def with_template_macs(plan: Plan, template: Plan) -> Plan:
    """``plan`` with each NIC's MAC taken from the same node's NIC in ``template`` (the plans
    must have no ``template_differences``)."""
    macs = {(node.name, nic.device): nic.mac for node in template.nodes for nic in node.nics}
    nodes = tuple(
        replace(
            node,
            nics=tuple(replace(nic, mac=macs[node.name, nic.device]) for nic in node.nics),
        )
        for node in plan.nodes
    )
    return replace(plan, nodes=nodes)
