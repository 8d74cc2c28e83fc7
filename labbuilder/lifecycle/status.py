"""``status``, ``ssh-config``: what a lab looks like on the host, read from libvirt and the
lab's state directory."""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass

from labbuilder.adapters import libvirt as lv
from labbuilder.adapters import netns
from labbuilder.common.errors import UsageError
from labbuilder.lifecycle.state import LabState, gateway_namespace, load_state_record


@dataclass(frozen=True)
class NodeStatus:
    name: str
    role: str
    domain: str
    state: str
    addresses: tuple[str, ...]
    acceleration: str  # "kvm" or "tcg"


@dataclass(frozen=True)
class LabStatus:
    lab: str
    nodes: tuple[NodeStatus, ...]
    networks: tuple[tuple[str, bool], ...]  # (libvirt name, active)
    virt_type: str | None  # what compute nodes must use, from the probe at `up`
    gateway: str | None = None  # an isolated lab's gateway namespace
    uplink: bool = False  # its uplink runs (the guests reach the outside)
    template: str | None = None  # the template its nodes resumed from
    template_stage: str | None = None


def lab_status(lab: str, uri: str, state: LabState) -> LabStatus:
    record = load_state_record(state) or {}
    planned = {node["name"]: node for node in record.get("plan", {}).get("nodes", [])}
    with lv.LibvirtHypervisor.open(uri, readonly=True) as hypervisor:
        nodes = []
        for domain in sorted(hypervisor.domains(lab), key=lambda d: d.name):
            meta = domain.metadata
            name = meta.get("node", domain.name)
            addresses = tuple(
                f"{nic['device']} {nic['address'] or '(no address)'}"
                for nic in planned.get(name, {}).get("nics", [])
            )
            nodes.append(
                NodeStatus(
                    name=name,
                    role=meta.get("role", "?"),
                    domain=domain.name,
                    state=domain.state,
                    addresses=addresses,
                    acceleration="kvm" if domain.domain_type == "kvm" else "tcg",
                )
            )
        networks = tuple((network.name, network.active) for network in hypervisor.networks(lab))
    gateway = gateway_namespace(record)
    uplink = gateway is not None and netns.exists(gateway) and bool(netns.uplink_pids(gateway))
    template = record.get("template") or {}
    return LabStatus(
        lab,
        tuple(nodes),
        networks,
        record.get("virt_type"),
        gateway,
        uplink,
        template.get("name"),
        template.get("stage"),
    )


def render_ssh_config(state: LabState) -> str:
    """An ssh_config for plain ``ssh -F``: each node by its name and by ``<lab>-<node>``."""
    record = load_state_record(state)
    if record is None:
        raise UsageError(
            f"lab {state.lab} is not up on this host", "bring it up with `labbuilder up`"
        )
    lines = [f"# labbuilder lab {state.lab}: ssh -F {state.ssh_config_path} <node>"]
    proxy = []
    if gateway_namespace(record) is not None:
        # An isolated lab's nodes are reached from its gateway namespace: labbuilder relays.
        relay = shlex.join([sys.executable, "-m", "labbuilder", "relay", state.lab])
        proxy = [f"  ProxyCommand {relay} %h %p"]
    for node in record["plan"]["nodes"]:
        address = next(nic["address"] for nic in node["nics"] if nic["address"])
        lines += [
            f"Host {node['name']} {state.lab}-{node['name']}",
            f"  HostName {address}",
            f"  User {record['user']}",
            f"  IdentityFile {state.key_path}",
            "  IdentitiesOnly yes",
            "  StrictHostKeyChecking yes",
            f"  UserKnownHostsFile {state.known_hosts_path}",
            "  LogLevel ERROR",
            *proxy,
            "",
        ]
    return "\n".join(lines)
