"""Lab egress rules on the real kernel: a guest network namespace on a real libvirt NAT network's
bridge, and an "outside" namespace reachable only through the host's routing, with two addresses.

Probes are single TCP connects with a 1 s timeout, only to addresses inside the namespaces made
here. Everything (namespaces, veths, the libvirt network and its bridge, rules, ip_forward) is
named ``lbtest...`` and removed in the fixtures' teardown, also when a test fails.
"""

from __future__ import annotations

import contextlib
import json
import random
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Network, ip_network
from pathlib import Path
from typing import Any

import pytest

from labbuilder.adapters import firewall as fw
from labbuilder.adapters import libvirt as lv
from labbuilder.common.errors import HostError
from labbuilder.model.lab import Egress

PORT = 18080  # the listener's port inside the outside namespace
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
LISTENER = """
import signal, socket, sys
signal.alarm(600)  # never outlives a stuck test run by much
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(64)
while True:
    s.accept()[0].close()
"""
PROBE = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1).close()
except OSError:
    sys.exit(1)
"""


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=60).stdout


def free_subnets(count: int) -> list[IPv4Network]:
    """``count`` /24s in 10.253.0.0/16 that no route of this host touches, in random order."""
    used = [
        ip_network(route["dst"], strict=False)
        for route in json.loads(sh("ip", "-j", "-4", "route", "show", "table", "all"))
        if route["dst"] != "default"
    ]
    candidates = [IPv4Network(f"10.253.{i}.0/24") for i in range(256)]
    random.shuffle(candidates)
    free = [net for net in candidates if not any(net.overlaps(u) for u in used)]
    assert len(free) >= count, "no free /24 in 10.253.0.0/16 on this host"
    return free[:count]


@dataclass(frozen=True)
class Topology:
    lab: str
    bridge: str
    guest_ns: str
    outside_ns: str
    guest_net: str
    gateway: str
    a: str  # the outside's two addresses
    b: str
    suffix: str

    def reachable(self, address: str, port: int = PORT) -> bool:
        """One TCP connect from the guest namespace, 1 s at most."""
        argv = ["ip", "netns", "exec", self.guest_ns, sys.executable, "-c", PROBE]
        result = subprocess.run([*argv, address, str(port)], capture_output=True, timeout=20)
        return result.returncode == 0


@pytest.fixture(scope="module")
def topology() -> Iterator[Topology]:
    s = secrets.token_hex(2)
    inner, outer = free_subnets(2)
    hosts, outs = list(inner.hosts()), list(outer.hosts())
    topo = Topology(
        lab=f"lbtest-fw-{s}",
        bridge=f"lbtest{s}-mgmt",  # like a lab bridge, lb<tag>-mgmt: 15 characters
        guest_ns=f"lbtest{s}-guest",
        outside_ns=f"lbtest{s}-out",
        guest_net=str(inner),
        gateway=str(hosts[0]),
        a=str(outs[9]),
        b=str(outs[19]),
        suffix=s,
    )
    with contextlib.ExitStack() as undo:
        old_forward = IP_FORWARD.read_text()
        undo.callback(IP_FORWARD.write_text, old_forward)
        undo.callback(fw.remove_egress, topo.lab)
        conn = lv.connect("qemu:///system")
        undo.callback(conn.close)
        network: Any = conn.networkCreateXML(f"""<network>
          <name>lbtest{s}-fw</name>
          <forward mode="nat"/>
          <bridge name="{topo.bridge}" stp="off" delay="0"/>
          <ip address="{topo.gateway}" netmask="{inner.netmask}"/>
        </network>""")
        undo.callback(network.destroy)
        for ns in (topo.guest_ns, topo.outside_ns):
            sh("ip", "netns", "add", ns)
            undo.callback(subprocess.run, ["ip", "netns", "del", ns], check=False)
        g0, g1, o0, o1 = (f"lbtest{s}-{end}" for end in ("g0", "g1", "o0", "o1"))
        for host_end, ns_end, ns in ((g0, g1, topo.guest_ns), (o0, o1, topo.outside_ns)):
            sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", ns_end)
            undo.callback(subprocess.run, ["ip", "link", "del", host_end], check=False)
            sh("ip", "link", "set", ns_end, "netns", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", ns, "link", "set", ns_end, "up")
        sh("ip", "link", "set", g0, "master", topo.bridge, "up")
        sh("ip", "-n", topo.guest_ns, "addr", "add", f"{hosts[9]}/24", "dev", g1)
        sh("ip", "-n", topo.guest_ns, "route", "add", "default", "via", topo.gateway)
        sh("ip", "addr", "add", f"{outs[0]}/24", "dev", o0)
        sh("ip", "link", "set", o0, "up")
        for address in (topo.a, topo.b):
            sh("ip", "-n", topo.outside_ns, "addr", "add", f"{address}/24", "dev", o1)
        sh("ip", "-n", topo.outside_ns, "route", "add", "default", "via", str(outs[0]))
        IP_FORWARD.write_text("1\n")
        argv = ["ip", "netns", "exec", topo.outside_ns, sys.executable, "-c", LISTENER, str(PORT)]
        listener = subprocess.Popen(argv)
        undo.callback(listener.wait, 10)
        undo.callback(listener.kill)
        wait_for_listener(topo.a)
        yield topo


def wait_for_listener(address: str) -> None:
    """Poll from the host (output path, never filtered by lab rules), 5 s at most."""
    argv = [sys.executable, "-c", PROBE, address, str(PORT)]
    for _ in range(50):
        if subprocess.run(argv, capture_output=True, timeout=20).returncode == 0:
            return
        time.sleep(0.1)
    raise AssertionError(f"the outside listener on {address}:{PORT} did not come up")


@pytest.fixture
def topo(topology: Topology) -> Iterator[Topology]:
    """The topology, with the lab's rules removed after each test."""
    yield topology
    fw.remove_egress(topology.lab)


def ensure(topo: Topology, egress: Egress, allow: list[str] | None = None) -> None:
    fw.ensure_egress(topo.lab, [topo.bridge], [topo.guest_net], egress, allow or [])


def mangle_lines(topo: Topology) -> list[str]:
    """Rules in mangle that name the lab's chain or bridge."""
    chain = fw.chain_name(topo.lab)
    return [
        line
        for line in sh("iptables-save", "-t", "mangle").splitlines()
        if line.startswith("-A ") and (chain in line or topo.bridge in line)
    ]


@pytest.mark.integration
def test_libvirt_nat_rules_are_in_the_same_iptables(topo: Topology) -> None:
    """libvirt's ACCEPT in filter FORWARD and its MASQUERADE are visible to our `iptables`."""
    assert f"-s {topo.guest_net} -i {topo.bridge} -j ACCEPT" in sh("iptables-save", "-t", "filter")
    nat = sh("iptables", "-t", "nat", "-S", "LIBVIRT_PRT")
    assert f"-s {topo.guest_net} ! -d {topo.guest_net} -j MASQUERADE" in nat


@pytest.mark.integration
def test_nat_reaches_both_and_leaves_no_rules(topo: Topology) -> None:
    ensure(topo, Egress.NAT)
    assert topo.reachable(topo.a) and topo.reachable(topo.b)
    assert topo.lab not in fw.owned_labs()
    assert mangle_lines(topo) == []


@pytest.mark.integration
def test_allow_reaches_only_the_allowed_address(topo: Topology) -> None:
    ensure(topo, Egress.ALLOW, [topo.a])
    assert topo.reachable(topo.a)
    assert not topo.reachable(topo.b)
    assert topo.lab in fw.owned_labs()
    lines = mangle_lines(topo)
    assert lines and all(f'--comment "labbuilder:{topo.lab}"' in line for line in lines)


@pytest.mark.integration
def test_none_reaches_neither_but_the_gateway_dns(topo: Topology) -> None:
    ensure(topo, Egress.NONE)
    assert not topo.reachable(topo.a)
    assert not topo.reachable(topo.b)
    assert topo.reachable(topo.gateway, 53)  # libvirt's dnsmasq on the lab bridge
    # a lab subnet stays reachable with "none": make A's address part of the lab
    fw.ensure_egress(topo.lab, [topo.bridge], [topo.guest_net, f"{topo.a}/32"], Egress.NONE, [])
    assert topo.reachable(topo.a)
    assert not topo.reachable(topo.b)


@pytest.mark.integration
def test_remove_egress_restores_everything(topo: Topology) -> None:
    ensure(topo, Egress.NONE)
    assert topo.lab in fw.owned_labs()
    fw.remove_egress(topo.lab)
    fw.remove_egress(topo.lab)  # idempotent
    assert topo.lab not in fw.owned_labs()
    assert mangle_lines(topo) == []
    assert fw.chain_name(topo.lab) not in sh("iptables-save", "-t", "mangle")
    assert topo.reachable(topo.a) and topo.reachable(topo.b)


@pytest.mark.integration
def test_ensure_twice_makes_one_set_of_rules_and_replaces_the_allow_list(topo: Topology) -> None:
    ensure(topo, Egress.ALLOW, [topo.a])
    first = mangle_lines(topo)
    ensure(topo, Egress.ALLOW, [topo.a])
    assert mangle_lines(topo) == first
    assert len(first) == 6  # the jump; ESTABLISHED, own bridge, lab subnet, A, DROP
    rules = fw.lab_rules(topo.lab)  # IPv4 first, then IPv6: no subnets there, only drops
    assert rules[: len(first)] == tuple(first)
    assert [line.split()[-1] for line in rules[len(first) :]] == [
        fw.chain_name(topo.lab),
        "RETURN",
        "RETURN",
        "DROP",
    ]
    ensure(topo, Egress.ALLOW, [topo.b])  # a new list replaces the old one
    assert len(mangle_lines(topo)) == 6
    assert topo.reachable(topo.b)
    assert not topo.reachable(topo.a)


@pytest.mark.integration
def test_an_accept_at_the_top_of_filter_forward_does_not_defeat_the_allow_list(
    topo: Topology,
) -> None:
    """What libvirt does when it re-inserts its jumps at position 1 after our rules exist (daemon
    restart, firewalld reload), and what Docker does: an ACCEPT for the lab's subnet that comes
    before everything in filter FORWARD, inserted after ``ensure_egress``."""
    ensure(topo, Egress.ALLOW, [topo.a])
    rule = ["-i", topo.bridge, "-s", topo.guest_net, "-m", "comment", "--comment"]
    rule += [f"lbtest{topo.suffix}-accept", "-j", "ACCEPT"]
    sh("iptables", "-I", "FORWARD", "1", *rule)
    try:
        first = next(x for x in sh("iptables", "-S", "FORWARD").splitlines() if x.startswith("-A"))
        assert f"lbtest{topo.suffix}-accept" in first
        assert topo.reachable(topo.a)
        assert not topo.reachable(topo.b)
    finally:
        sh("iptables", "-D", "FORWARD", *rule)


def test_a_missing_iptables_is_a_host_error_naming_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(HostError) as err:
        fw.owned_labs()
    assert "iptables-save is not installed" in err.value.message
    assert err.value.hint == "apt-get install iptables"


def test_owners_are_read_from_iptables_save_comments() -> None:
    table = fw.parse_save(
        "*mangle\n:FORWARD ACCEPT [0:0]\n:LB-1663ab - [0:0]\n:LIBVIRT_PRT - [0:0]\n"
        '-A FORWARD -i lb1663ab-mgmt -m comment --comment "labbuilder:guide" -j LB-1663ab\n'
        "-A FORWARD -m comment --comment labbuilder:other -j RETURN\n"
        '-A FORWARD -m comment --comment "someone else" -j RETURN\n'
        "-A POSTROUTING -j LIBVIRT_PRT\nCOMMIT\n"
    )
    assert table.chains == ("FORWARD", "LB-1663ab", "LIBVIRT_PRT")
    assert [rule.owner for rule in table.rules] == ["guide", "other", None, None]
    assert table.rules[0].target == "LB-1663ab"
    assert table.rules[0].spec.startswith("-i lb1663ab-mgmt ")
