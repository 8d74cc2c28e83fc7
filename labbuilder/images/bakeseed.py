"""What a role-image bake hands the guest and reads back: pure functions, no I/O.

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
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from labbuilder.adapters.libvirt import METADATA_NS
from labbuilder.catalog.model import CloudInitFlavour

BAKE_VERSION = "1"  # bump when a bake changes in a way bake_key cannot see
PREFIX = "lbbake-"  # every temporary libvirt object of a bake: domain, network, volumes, rules
SCRIPT_DIR = "/run/lbbake"
FINISH_UNIT = "lbbake-finish.service"
GUEST_ADDRESS = 10  # the guest's host number in the bake's /24; the gateway is .1
MEMORY_MIB = 1024
REPORT_WORD = "LBBAKE"

_UNIT = re.compile(r"^[A-Za-z0-9@._:-]+\.(service|socket|timer|path|target|mount)$")
_PACKAGE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
_ROLE = re.compile(r"^[a-z][a-z0-9-]{0,31}$")

COMMON_SH = """\
# labbuilder bake: report lines go to the second serial port, which only the bake writes to.
LBBAKE_REPORT=/dev/ttyS1
( : > "$LBBAKE_REPORT" ) 2>/dev/null || LBBAKE_REPORT=/dev/console
report() { printf 'LBBAKE %s\\n' "$*" > "$LBBAKE_REPORT"; }
say() { report "$@"; printf 'lbbake: %s\\n' "$*"; }
# Runs apt-get with its output on the console as it comes (a sign of life for the host) and
# in /run/lbbake/apt.log; returns apt-get's exit code.
run_apt() {
    {
        apt-get -q -y -o DPkg::Lock::Timeout=600 -o Dpkg::Use-Pty=0 "$@"
        echo $? > /run/lbbake/rc
    } 2>&1 | tee /run/lbbake/apt.log
    return "$(cat /run/lbbake/rc)"
}
report_apt_errors() {
    grep -E '^(E|Err):' /run/lbbake/apt.log | tail -n 5 | while IFS= read -r line; do
        report "LOG $line"
    done
}
"""

BAKE_MAIN_SH = """\
. /run/lbbake/common.sh
trap 'systemctl daemon-reload; systemctl start --no-block lbbake-finish.service || poweroff' EXIT
say BEGIN
. /etc/os-release 2>/dev/null && report "OS $PRETTY_NAME"
report "ARCH $(dpkg --print-architecture)"
if ! command -v systemctl >/dev/null 2>&1; then
    say "FAIL the guest has no systemd (systemctl), which a bake needs"
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
if [ -n "$units" ]; then
    say STEP "systemctl mask $units"
    systemctl mask $units || { say "FAIL systemctl mask $units failed"; exit 1; }
fi
if [ -n "$packages" ]; then
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\\nexit 101\\n' > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        policy=created
    fi
    say STEP "apt-get update"
    if ! run_apt update; then
        report_apt_errors
        say "FAIL apt-get update failed"
        exit 1
    fi
    say STEP "apt-get install $packages"
    if ! run_apt install $packages; then
        report_apt_errors
        missing=""
        for package in $packages; do
            apt-cache show --no-all-versions "$package" > /dev/null 2>&1 \\
                || missing="$missing $package"
        done
        if [ -n "$missing" ]; then
            say "FAIL packages not in the guest's archive:$missing"
        else
            say "FAIL apt-get install $packages failed"
        fi
        exit 1
    fi
    [ "${policy:-}" = created ] && rm -f /usr/sbin/policy-rc.d
fi
dpkg-query -W -f='${db:Status-Abbrev} ${Package} ${Version}\\n' |
    while read -r status package version; do
        case "$status" in ?i) report "PKG $package $version" ;; esac
    done
for unit in $units; do
    report "MASKED $unit $(systemctl is-enabled "$unit" 2>/dev/null)"
done
say INSTALLED
"""

BAKE_FINISH_SH = """\
. /run/lbbake/common.sh
say STEP "removing per-machine identity"
cloud-init clean --logs || report "LOG cloud-init clean failed"
rm -f /etc/ssh/ssh_host_* /var/lib/dbus/machine-id /var/lib/rabbitmq/.erlang.cookie \\
    /var/lib/systemd/random-seed /var/lib/systemd/credential.secret /var/lib/dhcp/*.leases
rm -f /etc/systemd/network/10-cloud-init-*.network /etc/netplan/50-cloud-init.yaml \\
    /etc/network/interfaces.d/50-cloud-init /etc/network/interfaces.d/50-cloud-init.cfg
: > /etc/machine-id
echo localhost > /etc/hostname
apt-get clean
rm -rf /var/lib/apt/lists/*
journalctl --relinquish-var 2>/dev/null  # journald lets go of /var/log/journal's files
find /var/log/journal -mindepth 1 -delete 2>/dev/null
for path in /etc/ssh/ssh_host_* /var/lib/dbus/machine-id /var/lib/rabbitmq/.erlang.cookie \\
        /var/lib/cloud/instance /var/lib/cloud/instances/* /var/log/cloud-init.log; do
    [ -e "$path" ] && report "LEFT $path"
done
[ -s /etc/machine-id ] && report "LEFT /etc/machine-id"
report "HOSTNAME $(cat /etc/hostname)"
# Freed blocks can be discarded only once the file system has committed their release.
sync
report "LOG $(fstrim -av 2>&1 | tr '\n' ' ')"
sync
say DONE
systemctl --no-block poweroff
"""

CHECK_MAIN_SH = """\
. /run/lbbake/common.sh
trap 'systemctl daemon-reload; systemctl start --no-block lbbake-finish.service || poweroff' EXIT
say BEGIN
sh /run/lbbake/check.sh 2>&1 | while IFS= read -r line; do report "OUT $line"; done
say INSTALLED
"""

CHECK_FINISH_SH = """\
. /run/lbbake/common.sh
say DONE
systemctl --no-block poweroff
"""

FINISH_UNIT_TEXT = """\
[Unit]
Description=labbuilder bake: clean up and power off once cloud-init is done
After=cloud-final.service

[Service]
Type=oneshot
ExecStart=/bin/sh /run/lbbake/finish.sh
StandardOutput=journal+console
TimeoutStartSec=1800
"""


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
        "scripts": [COMMON_SH, BAKE_MAIN_SH, BAKE_FINISH_SH, FINISH_UNIT_TEXT],
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
    scripts = {"main.sh": words + BAKE_MAIN_SH, "finish.sh": BAKE_FINISH_SH}
    config = {"ssh_genkeytypes": [], "ssh_deletekeys": True}
    return _seed(instance_id, network, mac, flavour, scripts, config)


def check_seed_files(
    *, instance_id: str, network: BakeNetwork, mac: str, flavour: CloudInitFlavour, script: str
) -> dict[str, bytes]:
    """The seed of a check boot: run ``script`` as a fresh clone would, report its output."""
    scripts = {"main.sh": CHECK_MAIN_SH, "check.sh": script, "finish.sh": CHECK_FINISH_SH}
    return _seed(instance_id, network, mac, flavour, scripts, {})


def _seed(
    instance_id: str,
    network: BakeNetwork,
    mac: str,
    flavour: CloudInitFlavour,
    scripts: Mapping[str, str],
    extra: Mapping[str, object],
) -> dict[str, bytes]:
    files = [{"path": f"{SCRIPT_DIR}/common.sh", "permissions": "0644", "content": COMMON_SH}]
    files += [
        {"path": f"{SCRIPT_DIR}/{name}", "permissions": "0644", "content": text}
        for name, text in scripts.items()
    ]
    files.append(
        {
            "path": f"/run/systemd/system/{FINISH_UNIT}",
            "permissions": "0644",
            "content": FINISH_UNIT_TEXT,
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


def _metadata(parent: ET.Element, owner: str, **attributes: str) -> None:
    metadata = ET.SubElement(parent, "metadata")
    ET.register_namespace("lb", METADATA_NS)
    ET.SubElement(metadata, f"{{{METADATA_NS}}}lab", {"name": owner, **attributes})


def network_xml(network: BakeNetwork) -> str:
    """A NAT network whose DNS answers the archive's names with the addresses the firewall lets
    through (so a CDN's rotating answers cannot send the guest elsewhere)."""
    root = ET.Element("network")
    ET.SubElement(root, "name").text = network.name
    _metadata(root, network.name, network="bake")
    ET.SubElement(root, "forward", mode="nat")
    ET.SubElement(root, "bridge", name=network.bridge, stp="off", delay="0")
    if network.archive:
        dns = ET.SubElement(root, "dns")
        by_address: dict[str, list[str]] = {}
        for host, address in network.archive:
            by_address.setdefault(address, []).append(host)
        for address, hosts in sorted(by_address.items()):
            entry = ET.SubElement(dns, "host", ip=address)
            for host in sorted(set(hosts)):
                ET.SubElement(entry, "hostname").text = host
    netmask = str(ipaddress.ip_network(network.subnet).netmask)
    ET.SubElement(root, "ip", address=network.gateway, netmask=netmask)
    return ET.tostring(root, encoding="unicode")


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
    root = ET.Element("domain", type=domain_type)
    ET.SubElement(root, "name").text = name
    _metadata(root, name, node="bake", role=role)
    ET.SubElement(root, "memory", unit="MiB").text = str(MEMORY_MIB)
    ET.SubElement(root, "vcpu").text = "1"
    os_element = ET.SubElement(root, "os")
    ET.SubElement(os_element, "type", arch="x86_64", machine="pc").text = "hvm"
    if boot.kernel is not None:
        ET.SubElement(os_element, "kernel").text = boot.kernel
        ET.SubElement(os_element, "initrd").text = boot.initrd or ""
        ET.SubElement(os_element, "cmdline").text = boot.cmdline or ""
    else:
        ET.SubElement(os_element, "boot", dev="hd")
    features = ET.SubElement(root, "features")
    ET.SubElement(features, "acpi")
    ET.SubElement(features, "apic")
    ET.SubElement(root, "clock", offset="utc")
    ET.SubElement(root, "on_poweroff").text = "destroy"
    ET.SubElement(root, "on_reboot").text = "restart"
    ET.SubElement(root, "on_crash").text = "destroy"
    devices = ET.SubElement(root, "devices")
    for device, volume, fmt, readonly in (
        ("vda", disk_volume, "qcow2", False),
        ("vdb", seed_volume, "raw", True),
    ):
        disk = ET.SubElement(devices, "disk", type="volume", device="disk")
        driver = ET.SubElement(disk, "driver", name="qemu", type=fmt)
        if not readonly:
            driver.set("discard", "unmap")
        ET.SubElement(disk, "source", pool=pool, volume=volume)
        ET.SubElement(disk, "target", dev=device, bus="virtio")
        if readonly:
            ET.SubElement(disk, "readonly")
    nic = ET.SubElement(devices, "interface", type="network")
    ET.SubElement(nic, "source", network=network)
    ET.SubElement(nic, "mac", address=mac)
    ET.SubElement(nic, "model", type="virtio")
    for port, log in ((0, console_log), (1, report_log)):
        serial = ET.SubElement(devices, "serial", type="pty")
        ET.SubElement(serial, "log", file=str(log), append="off")
        ET.SubElement(serial, "target", port=str(port))
    console = ET.SubElement(devices, "console", type="pty")
    ET.SubElement(console, "target", type="serial", port="0")
    rng = ET.SubElement(devices, "rng", model="virtio")
    ET.SubElement(rng, "backend", model="random").text = "/dev/urandom"
    ET.SubElement(devices, "memballoon", model="none")
    return ET.tostring(root, encoding="unicode")


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
