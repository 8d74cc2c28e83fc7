"""A plan as JSON (for machines) and as tables (for people). Pure: returns data or renderables."""

from __future__ import annotations

import dataclasses
from enum import Enum
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from labbuilder.common.sizes import format_size
from labbuilder.model.lab import (
    GatewayLink,
    Networking,
    NetworkKind,
    NicRole,
    Plan,
    PlannedDisk,
    PlannedGateway,
    PlannedNetwork,
    PlannedNic,
    PlannedNode,
    Role,
    Totals,
)


def plan_as_dict(plan: Plan) -> dict[str, Any]:
    """The plan as JSON-ready data: enums as their values, tuples as lists, sizes in bytes."""
    data: dict[str, Any] = _plain(dataclasses.asdict(plan))
    if data["gateway"] is None:
        del data["gateway"]  # a lab with host gateways reads as it always has
    return data


def _plain(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def plan_tables(plan: Plan) -> Group:
    # Every value is shown literally (Text), never read as rich markup.
    networks = Table(title=Text(f"Lab {plan.lab}: networks ({plan.networking} networking)"))
    where = "gateway" if plan.gateway else "host gateway"
    for column in ("network", "kind", "cidr", where, "libvirt network", "bridge"):
        networks.add_column(column)
    for net in plan.networks:
        cidr = net.cidr if not net.remapped_from else f"{net.cidr} (was {net.remapped_from})"
        if net.floating_range:
            cidr += f"\nfloating {net.floating_range[0]}-{net.floating_range[1]}"
        _row(
            networks,
            net.name,
            str(net.kind),
            cidr,
            net.gateway or "-",
            net.libvirt_name,
            net.bridge,
        )

    nodes = Table(title="nodes")
    for column in ("node", "role", "vCPUs", "memory", "disks", "libvirt domain"):
        nodes.add_column(column)
    nics = Table(title="NICs, in the guide's order")
    for column in ("node", "NIC", "network", "address", "gateway", "MAC"):
        nics.add_column(column)
    for node in plan.nodes:
        disks = ", ".join(
            _sized(
                node,
                "disk" if d.purpose == "root" else "",
                f"{d.device} {format_size(d.size)} {d.purpose}",
            )
            for d in node.disks
        )
        _row(
            nodes,
            node.name,
            str(node.role),
            _sized(node, "vcpus", str(node.vcpus)),
            _sized(node, "memory", format_size(node.memory)),
            disks,
            node.domain,
        )
        for nic in node.nics:
            address = f"{nic.address}/{nic.prefix}" if nic.address else "up, no address"
            _row(nics, node.name, nic.device, nic.network, address, nic.gateway or "-", nic.mac)
    totals = Text(
        f"totals: {plan.totals.vcpus} vCPUs, {format_size(plan.totals.memory)} memory, "
        f"{format_size(plan.totals.disk)} disk (thin; the most the disks can grow to)\n"
        f"snapshots: each (one per install stage) keeps up to {format_size(plan.totals.memory)}"
        " more disk, the memory the nodes use\n"
        f"image {plan.image}, recipe {plan.recipe}, libvirt {plan.libvirt_uri}\n"
        "/etc/hosts: " + ", ".join(f"{address} {name}" for address, name in plan.hosts)
    )
    parts: list[Table | Text] = [networks, nodes, nics, totals]
    if plan.gateway is not None:
        parts.append(
            Text(
                f"isolated: the gateways are in network namespace {plan.gateway.namespace}, "
                "not on the host (no host address or route); guests reach the outside through "
                f"its uplink ({plan.gateway.uplink_cidr}, user-mode NAT)"
            )
        )
    parts += [Text(f"warning: {warning}", style="yellow") for warning in plan.warnings]
    return Group(*parts)


def _sized(node: PlannedNode, key: str, text: str) -> str:
    """A size, marked where the lab left it out and the recipe's minimum raised it."""
    return f"{text} (recipe minimum)" if key in node.recipe_minimum else text


def _row(table: Table, *cells: str) -> None:
    table.add_row(*(Text(cell) for cell in cells))


def plan_from_dict(data: dict[str, Any]) -> Plan:
    """The inverse of ``plan_as_dict``: a plan saved by ``up`` read back from the lab's state."""
    networks = tuple(
        PlannedNetwork(
            name=net["name"],
            role=NicRole(net["role"]),
            kind=NetworkKind(net["kind"]),
            libvirt_name=net["libvirt_name"],
            bridge=net["bridge"],
            cidr=net["cidr"],
            netmask=net["netmask"],
            gateway=net["gateway"],
            dhcp_range=tuple(net["dhcp_range"]) if net["dhcp_range"] else None,
            floating_range=tuple(net["floating_range"]) if net["floating_range"] else None,
            remapped_from=net.get("remapped_from"),
        )
        for net in data["networks"]
    )
    nodes = tuple(
        PlannedNode(
            name=node["name"],
            role=Role(node["role"]),
            domain=node["domain"],
            vcpus=node["vcpus"],
            memory=node["memory"],
            nics=tuple(PlannedNic(**nic) for nic in node["nics"]),
            disks=tuple(PlannedDisk(**disk) for disk in node["disks"]),
            recipe_minimum=tuple(node.get("recipe_minimum", ())),
        )
        for node in data["nodes"]
    )
    return Plan(
        lab=data["lab"],
        networking=Networking(data["networking"]),
        image=data["image"],
        recipe=data["recipe"],
        libvirt_uri=data["libvirt_uri"],
        networks=networks,
        nodes=nodes,
        hosts=tuple((address, name) for address, name in data["hosts"]),
        totals=Totals(**data["totals"]),
        warnings=tuple(data.get("warnings", ())),
        gateway=gateway_from_dict(data["gateway"]) if data.get("gateway") else None,
    )


def gateway_from_dict(data: dict[str, Any]) -> PlannedGateway:
    return PlannedGateway(
        namespace=data["namespace"],
        links=tuple(GatewayLink(**link) for link in data["links"]),
        uplink_cidr=data["uplink_cidr"],
        uplink_dns=data["uplink_dns"],
    )
