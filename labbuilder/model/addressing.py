"""Address arithmetic shared by the lab checks and the planner (pure, on top of netaddr)."""

from __future__ import annotations

import netaddr

from labbuilder.model import guide
from labbuilder.model.lab import NetworkSpec, NicRole, NodeSpec


def ip_network(cidr: str) -> netaddr.IPNetwork:
    """Parse an IPv4 CIDR; raise ValueError unless it is a network address with its prefix."""
    if "/" not in cidr:
        raise ValueError("is not a CIDR such as 10.0.0.0/24")
    try:
        network = netaddr.IPNetwork(cidr, version=4)
    except (netaddr.AddrFormatError, ValueError, TypeError):
        raise ValueError("is not a CIDR such as 10.0.0.0/24") from None
    if network.ip != network.network:
        raise ValueError(f"has host bits set; the network is {network.cidr}")
    if not 8 <= network.prefixlen <= 30:
        raise ValueError("needs a prefix length from /8 to /30")
    return network


def netmask(prefix: int) -> str:
    """The dotted netmask of a prefix length: 24 -> 255.255.255.0."""
    return str(netaddr.IPNetwork(f"0.0.0.0/{prefix}").netmask)


def ip_address(text: str) -> netaddr.IPAddress:
    try:
        return netaddr.IPAddress(text, version=4, flags=netaddr.INET_PTON)
    except (netaddr.AddrFormatError, ValueError, TypeError):
        raise ValueError("is not an IPv4 address") from None


def is_host_address(address: netaddr.IPAddress, network: netaddr.IPNetwork) -> bool:
    """Inside the network, and neither its network nor its broadcast address."""
    return address in network and address not in (network.network, network.broadcast)


def in_range(address: netaddr.IPAddress, bounds: tuple[str, str] | None) -> bool:
    if bounds is None:
        return False
    return bool(ip_address(bounds[0]) <= address <= ip_address(bounds[1]))


def default_address(network: NetworkSpec, node: NodeSpec) -> str | None:
    """The guide's address for a node on a network: 10.0.0.11, 10.0.1.21, 10.0.0.32, ...

    External NICs have none (the guide's ``inet manual`` stanza).
    """
    if network.role == NicRole.EXTERNAL:
        return None
    number = guide.HOST_NUMBER[node.role] + node.index - 1
    return str(ip_network(network.cidr).network + number)


def node_address(network: NetworkSpec, node: NodeSpec) -> str | None:
    """The node's address on ``network``: the lab file's, else the guide's default."""
    explicit = dict(node.addresses).get(network.role)
    return explicit if explicit is not None else default_address(network, node)


def move_address(address: str, old_cidr: str, new_cidr: str) -> str:
    """The address at the same offset in another network of the same size."""
    offset = int(ip_address(address)) - int(ip_network(old_cidr).network)
    return str(ip_network(new_cidr).network + offset)


def overlaps(first: str, second: str) -> bool:
    a, b = netaddr.IPNetwork(first), netaddr.IPNetwork(second)
    return bool(a.first <= b.last and b.first <= a.last)
