"""The lab model: what a lab file says (``Lab``), what the host offers (``HostFacts``), and what
the planner derives from both (``Plan``). Frozen dataclasses, enums for closed sets, tuples for
sequences; no I/O anywhere in this module.

Read this module first: every other part of labbuilder takes or returns these types.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

MiB = 1024 * 1024
GiB = 1024 * MiB


class Role(StrEnum):
    """What a node is for, after the guide's node names."""

    CONTROLLER = "controller"
    NETWORK = "network"
    COMPUTE = "compute"
    BLOCK = "block"  # the guide's block1: cinder-volume on a second disk
    OBJECT = "object"  # an Object Storage (swift) storage node


class Networking(StrEnum):
    """Which of the guide's networking variants the lab uses (chapter 7)."""

    NEUTRON = "neutron"  # three-node architecture, ML2/OVS/GRE
    LEGACY = "legacy"  # two-node architecture, nova-network


class NetworkKind(StrEnum):
    """How a lab network is wired on the host."""

    NAT = "nat"  # the host holds the gateway and NATs to the outside (management)
    ISOLATED = "isolated"  # no host address at all (instance tunnels)
    EXTERNAL = "external"  # the host holds the gateway; floating IPs are reachable from it


class NicRole(StrEnum):
    """Which guide network a NIC attaches to. The guide's NIC order is eth0, eth1, eth2."""

    MANAGEMENT = "management"
    TUNNEL = "tunnel"
    EXTERNAL = "external"


class Egress(StrEnum):
    """What guests may reach outside the lab."""

    NAT = "nat"  # everything, through the host's NAT
    NONE = "none"  # nothing outside the lab's own networks
    ALLOW = "allow"  # only the destinations listed in ``Options.egress_allow``


# --- the lab file ---------------------------------------------------------------------------


@dataclass(frozen=True)
class NetworkSpec:
    """One lab network (``[networks.<name>]``)."""

    name: str  # the key: "management", "tunnel", "external"
    role: NicRole
    kind: NetworkKind
    cidr: str  # "10.0.0.0/24"
    gateway: str | None  # the host's address on the bridge; None for isolated networks
    dhcp_range: tuple[str, str] | None = None  # first, last; None means static addresses only
    floating_range: tuple[str, str] | None = None  # neutron floating IPs (external network)


@dataclass(frozen=True)
class DiskSpec:
    """A disk beyond the root disk (block1's cinder-volumes, an object node's swift disk)."""

    size: int  # bytes
    purpose: str  # "cinder-volumes", "swift", or a user's own label


@dataclass(frozen=True)
class NodeSpec:
    """One machine of the lab (``[nodes.<name>]``, a group with ``count`` expands to several)."""

    name: str  # the hostname: "controller", "compute1"
    role: Role
    index: int  # 1 for controller/network/compute1/block1, 2 for compute2, ...
    defined_by: str  # the lab file's key path that defines it: "nodes.compute1", "nodes.compute"
    vcpus: int
    memory: int  # bytes
    disk: int  # bytes, the root disk
    nics: tuple[NicRole, ...]  # in the guide's order: eth0, eth1, eth2
    addresses: tuple[tuple[NicRole, str], ...] = ()  # explicit addresses from the lab file
    macs: tuple[tuple[NicRole, str], ...] = ()  # explicit MACs from the lab file
    extra_disks: tuple[DiskSpec, ...] = ()
    sized: tuple[str, ...] = ()  # the size keys the lab file sets ("vcpus", "memory", "disk")
    recipe_minimum: tuple[str, ...] = ()  # size keys raised to the lab's recipe's minimum


@dataclass(frozen=True)
class Options:
    """Lab-wide options (``[options]``)."""

    ntp_servers: tuple[str, ...] = ()  # upstream time sources of the controller; () = local clock
    apt_proxy: str | None = None  # e.g. "http://10.0.0.1:3142"
    apt_mirror: str | None = None  # e.g. "http://deb.debian.org/debian"
    internet: bool = False  # run the guide steps that reach the internet (ping openstack.org, ...)
    egress: Egress = Egress.NAT
    egress_allow: tuple[str, ...] = ()  # with egress = "allow": addresses or CIDRs guests may reach
    role_images: bool = True  # boot each role from an image with its recipe's packages baked in
    # The lab's gateways (10.0.0.1, 203.0.113.1) live in a network namespace of its own, not on
    # the host: no host address or route, identical labs side by side (``PlannedGateway``).
    isolated: bool = False
    optional_stages: tuple[str, ...] = ()  # optional recipe stages to run (`stages = [...]`)


@dataclass(frozen=True)
class Lab:
    """A whole lab as its file describes it, defaults filled in and validated."""

    name: str
    description: str
    source: str  # the lab file's path, or "built-in lab <name>"
    networking: Networking
    image: str
    recipe: str
    libvirt_uri: str
    networks: tuple[NetworkSpec, ...]
    nodes: tuple[NodeSpec, ...]
    options: Options = field(default_factory=Options)
    warnings: tuple[str, ...] = ()  # sizes below the guide's minimums, allowed by --allow-small

    def network(self, role: NicRole) -> NetworkSpec | None:
        return next((net for net in self.networks if net.role == role), None)


# --- the host -------------------------------------------------------------------------------


@dataclass(frozen=True)
class HostRoute:
    """A route the host already uses (``dev`` names the interface)."""

    destination: str  # a CIDR; the default route is "0.0.0.0/0"
    dev: str


@dataclass(frozen=True)
class LibvirtNetworkFact:
    """A libvirt network that already exists on the host."""

    name: str
    bridge: str | None
    cidrs: tuple[str, ...]
    lab: str | None  # the lab that owns it (from labbuilder's metadata), None if not ours


@dataclass(frozen=True)
class LabUse:
    """What a lab already on the host takes: its running nodes' vCPUs and memory at their full
    size (a guest grows to it), and the disk its volumes may still grow by (their sizes less
    what they hold now, stage snapshots included)."""

    lab: str
    vcpus: int
    memory: int  # bytes
    disk_growth: int  # bytes


@dataclass(frozen=True)
class HostFacts:
    """What the planner needs to know about the host, gathered by ``labbuilder.host.facts``.

    ``None`` means "not known": the planner then skips the checks that need it.
    """

    routes: tuple[HostRoute, ...] = ()
    libvirt_networks: tuple[LibvirtNetworkFact, ...] = ()
    protected_addresses: tuple[tuple[str, str], ...] = ()  # (what, address): mirror, proxy, DNS
    used_macs: tuple[tuple[str, str], ...] = ()  # (owner, MAC) of existing domains' NICs
    cpus: int | None = None
    memory_available: int | None = None  # bytes
    disk_free: int | None = None  # bytes, where the lab's disks go
    memory_total: int | None = None  # bytes (MemTotal)
    labs: tuple[LabUse, ...] = ()  # every lab on the host (the planned one is left out)
    ksm: bool = False  # the kernel merges identical guest pages (KSM running)


# --- the plan -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedNetwork:
    name: str  # the lab's key: "management"
    role: NicRole
    kind: NetworkKind
    libvirt_name: str  # "<lab>-<name>"
    bridge: str  # <= 15 characters, unique per lab
    cidr: str
    netmask: str
    gateway: str | None  # None: the host has no address on it
    dhcp_range: tuple[str, str] | None
    floating_range: tuple[str, str] | None
    remapped_from: str | None = None  # the lab file's CIDR when --auto-subnets moved it


@dataclass(frozen=True)
class PlannedNic:
    device: str  # "eth0", "eth1", "eth2"
    network: str  # the lab's network key
    mac: str
    address: str | None  # None: up without an address (the guide's external NIC)
    prefix: int
    gateway: str | None  # the default route, on the management NIC only


@dataclass(frozen=True)
class PlannedDisk:
    device: str  # "vda", "vdb", ...
    size: int  # bytes
    purpose: str  # "root", "cinder-volumes", "swift", ...


@dataclass(frozen=True)
class PlannedNode:
    name: str
    role: Role
    domain: str  # the libvirt domain name: "<lab>-<node>"
    vcpus: int
    memory: int
    nics: tuple[PlannedNic, ...]
    disks: tuple[PlannedDisk, ...]
    recipe_minimum: tuple[str, ...] = ()  # "vcpus", "memory", "disk": raised to the recipe's

    @property
    def management_address(self) -> str:
        return next(nic.address for nic in self.nics if nic.address is not None)


@dataclass(frozen=True)
class Totals:
    vcpus: int
    memory: int
    disk: int  # virtual sizes; overlays are thin, so this is the most they can take


@dataclass(frozen=True)
class GatewayLink:
    """One lab network's leg of an isolated lab's gateway: a veth pair whose host end joins the
    network's bridge (no address) and whose other end holds the gateway address in the lab's
    namespace."""

    network: str  # the lab's key: "management"
    host_ifname: str  # "lbg<tag><n>", enslaved to the network's bridge
    inner_ifname: str  # "gw-mgmt", inside the namespace
    address: str  # the network's gateway: "10.0.0.1"
    prefix: int
    # the inner end's MAC, the same in every lab with this network and gateway address (labs
    # are apart at layer 2): a node restored from a template finds its gateway in its ARP
    # cache as it was. "" (a lab planned before): the kernel's.
    mac: str = ""


@dataclass(frozen=True)
class PlannedGateway:
    """Where an isolated lab's gateways live: the network namespace ``namespace``, with one
    leg per lab network that has a gateway and an uplink to the outside (user-mode NAT of the
    host's own connections, ``slirp4netns``, on ``uplink_cidr``), which changes no address,
    route or firewall rule of the host."""

    namespace: str  # "lbns-<lab>", under /run/netns
    links: tuple[GatewayLink, ...]
    uplink_cidr: str  # the uplink's own subnet inside the namespace: clear of the lab's subnets
    uplink_dns: str  # the uplink's resolver (the host's, relayed); guests ask their gateway


@dataclass(frozen=True)
class Plan:
    """Everything ``up`` will create, derived from a lab and the host's facts."""

    lab: str
    networking: Networking
    image: str
    recipe: str
    libvirt_uri: str
    networks: tuple[PlannedNetwork, ...]
    nodes: tuple[PlannedNode, ...]
    hosts: tuple[tuple[str, str], ...]  # /etc/hosts lines (address, name), no 127.0.1.1 line
    totals: Totals
    warnings: tuple[str, ...] = ()
    gateway: PlannedGateway | None = None  # an isolated lab's gateway namespace

    def node(self, name: str) -> PlannedNode:
        return next(node for node in self.nodes if node.name == name)

    def network(self, name: str) -> PlannedNetwork:
        return next(net for net in self.networks if net.name == name)
