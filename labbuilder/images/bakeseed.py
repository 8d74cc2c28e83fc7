"""What a role-image bake hands the guest and reads back: pure functions; the files it writes
into the guest are data files under ``images/bake/`` (``bake_file``), its XML comes from
``labbuilder.libvirtxml``.

A bake boots a downloaded image once under libvirt (``labbuilder.images.rolebake``). Its
NoCloud seed (``seed_files``) carries a cloud-config that writes three shell scripts to
``/run/lbbake`` and a runtime unit, then runs ``main.sh`` from ``runcmd``:

* ``main.sh`` masks the role's units (before anything is installed, so they never start),
  installs the packages with ``apt-get`` while a ``policy-rc.d`` keeps every service from
  starting, and reports each installed package's version (``dpkg-query -W``);
* when it exits, for whatever reason, it starts ``lbbake-finish.service``, which is ordered
  after ``cloud-final.service``: so ``finish.sh`` runs only once cloud-init has written all its
  state, removes the per-machine identity (``cloud-init clean --logs``, SSH host keys,
  machine-id, the RabbitMQ Erlang cookie, the hostname, the bake's network configuration,
  apt's lists, the journal), trims the disk and powers the guest off. cloud-init's own
  ``power_state`` is not used: cloud-init writes its state after ``runcmd``, so a clean made
  from inside cloud-init would be undone at once.

The scripts report on a second serial port (``/dev/ttyS1``; the console if there is none) in
lines ``LBBAKE <WORD> <text>``; ``parse_report`` reads them back from libvirt's log of that
port. The console (``ttyS0``) stays free for the guest's own messages, so a report line is never
broken up by a kernel or systemd message.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from labbuilder.catalog.model import CloudInitFlavour
from labbuilder.common.errors import ImageError
from labbuilder.common.resources import data_dir
from labbuilder.libvirtxml import render as libvirtxml

BAKE_VERSION = "1"  # bump when a bake changes in a way bake_key cannot see
PREFIX = "lbbake-"  # every temporary libvirt object of a bake: domain, network, volumes, rules
SCRIPT_DIR = "/run/lbbake"
FINISH_UNIT = "lbbake-finish.service"
GUEST_ADDRESS = 10  # the guest's host number in the bake's /24; the gateway is .1
MEMORY_MIB = 1024
REPORT_WORD = "LBBAKE"
BAKE_FOLDER = ("bake",)  # under images/: the files a bake writes into the guest

_UNIT = re.compile(r"^[A-Za-z0-9@._:-]+\.(service|socket|timer|path|target|mount)$")
_PACKAGE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
_ROLE = re.compile(r"^[a-z][a-z0-9-]{0,31}$")

# The files a bake writes into the guest: data files under images/bake/, written as they are
# (main.sh after two lines naming its packages and units).
BAKE_FILES = ("common.sh", "main.sh", "finish.sh", "check-main.sh", "check-finish.sh", FINISH_UNIT)


@cache
def bake_file(name: str) -> str:
    """The text of the bake's data file ``name`` (one of ``BAKE_FILES``)."""
    if name not in BAKE_FILES:
        raise ValueError(f"unknown bake file {name!r}; expected one of {BAKE_FILES}")
    path = data_dir("images").joinpath(*BAKE_FOLDER, name)
    try:
        return path.read_text()
    except OSError as err:
        raise ImageError(
            f"labbuilder's data file {path} cannot be read: {err.strerror}",
            hint="reinstall labbuilder",
        ) from None


@dataclass(frozen=True)
class BakeNetwork:
    """The bake's temporary NAT network: a free /24, and the archive hosts it may reach."""

    name: str
    bridge: str
    subnet: str  # "10.x.y.0/24"
    archive: tuple[tuple[str, str], ...]  # (host name, IPv4 address) the guest may reach

    @property
    def gateway(self) -> str:
        return str(ipaddress.ip_network(self.subnet)[1])

    @property
    def guest_address(self) -> str:
        return str(ipaddress.ip_network(self.subnet)[GUEST_ADDRESS])

    @property
    def prefix(self) -> int:
        return ipaddress.ip_network(self.subnet).prefixlen


@dataclass(frozen=True)
class GuestBoot:
    """How the bake guest boots: its disk's boot loader, or direct kernel boot."""

    kernel: str | None = None  # paths on the libvirt host
    initrd: str | None = None
    cmdline: str | None = None


@dataclass(frozen=True)
class Report:
    """What the guest's scripts reported, parsed from the report port's log."""

    begun: bool = False
    installed: bool = False  # main.sh got to its end
    done: bool = False  # finish.sh got to its end
    os: str | None = None
    arch: str | None = None
    steps: tuple[str, ...] = ()
    packages: dict[str, str] = field(default_factory=dict)
    masked: dict[str, str] = field(default_factory=dict)  # unit -> `systemctl is-enabled`
    failures: tuple[str, ...] = ()
    logs: tuple[str, ...] = ()
    left: tuple[str, ...] = ()  # identity files still present after the clean-up
    hostname: str | None = None
    output: tuple[str, ...] = ()  # a check script's output lines


# --- inputs ---------------------------------------------------------------------------------


def input_problem(role: str, packages: Sequence[str], masked_units: Sequence[str]) -> str | None:
    """What is wrong with a bake's inputs (they end up in shell scripts), or None."""
    if not _ROLE.match(role):
        return f"role {role!r} is not a lower-case name like 'controller'"
    for package in packages:
        if not _PACKAGE.match(package):
            return f"{package!r} is not a Debian package name"
    for unit in masked_units:
        if not _UNIT.match(unit):
            return f"{unit!r} is not a systemd unit name (name it in full, e.g. 'keystone.service')"
    return None


def bake_key(
    base_digest: str,
    packages: Sequence[str],
    masked_units: Sequence[str],
    *,
    virtual_size: int,
    boot: GuestBoot,
) -> str:
    """The hex sha256 naming a bake: its base, packages, masked units, size, how it boots, the
    guest-side scripts and ``BAKE_VERSION``. Equal keys mean the same image."""
    doc = {
        "bake_version": BAKE_VERSION,
        "base": base_digest,
        "packages": sorted(set(packages)),
        "masked_units": sorted(set(masked_units)),
        "virtual_size": virtual_size,
        "cmdline": boot.cmdline,
        "scripts": [bake_file(name) for name in ("common.sh", "main.sh", "finish.sh", FINISH_UNIT)],
    }
    blob = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def guest_mac(key: str) -> str:
    return "52:54:00:" + ":".join(key[i : i + 2] for i in (0, 2, 4))


# --- the seed -------------------------------------------------------------------------------


def bake_seed_files(
    *,
    instance_id: str,
    network: BakeNetwork,
    mac: str,
    flavour: CloudInitFlavour,
    packages: Sequence[str],
    masked_units: Sequence[str],
) -> dict[str, bytes]:
    """The NoCloud seed of a bake: install ``packages``, mask ``masked_units``, clean, power off."""
    words = (
        f"packages={shlex.quote(' '.join(sorted(set(packages))))}\n"
        f"units={shlex.quote(' '.join(sorted(set(masked_units))))}\n"
    )
    scripts = {"main.sh": words + bake_file("main.sh"), "finish.sh": bake_file("finish.sh")}
    config = {"ssh_genkeytypes": [], "ssh_deletekeys": True}
    return _seed(instance_id, network, mac, flavour, scripts, config)


def check_seed_files(
    *, instance_id: str, network: BakeNetwork, mac: str, flavour: CloudInitFlavour, script: str
) -> dict[str, bytes]:
    """The seed of a check boot: run ``script`` as a fresh clone would, report its output."""
    scripts = {
        "main.sh": bake_file("check-main.sh"),
        "check.sh": script,
        "finish.sh": bake_file("check-finish.sh"),
    }
    return _seed(instance_id, network, mac, flavour, scripts, {})


def _seed(
    instance_id: str,
    network: BakeNetwork,
    mac: str,
    flavour: CloudInitFlavour,
    scripts: Mapping[str, str],
    extra: Mapping[str, object],
) -> dict[str, bytes]:
    common = bake_file("common.sh")
    files = [{"path": f"{SCRIPT_DIR}/common.sh", "permissions": "0644", "content": common}]
    files += [
        {"path": f"{SCRIPT_DIR}/{name}", "permissions": "0644", "content": text}
        for name, text in scripts.items()
    ]
    files.append(
        {
            "path": f"/run/systemd/system/{FINISH_UNIT}",
            "permissions": "0644",
            "content": bake_file(FINISH_UNIT),
        }
    )
    config = {
        "users": [],  # no default user in the image: each lab's seed makes its own
        "preserve_hostname": False,
        "package_update": False,
        "package_upgrade": False,
        **extra,
        "write_files": files,
        "runcmd": [["sh", f"{SCRIPT_DIR}/main.sh"]],
    }
    # JSON is YAML: every value is quoted exactly, whatever it holds.
    user_data = "#cloud-config\n" + json.dumps(config, indent=1) + "\n"
    interfaces = (
        "auto lo\niface lo inet loopback\n\n"
        f"auto eth0\niface eth0 inet static\n  address {network.guest_address}\n"
        f"  netmask {ipaddress.ip_network(network.subnet).netmask}\n"
        f"  gateway {network.gateway}\n  dns-nameservers {network.gateway}\n"
    )
    meta = f"instance-id: {instance_id}\nlocal-hostname: localhost\n"
    if flavour == CloudInitFlavour.ENI:
        meta += "network-interfaces: " + json.dumps(interfaces) + "\n"
    network_config = {
        "version": 2,
        "ethernets": {
            "eth0": {
                "match": {"macaddress": mac},
                "set-name": "eth0",
                "addresses": [f"{network.guest_address}/{network.prefix}"],
                "routes": [{"to": "0.0.0.0/0", "via": network.gateway}],
                "nameservers": {"addresses": [network.gateway]},
            }
        },
    }
    files_out = {
        "user-data": user_data,
        "meta-data": meta,
        "network-config": json.dumps(network_config, indent=1) + "\n",
        "network-interfaces": interfaces,
    }
    return {name: text.encode() for name, text in files_out.items()}


# --- libvirt XML ----------------------------------------------------------------------------


def network_xml(network: BakeNetwork) -> str:
    """A NAT network whose DNS answers the archive's names with the addresses the firewall lets
    through (so a CDN's rotating answers cannot send the guest elsewhere)."""
    by_address: dict[str, set[str]] = {}
    for host, address in network.archive:
        by_address.setdefault(address, set()).add(host)
    return libvirtxml.render_xml(
        "bake-network.xml.j2",
        name=network.name,
        bridge=network.bridge,
        hosts=[(address, sorted(hosts)) for address, hosts in sorted(by_address.items())],
        gateway=network.gateway,
        netmask=str(ipaddress.ip_network(network.subnet).netmask),
    )


def domain_xml(
    *,
    name: str,
    role: str,
    domain_type: str,
    boot: GuestBoot,
    pool: str,
    disk_volume: str,
    seed_volume: str,
    network: str,
    mac: str,
    console_log: Path,
    report_log: Path,
) -> str:
    """One 1-vCPU guest: the overlay (vda) and the seed (vdb) as virtio disks, one NIC, the
    console on serial port 0 and the report on serial port 1, both logged by libvirt."""
    domain = libvirtxml.Domain(
        type=domain_type,
        name=name,
        memory=MEMORY_MIB,
        memory_unit="MiB",
        metadata=(("name", name), ("node", "bake"), ("role", role)),
        kernel=boot.kernel,
        initrd=None if boot.kernel is None else boot.initrd or "",
        cmdline=None if boot.kernel is None else boot.cmdline or "",
        disks=(
            libvirtxml.Disk("vda", "qcow2", pool=pool, volume=disk_volume, discard=True),
            libvirtxml.Disk("vdb", "raw", pool=pool, volume=seed_volume, readonly=True),
        ),
        nics=(libvirtxml.Nic(network, mac),),
        serials=(
            libvirtxml.Serial(0, log=str(console_log), append=False),
            libvirtxml.Serial(1, log=str(report_log), append=False),
        ),
    )
    return libvirtxml.domain_xml(domain)


# --- the report -----------------------------------------------------------------------------


def parse_report(text: str) -> Report:
    """Read ``LBBAKE <WORD> <text>`` lines (anything else, and carriage returns, are ignored)."""
    steps: list[str] = []
    failures: list[str] = []
    logs: list[str] = []
    left: list[str] = []
    output: list[str] = []
    packages: dict[str, str] = {}
    masked: dict[str, str] = {}
    flags = {"BEGIN": False, "INSTALLED": False, "DONE": False}
    facts: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.replace("\r", "")
        start = line.find(REPORT_WORD + " ")
        if start < 0:
            continue
        word, _, rest = line[start + len(REPORT_WORD) + 1 :].partition(" ")
        if word in flags:
            flags[word] = True
        elif word == "STEP":
            steps.append(rest)
        elif word == "FAIL":
            failures.append(rest)
        elif word == "LOG":
            logs.append(rest)
        elif word == "LEFT":
            left.append(rest)
        elif word == "OUT":
            output.append(rest)
        elif word == "PKG":
            package, _, version = rest.partition(" ")
            if package and version:
                packages[package] = version
        elif word == "MASKED":
            unit, _, state = rest.partition(" ")
            masked[unit] = state.strip()
        elif word in ("OS", "ARCH", "HOSTNAME"):
            facts[word] = rest
    return Report(
        begun=flags["BEGIN"],
        installed=flags["INSTALLED"],
        done=flags["DONE"],
        os=facts.get("OS"),
        arch=facts.get("ARCH"),
        steps=tuple(steps),
        packages=packages,
        masked=masked,
        failures=tuple(failures),
        logs=tuple(logs),
        left=tuple(left),
        hostname=facts.get("HOSTNAME"),
        output=tuple(output),
    )
