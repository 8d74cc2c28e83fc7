"""Isolated labs: the lab's gateways in a network namespace of its own (``options.isolated``).

Pure parts first (the namespace's firewall, the plan, the bare bridges, the ssh_config), then
the gateway on the real host without guests (two with the guide's identical addresses side by
side, the host's routes and addresses untouched), then two real labs with the guide's own
addresses up at once under TCG: reached with `labbuilder ssh` and plain `ssh -F`, unable to
reach each other or the host, one `down` leaving the other running, and a killed `up` leaving
nothing after `down`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from lablib import (
    gateway_leftovers,
    isolated_lab,
    lab_environment,
    lab_leftovers,
    remove_labs,
    run_labbuilder,
)
from pyroute2 import IPRoute

from labbuilder.adapters import netns
from labbuilder.lab.files import parse_lab
from labbuilder.lab.planner import gateway_mac, plan
from labbuilder.lab.view import plan_as_dict, plan_from_dict
from labbuilder.lifecycle.render import render_network_xml
from labbuilder.model.lab import Egress, GatewayLink, HostFacts, HostRoute, PlannedGateway

POOL = "lbtest-isolated-pool"
LAB_A, LAB_B, LAB_K = "lbtest-iso-a", "lbtest-iso-b", "lbtest-iso-k"


def isolated_plan(name: str = "lbtest-iso-plan"):  # type: ignore[no-untyped-def]
    lab = parse_lab(f'name = "{name}"\n[options]\nisolated = true\n', source="lab.toml")
    # The host routes the guide's management subnet itself: an isolated lab does not mind.
    host = HostFacts(routes=(HostRoute("0.0.0.0/0", "eth0"), HostRoute("10.0.0.0/24", "br0")))
    return plan(lab, host)


GATEWAY = PlannedGateway(
    "lbns-x",
    (
        GatewayLink("management", "lbgabc0", "gw-mgmt", "10.0.0.1", 24),
        GatewayLink("external", "lbgabc2", "gw-ext", "203.0.113.1", 24),
    ),
    "10.0.2.0/24",
    "10.0.2.3",
)


# --- pure -------------------------------------------------------------------------------------


def test_nat_egress_drops_the_hosts_networks_before_it_accepts_the_rest() -> None:
    rules = netns.gateway_rules(
        GATEWAY, egress=Egress.NAT, allow=(), blocked=("192.168.122.0/24", "192.0.2.2/32")
    ).splitlines()
    drops = [i for i, rule in enumerate(rules) if rule.endswith("-j DROP")]
    accept = rules.index("-A FORWARD -i gw-+ -o uplink -j ACCEPT")
    assert len(drops) == 2 and max(drops) < accept
    assert ":FORWARD DROP [0:0]" in rules
    # DNS asked of either gateway goes to the uplink's resolver
    assert (
        "-A PREROUTING -i gw-ext -d 203.0.113.1 -p udp --dport 53 -j DNAT --to-destination 10.0.2.3"
    ) in rules
    assert "-A POSTROUTING -o uplink -j MASQUERADE" in rules


def test_egress_none_lets_only_dns_out_and_allow_only_its_list() -> None:
    def out(egress: Egress, allow: tuple[str, ...] = ()) -> list[str]:
        text = netns.gateway_rules(GATEWAY, egress=egress, allow=allow, blocked=("192.0.2.2/32",))
        return [r for r in text.splitlines() if "-o uplink" in r and "ACCEPT" in r]

    dns = [
        "-A FORWARD -o uplink -d 10.0.2.3/32 -p udp --dport 53 -j ACCEPT",
        "-A FORWARD -o uplink -d 10.0.2.3/32 -p tcp --dport 53 -j ACCEPT",
    ]
    assert out(Egress.NONE) == dns
    assert out(Egress.ALLOW, ("151.101.0.0/16",)) == [
        *dns,
        "-A FORWARD -i gw-+ -o uplink -d 151.101.0.0/16 -j ACCEPT",
    ]


def test_an_isolated_plan_keeps_the_guides_addresses_and_renders_bare_bridges() -> None:
    planned = isolated_plan()
    assert planned.gateway is not None
    assert planned.gateway.namespace == "lbns-lbtest-iso-plan"
    assert [(link.inner_ifname, link.address) for link in planned.gateway.links] == [
        ("gw-mgmt", "10.0.0.1"),
        ("gw-ext", "203.0.113.1"),
    ]
    assert planned.gateway.uplink_cidr == "10.0.2.0/24"  # clear of 10.0.0.0/24 and 10.0.1.0/24
    assert planned.node("controller").management_address == "10.0.0.11"
    for net in planned.networks:
        xml = render_network_xml(planned, net, "digest")
        assert "<ip" not in xml and "<forward" not in xml, xml
        assert f'<bridge name="{net.bridge}"' in xml
    assert plan_from_dict(plan_as_dict(planned)) == planned


def test_the_uplink_subnet_moves_off_the_labs_own_networks() -> None:
    lab = parse_lab(
        'name = "u"\n[options]\nisolated = true\n[networks.tunnel]\ncidr = "10.0.2.0/24"\n'
        '[nodes.network]\naddresses = { management = "10.0.0.21", tunnel = "10.0.2.21" }\n'
        '[nodes.compute1]\naddresses = { management = "10.0.0.31", tunnel = "10.0.2.31" }\n',
        source="lab.toml",
    )
    planned = plan(lab, HostFacts())
    assert planned.gateway is not None
    assert planned.gateway.uplink_cidr == "172.31.254.0/24"
    assert planned.gateway.uplink_dns == "172.31.254.3"


def test_a_lab_with_host_gateways_plans_as_before() -> None:
    lab = parse_lab('name = "h"\n[options]\nisolated = false\n', source="lab.toml")
    planned = plan(lab, HostFacts())
    assert planned.gateway is None and "gateway" not in plan_as_dict(planned)


# --- the gateway on the real host, without guests ----------------------------------------------


def host_network_state() -> tuple[str, list[tuple[str, str]]]:
    """The host's IPv4 routes and its addresses (other than IPv6 link-local ones)."""
    with IPRoute() as host:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in host.get_links()}
        addresses = sorted(
            (names.get(a["index"], "?"), f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}")
            for a in host.get_addr()
            if not str(a.get_attr("IFA_ADDRESS")).startswith("fe80:")
        )
    return Path("/proc/net/route").read_text(), addresses


@pytest.fixture
def bridges() -> Iterator[list[str]]:
    names = ["lbtestgwbr0", "lbtestgwbr1"]
    with IPRoute() as host:
        for name in names:
            host.link("add", ifname=name, kind="bridge")
            host.link("set", index=host.link_lookup(ifname=name)[0], state="up")
    try:
        yield names
    finally:
        with IPRoute() as host:
            for name in names:
                for index in host.link_lookup(ifname=name):
                    host.link("del", index=index)


def make_gateway(name: str, index: int) -> PlannedGateway:
    return PlannedGateway(
        f"lbns-{name}",
        (GatewayLink("management", f"lbgtest{index}0", "gw-mgmt", "10.0.0.1", 24, MAC),),
        "10.0.2.0/24",
        "10.0.2.3",
    )


MAC = gateway_mac("management", "10.0.0.1")


@pytest.mark.integration
def test_two_gateways_with_the_guides_address_live_side_by_side(
    bridges: list[str], tmp_path: Path
) -> None:
    gateways = [make_gateway(f"lbtest-gw{i}", i) for i in range(2)]
    before = host_network_state()
    try:
        for gateway, bridge in zip(gateways, bridges, strict=True):
            netns.ensure_gateway(
                gateway, {"management": bridge}, egress=Egress.NAT, allow=(), log=tmp_path / "g"
            )
        # again: nothing changes, no second uplink
        netns.ensure_gateway(
            gateways[0], {"management": bridges[0]}, egress=Egress.NAT, allow=(), log=tmp_path / "g"
        )
        assert host_network_state() == before
        for gateway in gateways:
            assert len(netns.uplink_pids(gateway.namespace)) == 1
            with netns.inside(gateway.namespace), IPRoute() as inner:
                held = [a.get_attr("IFA_ADDRESS") for a in inner.get_addr(family=socket.AF_INET)]
                (leg,) = inner.get_links(ifname="gw-mgmt")
            assert "10.0.0.1" in held
            # the same MAC in both labs (apart at layer 2): what a template's nodes know
            assert leg.get_attr("IFLA_ADDRESS") == MAC and leg.get_attr("IFLA_OPERSTATE") != "DOWN"
        # the mirror's address inside the lab's subnet: routed through the uplink, not the lab
        netns.ensure_gateway(
            gateways[1], {"management": bridges[1]}, egress=Egress.NAT, allow=(),
            log=tmp_path / "g", outside=("10.0.0.80",),
        )  # fmt: skip
        with netns.inside(gateways[1].namespace), IPRoute() as inner:
            routes = {
                (r.get_attr("RTA_DST"), r["dst_len"], r.get_attr("RTA_GATEWAY"))
                for r in inner.get_routes(family=socket.AF_INET)
            }
        assert ("10.0.0.80", 32, "10.0.2.2") in routes
    finally:
        for gateway in gateways:
            netns.remove_gateway(gateway.namespace, [link.host_ifname for link in gateway.links])
    for gateway in gateways:
        assert not netns.exists(gateway.namespace)
        assert netns.uplink_pids(gateway.namespace) == []
    assert not [e for e in Path("/sys/class/net").iterdir() if e.name.startswith("lbgtest")]
    assert host_network_state() == before


# --- two real labs ----------------------------------------------------------------------------


class Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"host\n")

    def log_message(self, *args: Any) -> None:
        pass


def host_address() -> str:
    """An address of this host on its default route's interface."""
    with IPRoute() as host:
        route = next(r for r in host.get_routes(family=socket.AF_INET) if r["dst_len"] == 0)
        oif = route.get_attr("RTA_OIF")
        return str(
            next(
                a.get_attr("IFA_ADDRESS")
                for a in host.get_addr(family=socket.AF_INET)
                if a["index"] == oif
            )
        )


@pytest.fixture(scope="module")
def labs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Labs A (egress nat) and B (egress none): the guide's addresses both, up at once."""
    env = lab_environment(tmp_path_factory.mktemp("isolated-state"), POOL)
    folder = tmp_path_factory.mktemp("isolated-labs")
    files = {}
    for name, egress in ((LAB_A, "nat"), (LAB_B, "none")):
        files[name] = folder / f"{name}.toml"
        files[name].write_text(isolated_lab(name, egress=egress))
    before = host_network_state()
    try:
        ups = {
            name: subprocess.Popen(
                [sys.executable, "-m", "labbuilder", "up", str(path), "--allow-small"],
                env={**os.environ, **env},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            for name, path in files.items()
        }
        for name, process in ups.items():
            out, err = process.communicate(timeout=1200)
            assert process.returncode == 0, f"{name}: {out}{err}"
        yield {"env": env, "files": files, "before": before}
    finally:
        for path in files.values():
            run_labbuilder("down", str(path), env=env)
        remove_labs([LAB_A, LAB_B, LAB_K], env)


def ssh(labs: dict[str, Any], lab: str, *command: str) -> subprocess.CompletedProcess[str]:
    return run_labbuilder(
        "ssh", "-f", str(labs["files"][lab]), "controller", *command, env=labs["env"], timeout=120
    )


@pytest.mark.integration
def test_two_labs_with_the_guides_addresses_run_side_by_side(labs: dict[str, Any]) -> None:
    after_routes, after_addresses = host_network_state()
    assert after_routes == labs["before"][0], "the host's routes changed"
    assert after_addresses == labs["before"][1], "the host's addresses changed"
    for lab in (LAB_A, LAB_B):
        record = json.loads(
            (Path(labs["env"]["LABBUILDER_STATE_DIR"]) / "labs" / lab / "lab.json").read_text()
        )
        assert record["plan"]["nodes"][0]["nics"][0]["address"] == "10.0.0.11"
        status = run_labbuilder("status", "-f", str(labs["files"][lab]), "--json", env=labs["env"])
        assert status.returncode == 0, status.stderr
        shown = json.loads(status.stdout)
        assert (shown["gateway"], shown["uplink"]) == (f"lbns-{lab}", True)
        result = ssh(labs, lab, "hostname", "-I")
        assert result.returncode == 0, result.stderr
        assert result.stdout.split()[0] == "10.0.0.11"
        # plain OpenSSH with the lab's ssh_config (ProxyCommand through the namespace)
        config = run_labbuilder("ssh-config", "-f", str(labs["files"][lab]), env=labs["env"])
        assert config.returncode == 0, config.stderr
        assert "ProxyCommand" in config.stdout
        config_file = Path(labs["env"]["LABBUILDER_STATE_DIR"]) / f"{lab}.ssh_config"
        config_file.write_text(config.stdout)
        plain = subprocess.run(
            ["ssh", "-F", str(config_file), "-o", "BatchMode=yes", "controller", "cat",
             "/etc/hostname"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert plain.returncode == 0, plain.stderr
        assert plain.stdout.strip() == "controller"


@pytest.mark.integration
def test_labs_cannot_reach_each_other_or_the_host(labs: dict[str, Any]) -> None:
    # Lab B's controller takes a second address that only it has; its own gateway reaches it.
    added = ssh(labs, LAB_B, "sudo", "ip", "addr", "add", "10.0.0.99/24", "dev", "eth0")
    assert added.returncode == 0, added.stderr
    gateway_b = run_labbuilder(
        "gateway", "-f", str(labs["files"][LAB_B]), "--", "ping", "-c", "2", "-W", "2",
        "10.0.0.99", env=labs["env"], timeout=60,
    )  # fmt: skip
    assert gateway_b.returncode == 0, gateway_b.stdout + gateway_b.stderr
    # ... and lab A, on the same subnet with the same gateway address, does not.
    cross = ssh(labs, LAB_A, "ping", "-c", "2", "-W", "2", "10.0.0.99")
    assert cross.returncode != 0, cross.stdout
    # A real HTTP server on the host, answering on the host's own address: the host gets it,
    # lab A's guest (egress nat) reaches the outside but not the host.
    server = ThreadingHTTPServer(("0.0.0.0", 0), Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port, address = server.server_address[1], host_address()
        with socket.create_connection((address, port), timeout=5):
            pass
        # A dropped connection never answers: 4 s tell it from one that opens (well under 1 s
        # through the uplink even under emulation; the open check below gets 10 s).
        probe = "timeout {} bash -c 'exec 3<>/dev/tcp/{}/{}' && echo open || echo closed"
        to_host = ssh(labs, LAB_A, probe.format(4, address, port))
        assert to_host.stdout.strip().splitlines()[-1] == "closed", to_host.stdout
        outside = ssh(labs, LAB_A, probe.format(10, "deb.debian.org", 80))
        assert outside.stdout.strip().splitlines()[-1] == "open", outside.stdout + outside.stderr
        # Lab B (egress none) resolves names through its gateway but reaches nothing outside.
        resolved = ssh(labs, LAB_B, "getent", "hosts", "deb.debian.org")
        assert resolved.returncode == 0, resolved.stderr
        confined = ssh(labs, LAB_B, probe.format(4, "deb.debian.org", 80))
        assert confined.stdout.strip().splitlines()[-1] == "closed", confined.stdout
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.integration
def test_a_forwarded_port_reaches_a_node(labs: dict[str, Any]) -> None:
    forward = subprocess.Popen(
        [sys.executable, "-m", "labbuilder", "forward", "-f", str(labs["files"][LAB_A]),
         "controller:22", "--port", "0"],
        env={**os.environ, **labs["env"]}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert forward.stdout is not None
        line = forward.stdout.readline()
        assert line.startswith("forwarding 127.0.0.1:"), line + forward.stderr.read()  # type: ignore[union-attr]
        port = int(line.split()[1].rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.settimeout(10)
            assert conn.recv(64).startswith(b"SSH-2.0-")  # the node's sshd greets
    finally:
        forward.send_signal(signal.SIGINT)
        forward.wait(timeout=10)
    assert forward.returncode == 130


@pytest.mark.integration
def test_down_of_one_leaves_the_other_and_a_killed_up_leaves_nothing(
    labs: dict[str, Any],
) -> None:
    down = run_labbuilder("down", str(labs["files"][LAB_A]), env=labs["env"])
    assert down.returncode == 0, down.stderr
    assert gateway_leftovers(LAB_A) == {"namespaces": [], "veths": [], "uplinks": []}
    assert lab_leftovers(LAB_A, POOL) == {"domains": [], "networks": [], "volumes": []}
    still = ssh(labs, LAB_B, "true")
    assert still.returncode == 0, still.stderr
    # kill -9 in the middle of an isolated `up` (its gateway and domain made), then `down`
    killed = labs["files"][LAB_B].with_name(f"{LAB_K}.toml")
    killed.write_text(isolated_lab(LAB_K))
    process = subprocess.Popen(
        [sys.executable, "-m", "labbuilder", "up", str(killed), "--allow-small"],
        env={**os.environ, **labs["env"]}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while not (lab_leftovers(LAB_K, POOL)["domains"] and gateway_leftovers(LAB_K)["uplinks"]):
            if process.poll() is not None:
                pytest.fail(f"up ended before its domain: {process.stderr.read()}")  # type: ignore[union-attr]
            assert time.monotonic() < deadline
            time.sleep(0.5)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    down = run_labbuilder("down", str(killed), env=labs["env"])
    assert down.returncode == 0, down.stderr
    assert gateway_leftovers(LAB_K) == {"namespaces": [], "veths": [], "uplinks": []}
    assert lab_leftovers(LAB_K, POOL) == {"domains": [], "networks": [], "volumes": []}
    assert ssh(labs, LAB_B, "true").returncode == 0


def test_the_hosts_mirror_inside_the_guides_subnet_is_routed_through_the_uplink() -> None:
    from labbuilder.lab.planner import through_uplink

    planned = isolated_plan()
    host = HostFacts(
        protected_addresses=(
            ("the apt source deb.debian.org", "203.0.113.80"),
            ("the host's DNS server", "10.255.255.53"),  # in no lab subnet: routed anyway
            ("a proxy at the lab's own gateway", "10.0.0.1"),  # the lab's: stays the lab's
            ("the apt source", "2001:db8::1"),
        )
    )
    assert through_uplink(planned, host) == ("203.0.113.80",)


@pytest.mark.integration
def test_gc_removes_the_gateway_of_a_lab_that_no_longer_exists(
    bridges: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from labbuilder.lab.planner import lab_tag, namespace_name
    from labbuilder.lifecycle import teardown

    lab = "lbtest-iso-orphan"
    gateway = PlannedGateway(
        namespace_name(lab),
        (GatewayLink("management", f"lbg{lab_tag(lab)}0", "gw-mgmt", "10.0.0.1", 24),),
        "10.0.2.0/24",
        "10.0.2.3",
    )
    monkeypatch.setenv("LABBUILDER_STATE_DIR", str(tmp_path / "state"))
    (tmp_path / "state").mkdir(mode=0o700)
    try:
        # what a killed `up` leaves: the gateway, and no state, no domain, no network
        netns.ensure_gateway(
            gateway, {"management": bridges[0]}, egress=Egress.NAT, allow=(), log=tmp_path / "g"
        )
        assert gateway_leftovers(lab)["uplinks"]
        removed = teardown.gc("qemu:///system", match=lab)
        assert removed[lab].gateway is True
        assert gateway_leftovers(lab) == {"namespaces": [], "veths": [], "uplinks": []}
        assert teardown.gc("qemu:///system", match=lab) == {}
    finally:
        netns.remove_gateway(gateway.namespace, [gateway.links[0].host_ifname])
