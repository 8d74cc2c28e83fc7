"""Plan objects → the texts libvirt and cloud-init read: network XML, domain XML, seed files.

Pure functions over jinja2 templates shipped as data. The XML comes from
``labbuilder.libvirtxml`` (autoescaped); the seed from ``cloud-init/``, whose YAML values go
through the ``yaml`` filter, and the files cloud-init writes through their destination's filter
(``labbuilder.common.quoting``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache

import jinja2

from labbuilder.catalog.model import CloudInitFlavour
from labbuilder.common.quoting import FILTERS, eni
from labbuilder.common.resources import data_dir
from labbuilder.lab.view import plan_as_dict
from labbuilder.libvirtxml.render import Disk, Domain, Nic, Serial, domain_xml, render_xml
from labbuilder.model.addressing import netmask
from labbuilder.model.lab import Plan, PlannedNetwork, PlannedNode


@dataclass(frozen=True)
class DiskAttachment:
    """A storage volume attached to a domain as a virtio disk."""

    device: str  # "vda"
    pool: str
    volume: str
    format: str  # "qcow2" or "raw"
    readonly: bool = False


@dataclass(frozen=True)
class BootSpec:
    """Direct kernel boot (paths on the libvirt host), or None fields to boot from the disk."""

    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None


@dataclass(frozen=True)
class SeedInput:
    """What a node's seed needs beyond the plan: its login and the lab's package settings."""

    user: str
    password_hash: str  # crypt(3) SHA-512 of the console password; never the password itself
    ssh_public_key: str
    apt_proxy: str | None = None
    host_keys: Mapping[str, tuple[str, str]] = field(default_factory=dict)  # node -> keys


def plan_hash(plan: Plan) -> str:
    """A short fingerprint of a plan: tells whether a running lab still matches its file."""
    blob = json.dumps(plan_as_dict(plan), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@cache
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FunctionLoader(lambda name: (data_dir("cloud-init") / name).read_text()),
        autoescape=False,  # noqa: S701 - YAML and files for the guest: each value has its filter
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    env.filters.update(FILTERS)  # yaml, aptconf, ...: one filter per destination
    return env


def _render(name: str, **values: object) -> str:
    return _environment().get_template(name).render(**values)


def render_network_xml(plan: Plan, net: PlannedNetwork, digest: str) -> str:
    """A lab network. An isolated lab's networks are bare bridges: their gateways live in the
    lab's namespace (``plan.gateway``), so libvirt gives them no host address and no NAT."""
    kind = "isolated" if plan.gateway is not None else str(net.kind)
    return render_xml(f"networks/{kind}.xml.j2", net=net, lab=plan.lab, plan_hash=digest)


def render_domain_xml(
    plan: Plan,
    node: PlannedNode,
    *,
    digest: str,
    domain_type: str,
    cpu_passthrough: bool,
    disks: tuple[DiskAttachment, ...],
    boot: BootSpec,
    console_log: str | None,
) -> str:
    """A lab node's domain: its disks (the seed last, read-only), its NICs in the plan's order,
    the console on serial port 0, logged to ``console_log`` across boots."""
    domain = Domain(
        type=domain_type,
        name=node.domain,
        memory=node.memory,
        memory_unit="b",
        vcpus=node.vcpus,
        metadata=(
            ("name", plan.lab),
            ("node", node.name),
            ("role", str(node.role)),
            ("plan", digest),
        ),
        kernel=boot.kernel or None,
        initrd=boot.initrd if boot.kernel else None,
        cmdline=boot.cmdline if boot.kernel else None,
        cpu_passthrough=cpu_passthrough,
        disks=tuple(
            Disk(
                disk.device,
                disk.format,
                pool=disk.pool,
                volume=disk.volume,
                readonly=disk.readonly,
                discard=not disk.readonly,
            )
            for disk in disks
        ),
        nics=tuple(Nic(plan.network(nic.network).libvirt_name, nic.mac) for nic in node.nics),
        serials=(Serial(0, log=console_log),),
    )
    return domain_xml(domain)


def render_seed_files(
    plan: Plan, node: PlannedNode, *, digest: str, seed: SeedInput, flavour: CloudInitFlavour
) -> dict[str, bytes]:
    """The NoCloud seed of one node: user-data, meta-data and its network configuration.

    Both network forms are written: ``network-config`` (v2) for current cloud-init, and
    ``network-interfaces`` (ENI) for Ubuntu 14.04's cloud-init 0.7.5, which also finds it in
    meta-data when the image's flavour is ENI.
    """
    management = plan.network(node.nics[0].network)
    values = {
        "node": node,
        "hosts": plan.hosts,
        "hosts_file": "".join(
            f"{eni(address)} {eni(name)}\n"
            for address, name in (("127.0.0.1", "localhost"), *plan.hosts)
        ),
        "user": seed.user,
        "password_hash": seed.password_hash,
        "ssh_public_key": seed.ssh_public_key,
        "apt_proxy": seed.apt_proxy,
        "host_key": seed.host_keys.get(node.name),
        # cloud-init 0.7.5 (Ubuntu 14.04) knows neither ed25519 host keys nor our module lists.
        "lean": flavour != CloudInitFlavour.ENI,
        "nameserver": management.gateway,
        "instance_id": f"{plan.lab}-{node.name}-{digest}",
        "netmask": netmask,
    }
    interfaces = _render("network-interfaces.j2", **values)
    meta = _render("meta-data.j2", **values)
    if flavour == CloudInitFlavour.ENI:
        meta += "network-interfaces: " + json.dumps(interfaces) + "\n"
    files = {
        "user-data": _render("user-data.j2", **values),
        "meta-data": meta,
        "network-config": _render("network-config.j2", **values),
        "network-interfaces": interfaces,
    }
    return {name: text.encode() for name, text in files.items()}
