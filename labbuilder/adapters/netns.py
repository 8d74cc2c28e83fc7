"""Network namespaces: an isolated lab's gateway namespace, and the host's way into it.

An isolated lab (``options.isolated``) keeps its gateways off the host. Its libvirt networks are
bare bridges; ``ensure_gateway`` makes the namespace ``lbns-<lab>`` (``PlannedGateway``) with:

- one veth pair per lab network with a gateway: the host end joins the network's bridge and
  has no address (IPv6 off), the other end holds the gateway address (10.0.0.1, 203.0.113.1);
- an uplink: ``slirp4netns`` gives the namespace a tap device whose packets become ordinary
  connections of the host's own (user-mode NAT), so the host gains no address, no route and no
  firewall rule, and nothing can be routed into the namespace from outside;
- its own firewall (iptables-restore inside the namespace, which nothing else uses): guests'
  traffic out is NATed to the uplink per the lab's egress, never to the host's own addresses
  or to networks the host reaches other than through its default route (other labs, other
  bridges); DNS asked of a gateway goes to the uplink's resolver (the host's resolvers).

Two labs with the same addresses live side by side: each namespace has its own routing table.
The host reaches a lab's nodes through sockets opened inside its namespace (``connect``): the
engine's SSH sessions, readiness, ``labbuilder relay`` (ssh's ProxyCommand) and ``forward``.

Netlink and namespaces go through pyroute2; the uplink and the firewall are programs started
through ``processes``. Everything here is found again by name (``lbns-<lab>``, the veths'
``lbg<tag><n>``, the uplink's argv), so ``remove_gateway`` cleans up after a killed ``up``.
May import: ``common``, ``model``, ``adapters.processes``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import shutil
import socket
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from pyroute2 import IPRoute, NetlinkError, NetNS, netns

from labbuilder.adapters import processes
from labbuilder.common.errors import HostError, PlanError
from labbuilder.model.lab import Egress, PlannedGateway

RUN_DIR = Path("/run/netns")
UPLINK = "uplink"  # the uplink's tap device inside a namespace
CLONE_NEWNET = 0x40000000
SLIRP = "slirp4netns"
INSTALL_HINT = "apt-get install slirp4netns (bash scripts/setup-host installs it)"

_libc = ctypes.CDLL(None, use_errno=True)
_lock = threading.Lock()  # pyroute2's namespace helpers are not safe to call concurrently


def path(namespace: str) -> Path:
    return RUN_DIR / namespace


def exists(namespace: str) -> bool:
    return path(namespace).exists()


def namespaces(prefix: str) -> list[str]:
    """The named namespaces on this host whose names start with ``prefix``."""
    if not RUN_DIR.is_dir():
        return []
    return sorted(entry.name for entry in RUN_DIR.iterdir() if entry.name.startswith(prefix))


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextmanager
def inside(namespace: str) -> Iterator[None]:
    """Within it, this thread (only this thread) is in ``namespace``: sockets it opens there
    stay there. Raises ``HostError`` when the namespace does not exist."""
    try:
        target = os.open(path(namespace), os.O_RDONLY)
    except FileNotFoundError:
        raise HostError(
            f"network namespace {namespace} does not exist",
            "the lab is not up (or its gateway is gone): `labbuilder up` makes it again",
        ) from None
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(target)
        os.close(own)


def connect(
    namespace: str | None, host: str, port: int, timeout: float | None = None
) -> socket.socket:
    """A TCP connection to ``host``:``port`` as seen from ``namespace`` (None: from the host).
    Only the socket is made inside the namespace; the connect waits outside it."""
    if namespace is None:
        return socket.create_connection((host, port), timeout=timeout)
    with inside(namespace):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def enter(namespace: str) -> None:
    """Move this whole (single-threaded) process into ``namespace``: before an exec."""
    fd = os.open(path(namespace), os.O_RDONLY)
    try:
        _setns(fd)
    finally:
        os.close(fd)


CLONE_NEWNS = 0x00020000
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000


def _mount(source: str, target: str, flags: int) -> None:
    if _libc.mount(source.encode(), target.encode(), None, flags, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target}: {os.strerror(err)}")


def see_hosts(hosts: Path) -> None:
    """Give this whole (single-threaded) process a mount namespace of its own in which
    ``/etc/hosts`` is ``hosts``: before an exec, so that a program resolves a lab's names (as
    ``ip netns exec`` does with ``/etc/netns/NAME/hosts``). The host's file is not touched."""
    if _libc.unshare(CLONE_NEWNS) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare (mount namespace): {os.strerror(err)}")
    _mount("none", "/", MS_REC | MS_PRIVATE)  # nothing mounted here shows outside
    _mount(str(hosts), "/etc/hosts", MS_BIND)


# --- the gateway ------------------------------------------------------------------------------


def check_host() -> None:
    """Refuse (``PlanError``, before anything is made) a host that cannot hold a gateway
    namespace: not root, or without slirp4netns or iptables."""
    if os.geteuid() != 0:
        raise PlanError(
            "options.isolated: an isolated lab's gateway namespace needs root",
            "run labbuilder as root (sudo)",
        )
    for program, package in ((SLIRP, "slirp4netns"), ("iptables-restore", "iptables")):
        if shutil.which(program) is None:
            raise PlanError(
                f"options.isolated: {program} is not installed; an isolated lab's gateway needs it",
                f"apt-get install {package} (bash scripts/setup-host installs it)",
            )


def uplink_pids(namespace: str) -> list[int]:
    """The uplink daemons of ``namespace`` (found by their argv: no pid file to lose)."""
    target = str(path(namespace))
    return processes.daemons(lambda argv: Path(argv[0]).name == SLIRP and target in argv)


def ensure_gateway(
    gateway: PlannedGateway,
    bridges: Mapping[str, str],
    *,
    egress: Egress,
    allow: Sequence[str],
    log: Path,
    outside: Sequence[str] = (),
) -> None:
    """Make ``gateway`` so (running it again changes nothing): the namespace, its legs on the
    lab's ``bridges`` (network name -> bridge), the uplink, a route through the uplink for each
    address of ``outside`` (outside addresses inside the lab's subnets: the host's mirror) and
    the firewall. Raises ``HostError`` when the host cannot (no slirp4netns, not root)."""
    ns = gateway.namespace
    try:
        with _lock:
            if not exists(ns):
                netns.create(ns)
            with inside(ns):
                _sysctl("net/ipv6/conf/all/disable_ipv6", "1")
                _sysctl("net/ipv6/conf/default/disable_ipv6", "1")
                _sysctl("net/ipv4/ip_forward", "1")
            with IPRoute() as host:
                for link in gateway.links:
                    if not host.link_lookup(ifname=link.host_ifname):
                        host.link(
                            "add",
                            ifname=link.host_ifname,
                            kind="veth",
                            peer={"ifname": link.inner_ifname, "net_ns_fd": ns},
                        )
                    _sysctl(f"net/ipv6/conf/{link.host_ifname}/disable_ipv6", "1")
                    bridge = host.link_lookup(ifname=bridges[link.network])
                    if not bridge:
                        raise HostError(
                            f"bridge {bridges[link.network]} of network {link.network} is missing",
                            "is the lab's libvirt network active? `labbuilder up` again",
                        )
                    index = host.link_lookup(ifname=link.host_ifname)[0]
                    host.link("set", index=index, master=bridge[0], state="up")
            with NetNS(ns) as inner:
                inner.link("set", index=inner.link_lookup(ifname="lo")[0], state="up")
                for link in gateway.links:
                    index = inner.link_lookup(ifname=link.inner_ifname)[0]
                    if link.mac and inner.get_links(index)[0].get_attr("IFLA_ADDRESS") != link.mac:
                        inner.link("set", index=index, state="down")
                        inner.link("set", index=index, address=link.mac)
                    have = {
                        (a.get_attr("IFA_ADDRESS"), a["prefixlen"])
                        for a in inner.get_addr(index=index, family=socket.AF_INET)
                    }
                    if (link.address, link.prefix) not in have:
                        inner.addr("add", index=index, address=link.address, prefixlen=link.prefix)
                    inner.link("set", index=index, state="up")
    except (OSError, NetlinkError) as err:
        raise HostError(
            f"cannot make the gateway namespace {ns}: {err}",
            "labbuilder makes network namespaces: run it as root",
        ) from None
    if not uplink_pids(ns):
        _start_uplink(gateway, log)
    try:
        _route_outside(gateway, outside)
    except (OSError, NetlinkError) as err:
        raise HostError(
            f"cannot route {', '.join(outside)} through the uplink of {ns}: {err}",
            "see the lab's logs/gateway.log; `labbuilder down` and `up` make the gateway anew",
        ) from None
    apply_rules(gateway, egress=egress, allow=allow, blocked=host_networks_off_uplink())


def _route_outside(gateway: PlannedGateway, outside: Sequence[str]) -> None:
    """/32 routes through the uplink for ``outside``, and none for addresses no longer in it."""
    via = str(ipaddress.ip_network(gateway.uplink_cidr).network_address + 2)
    wanted = set(outside)
    with _lock, NetNS(gateway.namespace) as inner:
        uplink = inner.link_lookup(ifname=UPLINK)[0]
        for route in inner.get_routes(family=socket.AF_INET, table=254, oif=uplink):
            dst = route.get_attr("RTA_DST")
            if route["dst_len"] == 32 and dst not in wanted:
                inner.route("del", dst=f"{dst}/32", gateway=via)
        for address in sorted(wanted):
            inner.route("replace", dst=f"{address}/32", gateway=via)


def _sysctl(key: str, value: str) -> None:
    """Set ``key`` (of the calling thread's namespace); IPv6 keys only where the kernel has
    IPv6 (it can be off on the kernel command line)."""
    path = Path("/proc/sys", key)
    if key.startswith("net/ipv6/") and not Path("/proc/sys/net/ipv6").is_dir():
        return
    path.write_text(value)


def _start_uplink(gateway: PlannedGateway, log: Path) -> None:
    def argv(ready_fd: int) -> list[str]:
        return [
            SLIRP,
            "--configure",
            "--mtu=65520",
            "--disable-host-loopback",
            "--enable-seccomp",
            f"--cidr={gateway.uplink_cidr}",
            f"--ready-fd={ready_fd}",
            "--netns-type=path",
            str(path(gateway.namespace)),
            UPLINK,
        ]

    try:
        processes.start_daemon(argv, log)
    except processes.ProgramMissing:
        raise HostError(
            f"{SLIRP} is not installed; an isolated lab's gateway needs it for its uplink",
            INSTALL_HINT,
        ) from None


def host_networks_off_uplink() -> list[str]:
    """What guests of an isolated lab must not reach through the uplink: the host's own
    addresses and the networks the host routes to other than over its default route's
    interface (other labs' bridges, libvirt's default network, container bridges)."""
    with IPRoute() as host:
        defaults = {
            route.get_attr("RTA_OIF")
            for route in host.get_routes(family=socket.AF_INET, table=254)
            if route["dst_len"] == 0
        }
        blocked = {
            f"{route.get_attr('RTA_DST')}/{route['dst_len']}"
            for route in host.get_routes(family=socket.AF_INET, table=254)
            if route["dst_len"] > 0 and route.get_attr("RTA_OIF") not in defaults
        }
        blocked |= {
            f"{address.get_attr('IFA_ADDRESS')}/32"
            for address in host.get_addr(family=socket.AF_INET)
            if not address.get_attr("IFA_ADDRESS", "").startswith("127.")
        }
    return sorted(blocked, key=lambda cidr: ipaddress.ip_network(cidr, strict=False))


def gateway_rules(
    gateway: PlannedGateway, *, egress: Egress, allow: Sequence[str], blocked: Sequence[str]
) -> str:
    """The namespace's whole IPv4 firewall, as ``iptables-restore`` input. Pure."""
    legs = "gw-+"
    dns = gateway.uplink_dns
    nat = ["*nat", ":PREROUTING ACCEPT [0:0]", ":INPUT ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
    nat.append(":POSTROUTING ACCEPT [0:0]")
    for link in gateway.links:
        for proto in ("udp", "tcp"):
            nat.append(
                f"-A PREROUTING -i {link.inner_ifname} -d {link.address} -p {proto} --dport 53 "
                f"-j DNAT --to-destination {dns}"
            )
    nat += [f"-A POSTROUTING -o {UPLINK} -j MASQUERADE", "COMMIT"]
    rules = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD DROP [0:0]", ":OUTPUT ACCEPT [0:0]"]
    rules.append("-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT")
    rules.append(f"-A FORWARD -i {legs} -o {legs} -j ACCEPT")
    rules += [
        f"-A FORWARD -o {UPLINK} -d {dns}/32 -p {p} --dport 53 -j ACCEPT" for p in ("udp", "tcp")
    ]
    if egress == Egress.ALLOW:
        rules += [f"-A FORWARD -i {legs} -o {UPLINK} -d {dest} -j ACCEPT" for dest in allow]
    elif egress == Egress.NAT:
        rules += [f"-A FORWARD -i {legs} -o {UPLINK} -d {net} -j DROP" for net in blocked]
        rules.append(f"-A FORWARD -i {legs} -o {UPLINK} -j ACCEPT")
    rules.append("COMMIT")
    return "\n".join([*nat, *rules]) + "\n"


def apply_rules(
    gateway: PlannedGateway, *, egress: Egress, allow: Sequence[str], blocked: Sequence[str]
) -> None:
    script = gateway_rules(gateway, egress=egress, allow=allow, blocked=blocked)
    argv = ["ip", "netns", "exec", gateway.namespace, "iptables-restore", "-w"]
    try:
        processes.run(argv, input=script, log_input=True)
    except processes.ProcessFailed as err:
        said = (err.result.errors or err.result.output).strip().splitlines()
        raise HostError(
            f"cannot set the firewall of the gateway namespace {gateway.namespace}: "
            f"{err.message}: {said[-1] if said else 'no message'}",
            "labbuilder needs iptables (apt-get install iptables) and root",
        ) from None
    except processes.ProcessError as err:
        raise HostError(
            f"cannot set the firewall of the gateway namespace {gateway.namespace}: {err.message}",
            "labbuilder needs iptables (apt-get install iptables) and root",
        ) from None


def remove_gateway(namespace: str, host_ifnames: Sequence[str] = ()) -> bool:
    """Stop the namespace's uplink and every process in it, delete its veths (the host ends
    ``host_ifnames``: deleting one end deletes the pair at once, where a namespace's own go a
    moment after it) and the namespace. Idempotent; True when anything was there."""
    found = False
    for pid in uplink_pids(namespace):
        found = True
        processes.stop(pid)
    with _lock:
        with IPRoute() as host:
            for name in host_ifnames:
                for index in host.link_lookup(ifname=name):
                    found = True
                    with contextlib.suppress(OSError, NetlinkError):  # gone meanwhile: ENODEV
                        host.link("del", index=index)
        if exists(namespace):
            found = True
            for pid in netns.ns_pids().get(namespace, []):
                processes.stop(pid)
            netns.remove(namespace)
    return found
