"""Rules a parsed lab must obey: networks, address ranges, NICs, addresses, MACs, options.

``check_lab`` raises ``LabFileError`` at the first broken rule, naming the lab file, the key
path, the value and the rule. It is pure: no host state is looked at here (that is the
planner's job, with ``HostFacts``).
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import combinations
from urllib.parse import urlsplit

import netaddr

from labbuilder.common.errors import LabFileError
from labbuilder.common.tomlread import show
from labbuilder.model.addressing import (
    in_range,
    ip_address,
    ip_network,
    is_host_address,
    node_address,
    overlaps,
)
from labbuilder.model.lab import (
    Egress,
    Lab,
    Networking,
    NetworkKind,
    NetworkSpec,
    NicRole,
    NodeSpec,
    Role,
)
from labbuilder.model.values import (
    ValueProblem,
    check_egress_destination,
    check_libvirt_uri,
    check_mac,
    check_time_server,
    check_url,
    reserved_range,
)
from labbuilder.recipe.model import Recipe


def check_lab(lab: Lab) -> None:
    for network in lab.networks:
        check_network(lab, network)
    check_networks_together(lab)
    for node in lab.nodes:
        check_node(lab, node)
    check_unique_addresses(lab)
    check_unique_macs(lab)
    check_options(lab)


def fail(lab: Lab, path: str, value: object, rule: str, hint: str | None = None) -> LabFileError:
    return LabFileError(f"{lab.source}: {path} = {show(value)} {rule}", hint)


def check_network(lab: Lab, net: NetworkSpec) -> None:
    path = f"networks.{net.name}"
    try:
        network = ip_network(net.cidr)
    except ValueError as err:
        raise fail(lab, f"{path}.cidr", net.cidr, str(err)) from None
    reserved = reserved_range(net.cidr)
    if reserved is not None:
        raise fail(
            lab,
            f"{path}.cidr",
            net.cidr,
            f"overlaps a range no lab network can use: {reserved}",
            "use a private range (10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16)",
        )
    if net.kind == NetworkKind.ISOLATED and net.gateway is not None:
        raise fail(
            lab,
            f"{path}.gateway",
            net.gateway,
            "is set, but an isolated network has no gateway",
            'remove the gateway, or set kind = "nat"',
        )
    if net.kind != NetworkKind.ISOLATED and net.gateway is None:
        raise LabFileError(
            f"{lab.source}: {path} is a {net.kind} network and needs a gateway",
            f'gateway = "{network.network + 1}"',
        )
    gateway = None
    if net.gateway is not None:
        gateway = check_address(lab, f"{path}.gateway", net.gateway, net)
    for key, bounds in (("dhcp_range", net.dhcp_range), ("floating_range", net.floating_range)):
        if bounds is None:
            continue
        first = check_address(lab, f"{path}.{key}", bounds[0], net, shown=list(bounds))
        last = check_address(lab, f"{path}.{key}", bounds[1], net, shown=list(bounds))
        if first > last:
            raise fail(lab, f"{path}.{key}", list(bounds), "ends before it starts")
        if gateway is not None and in_range(gateway, bounds):
            raise fail(lab, f"{path}.{key}", list(bounds), f"contains the gateway {net.gateway}")
    if net.floating_range and net.role != NicRole.EXTERNAL:
        raise fail(
            lab,
            f"{path}.floating_range",
            list(net.floating_range),
            "is set, but floating IPs come from the external network only",
        )
    if net.dhcp_range and net.floating_range:
        dhcp, floating = net.dhcp_range, net.floating_range
        if ip_address(dhcp[0]) <= ip_address(floating[1]) and ip_address(floating[0]) <= ip_address(
            dhcp[1]
        ):
            raise fail(
                lab,
                f"{path}.floating_range",
                list(floating),
                f"overlaps the DHCP range {dhcp[0]}-{dhcp[1]}",
            )


def check_address(
    lab: Lab, path: str, text: str, net: NetworkSpec, shown: object = None
) -> netaddr.IPAddress:
    value = text if shown is None else shown
    try:
        address = ip_address(text)
    except ValueError as err:
        raise fail(lab, path, value, f"{err}") from None
    if not is_host_address(address, ip_network(net.cidr)):
        raise fail(lab, path, value, f"is outside networks.{net.name} ({net.cidr})")
    return address


def check_networks_together(lab: Lab) -> None:
    for first, second in combinations(lab.networks, 2):
        if first.role == second.role:
            raise LabFileError(
                f"{lab.source}: networks.{first.name} and networks.{second.name} both have "
                f"role {first.role}; a lab has one network per role"
            )
        if overlaps(first.cidr, second.cidr):
            raise fail(
                lab,
                f"networks.{second.name}.cidr",
                second.cidr,
                f"overlaps networks.{first.name} ({first.cidr})",
            )
    if lab.networking == Networking.LEGACY:
        tunnel = lab.network(NicRole.TUNNEL)
        if tunnel is not None:
            raise LabFileError(
                f"{lab.source}: networks.{tunnel.name} is an instance-tunnel network, but the "
                'lab uses networking = "legacy" (nova-network), which has none',
                "neutron and legacy networking cannot be mixed: remove the tunnel network or "
                'set networking = "neutron"',
            )
    if lab.network(NicRole.MANAGEMENT) is None:
        raise LabFileError(f"{lab.source}: the lab has no management network")


def check_node(lab: Lab, node: NodeSpec) -> None:
    path = node.defined_by
    if not node.nics or node.nics[0] != NicRole.MANAGEMENT:
        raise fail(
            lab,
            f"{path}.nics",
            [str(n) for n in node.nics],
            "must start with the management network (the guide's eth0)",
        )
    if len(set(node.nics)) != len(node.nics):
        raise fail(lab, f"{path}.nics", [str(n) for n in node.nics], "names a network twice")
    for role in node.nics:
        if lab.network(role) is None:
            raise fail(
                lab,
                f"{path}.nics",
                [str(n) for n in node.nics],
                f"uses the {role} network, which the lab does not have",
            )
    for role, text in node.addresses:
        net = lab.network(role)
        key = f"{path}.addresses.{role}"
        if net is None or role not in node.nics:
            raise fail(lab, key, text, f"is for a {role} NIC, which node {node.name} does not have")
        if role == NicRole.EXTERNAL:
            raise fail(
                lab,
                key,
                text,
                "is set, but the external NIC stays up without an address (the guide's "
                "'inet manual' stanza, L432)",
            )
    for role in node.nics:
        net = lab.network(role)
        assert net is not None  # checked above
        address_text = node_address(net, node)
        if address_text is None:
            continue
        text = address_text
        explicit = role in dict(node.addresses)
        key = f"{path}.addresses.{role}"
        where = key if explicit else f"{path} (its default {role} address)"
        try:
            address = ip_address(text)
        except ValueError as err:
            raise fail(lab, key, text, str(err)) from None
        network = ip_network(net.cidr)
        if not is_host_address(address, network):
            raise LabFileError(
                f"{lab.source}: {where} {text} is outside networks.{net.name} ({net.cidr})",
                None if explicit else f'set {key} = "<an address in {net.cidr}>"',
            )
        if net.gateway is not None and address == ip_address(net.gateway):
            raise LabFileError(f"{lab.source}: {where} {text} is the network's gateway")
        for range_key, bounds in (
            ("dhcp_range", net.dhcp_range),
            ("floating_range", net.floating_range),
        ):
            if bounds is not None and in_range(address, bounds):
                raise LabFileError(
                    f"{lab.source}: {where} {text} is inside networks.{net.name}.{range_key} "
                    f"({bounds[0]}-{bounds[1]})",
                    "node addresses, DHCP and floating ranges must not overlap",
                )


def check_unique_addresses(lab: Lab) -> None:
    seen: dict[str, str] = {}
    for node in lab.nodes:
        for role in node.nics:
            net = lab.network(role)
            address = node_address(net, node) if net else None
            if address is None:
                continue
            if address in seen:
                raise LabFileError(
                    f"{lab.source}: nodes {seen[address]} and {node.name} both have the "
                    f"address {address}",
                    f"set {node.defined_by}.addresses.{role} to a free address",
                )
            seen[address] = node.name


def check_unique_macs(lab: Lab) -> None:
    seen: dict[str, str] = {}
    for node in lab.nodes:
        for role, mac in node.macs:
            key = f"{node.defined_by}.macs.{role}"
            if role not in node.nics:
                raise fail(
                    lab, key, mac, f"is for a {role} NIC, which node {node.name} does not have"
                )
            try:
                normal = check_mac(mac)
            except ValueProblem as problem:
                raise fail(lab, key, mac, problem.rule, problem.hint) from None
            if normal in seen:
                raise fail(lab, key, mac, f"is already used by {seen[normal]}")
            seen[normal] = f"{node.name}'s {role} NIC"


def check_isolated(lab: Lab) -> None:
    """An isolated lab's gateways live in a namespace on this host, which serves no DHCP."""
    for net in lab.networks:
        if net.dhcp_range is not None:
            raise fail(
                lab,
                f"networks.{net.name}.dhcp_range",
                list(net.dhcp_range),
                "is set, but an isolated lab's gateway serves no DHCP (options.isolated)",
                "remove dhcp_range (nodes get their addresses from their seed), or set "
                "options.isolated = false",
            )
    host = urlsplit(lab.libvirt_uri).hostname
    if host not in (None, "", "localhost"):
        raise fail(
            lab,
            "options.isolated",
            True,
            f"needs the lab on this host, but libvirt_uri names host {host}",
            "set options.isolated = false for a lab on another host",
        )


def check_options(lab: Lab) -> None:
    options = lab.options
    if options.egress != Egress.ALLOW and options.egress_allow:
        raise fail(
            lab,
            "options.egress_allow",
            list(options.egress_allow),
            f'is set, but options.egress = "{options.egress}"',
            'set egress = "allow" to confine guests to these destinations',
        )
    checks: list[tuple[str, str, Callable[[str], str]]] = [
        (f"options.egress_allow[{i}]", item, check_egress_destination)
        for i, item in enumerate(options.egress_allow)
    ]
    checks += [
        (f"options.ntp_servers[{i}]", item, check_time_server)
        for i, item in enumerate(options.ntp_servers)
    ]
    for key, url in (("apt_proxy", options.apt_proxy), ("apt_mirror", options.apt_mirror)):
        if url is not None:
            checks.append((f"options.{key}", url, check_url))
    checks.append(("libvirt_uri", lab.libvirt_uri, check_libvirt_uri))
    if options.isolated:
        check_isolated(lab)
    for key, value, check in checks:
        try:
            check(value)
        except ValueProblem as problem:
            raise fail(lab, key, value, problem.rule, problem.hint) from None


# --- what the lab's recipe needs --------------------------------------------------------------


def check_lab_recipe(lab: Lab, recipe: Recipe) -> None:
    """Refuse a lab that ``recipe`` cannot install: ``options.stages`` names that are not
    optional stages of the recipe (or whose nodes the lab lacks), no controller or more than
    one."""
    optional = [stage for stage in recipe.stages if stage.optional]
    optional_names = ", ".join(stage.name for stage in optional) or "none"
    roles = {str(node.role) for node in lab.nodes}
    for i, name in enumerate(lab.options.optional_stages):
        key = f"options.stages[{i}]"
        stage = next((stage for stage in recipe.stages if stage.name == name), None)
        if stage is None or not stage.optional:
            rule = "is not a stage" if stage is None else "is not an optional stage"
            raise fail(
                lab,
                key,
                name,
                f"{rule} of recipe {recipe.name}",
                f"optional stages of {recipe.name}: {optional_names}",
            )
        missing = [role for role in stage.requires_roles if role not in roles]
        if missing:
            raise fail(
                lab,
                key,
                name,
                f"needs a {missing[0]} node, and the lab has none",
                f"add one, e.g. [nodes.{missing[0]}1]",
            )
    controllers = [node for node in lab.nodes if node.role == Role.CONTROLLER]
    if len(controllers) != 1:
        key = controllers[1].defined_by if controllers else "nodes.controller"
        what = "no controller node" if not controllers else f"{len(controllers)} controller nodes"
        raise LabFileError(
            f"{lab.source}: {key}: the lab has {what}; recipe {recipe.name} installs one "
            "controller, which every other node uses",
            "keep exactly one node with role controller ([nodes.controller], without count)",
        )
