"""The installation guide's facts that shape a lab: networks, addresses, NICs and minimum sizes.

Every default a lab file leaves out comes from here, with the guide's line numbers
(``shared/seeds/openstack-install-guide-icehouse-ubuntu.txt``) so it can be checked.
"""

from __future__ import annotations

from dataclasses import dataclass

from labbuilder.model.lab import GiB, MiB, Networking, NetworkKind, NicRole, Role


@dataclass(frozen=True)
class NetworkDefault:
    role: NicRole
    kind: NetworkKind
    cidr: str
    gateway: str | None
    floating_range: tuple[str, str] | None = None


# L356-661 (three-node, neutron) and L662-830 (two-node, legacy); floating pool L3580-3606.
MANAGEMENT = NetworkDefault(NicRole.MANAGEMENT, NetworkKind.NAT, "10.0.0.0/24", "10.0.0.1")
TUNNEL = NetworkDefault(NicRole.TUNNEL, NetworkKind.ISOLATED, "10.0.1.0/24", None)
EXTERNAL = NetworkDefault(
    NicRole.EXTERNAL,
    NetworkKind.EXTERNAL,
    "203.0.113.0/24",
    "203.0.113.1",
    ("203.0.113.101", "203.0.113.200"),
)
# Legacy networking gives nova-network its own range (203.0.113.24/29, L3779-3831) in the
# recipe; the lab network itself has no neutron floating pool.
EXTERNAL_LEGACY = NetworkDefault(
    NicRole.EXTERNAL, NetworkKind.EXTERNAL, "203.0.113.0/24", "203.0.113.1"
)

NETWORKS: dict[Networking, tuple[NetworkDefault, ...]] = {
    Networking.NEUTRON: (MANAGEMENT, TUNNEL, EXTERNAL),
    Networking.LEGACY: (MANAGEMENT, EXTERNAL_LEGACY),
}

# NICs in the guide's order (eth0, eth1, eth2). L376-516 and L678-763.
NICS: dict[Networking, dict[Role, tuple[NicRole, ...]]] = {
    Networking.NEUTRON: {
        Role.CONTROLLER: (NicRole.MANAGEMENT,),
        Role.NETWORK: (NicRole.MANAGEMENT, NicRole.TUNNEL, NicRole.EXTERNAL),
        Role.COMPUTE: (NicRole.MANAGEMENT, NicRole.TUNNEL),
        Role.BLOCK: (NicRole.MANAGEMENT,),
        Role.OBJECT: (NicRole.MANAGEMENT,),
    },
    Networking.LEGACY: {
        Role.CONTROLLER: (NicRole.MANAGEMENT,),
        Role.COMPUTE: (NicRole.MANAGEMENT, NicRole.EXTERNAL),
        Role.BLOCK: (NicRole.MANAGEMENT,),
        Role.OBJECT: (NicRole.MANAGEMENT,),
    },
}

# The host part of each role's first address: controller 10.0.0.11, network .21,
# compute1 .31 (compute2 .32, ...), block1 .41 (L4317). The guide gives object-storage nodes
# only placeholders; .51, .52, ... follow the same pattern.
HOST_NUMBER: dict[Role, int] = {
    Role.CONTROLLER: 11,
    Role.NETWORK: 21,
    Role.COMPUTE: 31,
    Role.BLOCK: 41,
    Role.OBJECT: 51,
}


@dataclass(frozen=True)
class Size:
    vcpus: int
    memory: int
    disk: int


# Minimum hardware, L318-348. The guide gives none for block1 and the object-storage nodes.
MINIMUM: dict[Role, Size] = {
    Role.CONTROLLER: Size(1, 2 * GiB, 5 * GiB),
    Role.NETWORK: Size(1, 512 * MiB, 5 * GiB),
    Role.COMPUTE: Size(1, 2 * GiB, 10 * GiB),
}

# What a node gets when the lab file says nothing: the guide's minimum, or for the nodes the
# guide does not size, enough for cinder-volume / swift's services.
DEFAULT_SIZE: dict[Role, Size] = {
    **MINIMUM,
    Role.BLOCK: Size(1, 1 * GiB, 5 * GiB),
    Role.OBJECT: Size(1, 1 * GiB, 5 * GiB),
}

# Second disks: block1's /dev/sdb for the `cinder-volumes` VG (L4317-4421), and each
# object-storage node's /dev/sdb for swift (L4636-4722). The guide gives no size.
EXTRA_DISKS: dict[Role, tuple[tuple[int, str], ...]] = {
    Role.BLOCK: ((10 * GiB, "cinder-volumes"),),
    Role.OBJECT: ((10 * GiB, "swift"),),
}

# The nodes of each built-in topology, as (group name, role, count).
NODES: dict[Networking, tuple[tuple[str, Role, int], ...]] = {
    Networking.NEUTRON: (
        ("controller", Role.CONTROLLER, 1),
        ("network", Role.NETWORK, 1),
        ("compute", Role.COMPUTE, 1),
    ),
    Networking.LEGACY: (
        ("controller", Role.CONTROLLER, 1),
        ("compute", Role.COMPUTE, 1),
    ),
}

# Nodes that are one of a kind keep the bare name ("controller"); the others are numbered
# ("compute1", "block1", "object1"), as in the guide.
NUMBERED_ROLES = frozenset({Role.COMPUTE, Role.BLOCK, Role.OBJECT})

# A node table named after a role (with or without a number) takes that role.
ROLE_BY_NAME: dict[str, Role] = {
    "controller": Role.CONTROLLER,
    "network": Role.NETWORK,
    "compute": Role.COMPUTE,
    "block": Role.BLOCK,
    "object": Role.OBJECT,
}

DEFAULT_IMAGE = "debian-12"
DEFAULT_RECIPE = "zed-debian-12"
DEFAULT_LIBVIRT_URI = "qemu:///system"
