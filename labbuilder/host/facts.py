"""Gather ``HostFacts`` from this host: routes, libvirt networks, addresses the host needs,
CPUs, memory and disk. The only place the planner's inputs touch the outside world.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import netaddr

from labbuilder.adapters import libvirt as lv
from labbuilder.common.errors import HypervisorError
from labbuilder.common.paths import pool_dir, pool_name
from labbuilder.model.lab import HostFacts, HostRoute, Lab, LabUse, LibvirtNetworkFact

APT_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))
KSM = Path("/sys/kernel/mm/ksm")


@dataclass(frozen=True)
class GatheredFacts:
    facts: HostFacts
    notes: tuple[str, ...]  # what could not be looked at, and so was not checked


def gather_host_facts(lab: Lab, storage: Path) -> GatheredFacts:
    notes: list[str] = []
    networks: tuple[LibvirtNetworkFact, ...] = ()
    macs: tuple[tuple[str, str], ...] = ()
    held = 0  # memory the lab's own running nodes hold: `up` on a running lab needs no more
    uses: tuple[LabUse, ...] = ()
    try:
        hypervisor = lv.LibvirtHypervisor.open(lab.libvirt_uri, readonly=True)
    except HypervisorError as err:
        notes.append(f"{err.message}: existing libvirt networks and MACs were not checked")
    else:
        with hypervisor:
            networks, macs = hypervisor.network_facts(), hypervisor.used_macs()
            held = hypervisor.running_memory(lab.name)
            uses = hypervisor.lab_uses(pool_name(), str(pool_dir()))
    available = read_memory_available()
    return GatheredFacts(
        HostFacts(
            routes=read_routes(),
            libvirt_networks=networks,
            protected_addresses=protected_addresses(lab, notes),
            used_macs=macs,
            cpus=os.cpu_count(),
            memory_available=None if available is None else available + held,
            disk_free=shutil.disk_usage(existing_parent(storage)).free,
            memory_total=read_memory_total(),
            labs=tuple(use for use in uses if use.lab != lab.name),
            ksm=ksm_running(),
        ),
        tuple(notes),
    )


def read_routes(path: Path = Path("/proc/net/route")) -> tuple[HostRoute, ...]:
    """IPv4 routes from the kernel's table (hex, little-endian, one route per line)."""
    routes = []
    for line in path.read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8:
            continue
        destination = socket.inet_ntoa(int(fields[1], 16).to_bytes(4, "little"))
        mask = socket.inet_ntoa(int(fields[7], 16).to_bytes(4, "little"))
        cidr = str(netaddr.IPNetwork(f"{destination}/{mask}").cidr)
        routes.append(HostRoute(cidr, fields[0]))
    return tuple(routes)


def read_memory_available(path: Path = Path("/proc/meminfo")) -> int | None:
    match = re.search(r"^MemAvailable:\s+(\d+) kB", path.read_text(), re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def read_memory_total(path: Path = Path("/proc/meminfo")) -> int | None:
    match = re.search(r"^MemTotal:\s+(\d+) kB", path.read_text(), re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def ksm_running(path: Path = KSM / "run") -> bool:
    """Whether the kernel's same-page merging runs (``1``; ``0`` stopped, ``2`` unmerging)."""
    try:
        return path.read_text().strip() == "1"
    except OSError:
        return False  # no KSM in this kernel


def existing_parent(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def apt_source_hosts(locations: Iterable[Path] = APT_SOURCES) -> list[str]:
    """Host names of the host's own package sources (one-line and deb822 formats)."""
    hosts = []
    files = []
    for location in locations:
        if location.is_dir():
            files += sorted(p for p in location.iterdir() if p.suffix in (".list", ".sources"))
        elif location.is_file():
            files.append(location)
    for file in files:
        for line in file.read_text(errors="replace").splitlines():
            line = line.split("#", 1)[0]
            for url in re.findall(r"\b(?:https?|ftp)://[^\s\]]+", line):
                host = urlsplit(url).hostname
                if host and host not in hosts:
                    hosts.append(host)
    return hosts


def nameservers(path: Path = Path("/etc/resolv.conf")) -> list[str]:
    if not path.exists():
        return []
    return re.findall(r"^\s*nameserver\s+(\d+\.\d+\.\d+\.\d+)", path.read_text(), re.MULTILINE)


def protected_addresses(lab: Lab, notes: list[str]) -> tuple[tuple[str, str], ...]:
    """Addresses the host (or the lab's guests) must keep reaching outside the lab."""
    wanted = [(f"the apt source {host}", host) for host in apt_source_hosts()]
    for key, url in (("apt_mirror", lab.options.apt_mirror), ("apt_proxy", lab.options.apt_proxy)):
        host = urlsplit(url).hostname if url else None
        if host:
            wanted.append((f"options.{key} ({host})", host))
    found = [(f"the host's DNS server {server}", server) for server in nameservers()]
    for what, host in wanted:
        try:
            infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
        except OSError:
            notes.append(f"could not resolve {host}: its addresses were not checked")
            continue
        for address in sorted({str(info[4][0]) for info in infos}):
            found.append((what, address))
    return tuple(dict.fromkeys(found))
