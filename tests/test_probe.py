"""The host probe behind `labbuilder doctor`: the decision, the findings' words, the readers of
fabricated /proc and /sys files, the nested-virtualization refusals, and (integration) probe
guests booted by the real libvirtd: the boot sector, and a built image's Linux kernel (from
the shared test image cache, ``$LABBUILDER_TEST_CACHE`` or /var/cache/labbuilder-test, which
test_imagebuild fills)."""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import libvirt
import pytest
from lablib import TEST_CACHE
from rich.console import Console

from labbuilder.adapters import hostprobe, probeguest
from labbuilder.adapters import libvirt as lv
from labbuilder.common.errors import HostError
from labbuilder.common.paths import default_cache_dir
from labbuilder.host.probe import (
    Acceleration,
    AccelerationFacts,
    BootResult,
    DomainType,
    HostProbeFacts,
    LabNeed,
    Proof,
    Resolved,
    Status,
    VirtType,
    decide,
    find_probe_kernel,
    probe_from_facts,
    probe_host,
    render_findings,
)
from labbuilder.model.lab import HostRoute, LibvirtNetworkFact
from labbuilder.model.probe import DevKvm, NestedFacts

GiB = 1024**3
URI = "qemu:///system"

# --- decide ---------------------------------------------------------------------------------


@pytest.mark.parametrize("nested", [True, False, None])
def test_no_working_kvm_means_tcg_whatever_nesting_says(nested: bool | None) -> None:
    decision = decide(AccelerationFacts(kvm_guest_ran=False, nested=nested))
    assert decision == (Acceleration.TCG, VirtType.QEMU, False, DomainType.QEMU)


def test_working_kvm_that_nests_gives_kvm_everywhere_and_host_passthrough() -> None:
    decision = decide(AccelerationFacts(kvm_guest_ran=True, nested=True))
    assert decision == (Acceleration.KVM, VirtType.KVM, True, DomainType.KVM)
    assert decision.cpu_passthrough and decision.domain_type == "kvm"


@pytest.mark.parametrize("nested", [False, None])
def test_working_kvm_without_nesting_gives_kvm_domains_but_qemu_compute(
    nested: bool | None,
) -> None:
    decision = decide(AccelerationFacts(kvm_guest_ran=True, nested=nested))
    assert decision == (Acceleration.KVM, VirtType.QEMU, False, DomainType.KVM)


# --- findings -------------------------------------------------------------------------------

KVM_RAN = BootResult("kvm", True, "printed LBPROBE-OK 0.2 s after start", 0.4, 0.2)
KERNEL = "/var/cache/labbuilder/built/debian-12-0123456789abcdef/vmlinuz"
LINUX_RAN = BootResult(
    "kvm",
    True,
    f'booted Linux 6.1.0-50-cloud-amd64 ({KERNEL}) to mounting its root file system ("VFS: '
    'Cannot open root device") 1.4 s after start',
    0.4,
    1.4,
    Proof.LINUX,
)
LINUX_PAUSED = BootResult(
    "kvm",
    False,
    f"Linux 6.1.0-50-cloud-amd64 ({KERNEL}) did not get to mounting its root file system: the "
    "guest was paused (reason unknown: QEMU stopped it, e.g. on a KVM error) 0.9 s after start; "
    'its last line on the serial port: "smpboot: CPU0: Intel Xeon Processor" (QEMU\'s log: KVM '
    "internal error. Suberror: 1 emulation failure)",
    0.4,
    0.9,
    Proof.LINUX,
)
KVM_DENIED = BootResult(
    "kvm",
    False,
    "libvirt could not start a guest with domain type kvm: internal error: qemu unexpectedly "
    "closed the monitor: Could not access KVM kernel module: Permission denied",
    1.0,
    0.0,
)
INTEL_NESTED = NestedFacts("vmx", "kvm_intel", "Y")
INTEL_NOT_NESTED = NestedFacts("vmx", "kvm_intel", "N")
KVM_OPEN = DevKvm(True, 0o660, "root", "kvm")
KVM_ROOT_ONLY = DevKvm(True, 0o600, "root", "root")
LABS = (
    LabNeed("guide-2node-legacy", 4 * GiB, 15 * GiB, 2, 1),
    LabNeed("guide-3node", 4 * GiB + GiB // 2, 20 * GiB, 3, 1),
)


def facts(**changes: Any) -> HostProbeFacts:
    """A healthy KVM host with nesting, plenty of room and no clashes; ``changes`` on top."""
    base = HostProbeFacts(
        uri=URI,
        libvirt_version="9.0.0",
        qemu_version="7.2.0",
        dev_kvm=KVM_OPEN,
        kvm_boot=KVM_RAN,
        kvm_linux=LINUX_RAN,
        kvm_modules=("kvm", "kvm_intel"),
        nested=INTEL_NESTED,
        cpus=8,
        memory_available=32 * GiB,
        storage=Path("/var/lib/labbuilder"),
        disk_path=Path("/var/lib/labbuilder"),
        disk_free=500 * GiB,
        routes=(HostRoute("0.0.0.0/0", "eth0"), HostRoute("192.0.2.0/24", "eth0")),
        libvirt_networks=(LibvirtNetworkFact("default", "virbr0", ("192.168.122.0/24",), None),),
        mirrors=(Resolved("apt source", "deb.debian.org", ("151.101.2.132",)),),
        nameservers=("192.0.2.53",),
        labs=LABS,
    )
    return replace(base, **changes)


def test_a_healthy_kvm_host_has_only_ok_findings() -> None:
    probe = probe_from_facts(facts())
    assert [f.name for f in probe.findings] == [
        "libvirt",
        "acceleration",
        "nested virtualization",
        "CPUs",
        "memory",
        "memory sharing (KSM)",
        "disk",
        "routes",
        "libvirt networks",
        "package mirror",
        "DNS servers",
    ]
    assert probe.status == Status.OK, probe.findings
    assert (probe.acceleration, probe.domain_type, probe.virt_type) == ("kvm", "kvm", "kvm")
    assert probe.cpu_passthrough and probe.nested is True
    assert probe.finding("libvirt").detail == "libvirt 9.0.0, QEMU 7.2.0, at qemu:///system"
    acceleration = probe.finding("acceleration")
    assert acceleration.detail == (
        f"a probe guest with domain type kvm booted Linux 6.1.0-50-cloud-amd64 ({KERNEL}) to "
        'mounting its root file system ("VFS: Cannot open root device") 1.4 s after start '
        "(/dev/kvm crw-rw---- root:kvm)"
    )
    assert acceleration.consequence == "domains use KVM (domain type kvm)"
    assert acceleration.fix is None
    nested = probe.finding("nested virtualization")
    assert nested.detail == "the CPU has vmx; kvm_intel nested=Y"
    assert "host-passthrough" in nested.consequence and "virt_type = kvm" in nested.consequence


def test_kvm_without_nesting_warns_and_points_at_enable_nested() -> None:
    probe = probe_from_facts(facts(nested=INTEL_NOT_NESTED))
    assert (probe.domain_type, probe.virt_type, probe.cpu_passthrough) == ("kvm", "qemu", False)
    nested = probe.finding("nested virtualization")
    assert nested.status == Status.WARN
    assert nested.detail == "the CPU has vmx; kvm_intel nested=N"
    assert nested.consequence.startswith("compute nodes get virt_type = qemu")
    assert nested.fix == "labbuilder doctor --enable-nested"
    assert probe.status == Status.WARN


def test_kvm_on_a_cpu_without_vmx_or_svm_has_no_nested_fix() -> None:
    probe = probe_from_facts(facts(nested=NestedFacts(None, None, None)))
    nested = probe.finding("nested virtualization")
    assert nested.status == Status.WARN and nested.fix is None
    assert "neither vmx (VT-x) nor svm (AMD-V)" in nested.detail


@pytest.mark.parametrize(
    ("boot", "linux", "ran"),
    [
        (KVM_RAN, LINUX_RAN, True),
        (KVM_RAN, None, True),  # no kernel: the real-mode proof decides
        (KVM_RAN, LINUX_PAUSED, False),  # the Linux proof overrules it
        (KVM_DENIED, None, False),
        (None, None, False),
    ],
)
def test_the_linux_proof_overrules_the_boot_sector(
    boot: BootResult | None, linux: BootResult | None, ran: bool
) -> None:
    assert facts(kvm_boot=boot, kvm_linux=linux).acceleration.kvm_guest_ran is ran


def test_a_boot_sector_alone_proves_only_real_mode_and_says_how_to_prove_linux() -> None:
    probe = probe_from_facts(
        facts(kvm_linux=None, linux_not_tried="no Linux kernel was given to boot")
    )
    assert (probe.acceleration, probe.domain_type) == ("kvm", "kvm")
    acceleration = probe.finding("acceleration")
    assert acceleration.status == Status.WARN
    assert acceleration.detail == (
        "a probe guest with domain type kvm printed LBPROBE-OK 0.2 s after start "
        "(/dev/kvm crw-rw---- root:kvm); only 16-bit real mode was proven, not a 64-bit Linux "
        "kernel (no Linux kernel was given to boot)"
    )
    assert acceleration.consequence.startswith("domains use KVM (domain type kvm), unproven")
    assert acceleration.fix == "labbuilder images build debian-12 && labbuilder doctor"


def test_kvm_that_runs_real_mode_but_not_linux_means_tcg_and_names_the_reason() -> None:
    probe = probe_from_facts(facts(kvm_linux=LINUX_PAUSED, kvm_modules=("kvm", "kvm_pvm")))
    assert (probe.acceleration, probe.domain_type, probe.virt_type) == ("tcg", "qemu", "qemu")
    assert not probe.cpu_passthrough
    acceleration = probe.finding("acceleration")
    assert acceleration.status == Status.WARN and acceleration.fix is None
    assert acceleration.detail.startswith(
        "KVM runs 16-bit real mode (a boot sector printed LBPROBE-OK 0.2 s after start) but "
        "not Linux: in a probe guest with domain type kvm, Linux 6.1.0-50-cloud-amd64 ("
    )
    assert "was paused" in acceleration.detail
    assert "KVM internal error. Suberror: 1 emulation failure" in acceleration.detail
    assert acceleration.detail.endswith(
        "; /dev/kvm crw-rw---- root:kvm; KVM modules loaded: kvm, kvm_pvm"
    )
    assert acceleration.consequence.startswith("domains use plain QEMU (TCG)")


def test_a_kvm_guest_that_qemu_may_not_open_dev_kvm_for_is_tcg_with_the_chmod_fix() -> None:
    probe = probe_from_facts(
        facts(
            kvm_boot=KVM_DENIED,
            kvm_linux=None,
            linux_not_tried="the boot sector did not run",
            dev_kvm=KVM_ROOT_ONLY,
        )
    )
    assert (probe.acceleration, probe.domain_type, probe.virt_type) == ("tcg", "qemu", "qemu")
    assert not probe.cpu_passthrough
    acceleration = probe.finding("acceleration")
    assert acceleration.status == Status.WARN
    assert acceleration.detail.startswith(
        "a probe guest with domain type kvm did not run: libvirt could not start"
    )
    assert acceleration.detail.endswith(
        "/dev/kvm crw------- root:root (only root may open it; libvirt runs QEMU as its own user)"
    )
    assert acceleration.consequence == (
        "domains use plain QEMU (TCG), many times slower than KVM; compute nodes get "
        "virt_type = qemu"
    )
    assert acceleration.fix == "chgrp kvm /dev/kvm && chmod 0660 /dev/kvm"
    nested = probe.finding("nested virtualization")
    assert nested.fix is None and "no effect while the domains run under TCG" in nested.consequence


def test_no_dev_kvm_suggests_loading_the_module() -> None:
    probe = probe_from_facts(
        facts(
            kvm_boot=None,
            kvm_linux=None,
            kvm_not_tried="there is no /dev/kvm",
            dev_kvm=DevKvm(False),
        )
    )
    acceleration = probe.finding("acceleration")
    assert acceleration.detail == "KVM not tested: there is no /dev/kvm; no /dev/kvm"
    assert acceleration.fix == "modprobe kvm_intel"


def test_an_unreachable_libvirt_fails_and_says_what_was_not_checked() -> None:
    probe = probe_from_facts(
        facts(
            libvirt_version=None,
            qemu_version=None,
            libvirt_error="cannot connect to libvirt at qemu:///system: no socket",
            kvm_boot=None,
            kvm_linux=None,
            kvm_not_tried="libvirt is not reachable",
            libvirt_networks=None,
        )
    )
    assert probe.status == Status.FAIL and probe.acceleration == Acceleration.TCG
    libvirt = probe.finding("libvirt")
    assert libvirt.status == Status.FAIL and libvirt.fix and "libvirtd" in libvirt.fix
    assert probe.finding("acceleration").detail.startswith(
        "KVM not tested: libvirt is not reachable"
    )
    assert probe.finding("libvirt networks").consequence == "not checked"


def test_a_mirror_inside_the_guides_external_network_means_auto_subnets() -> None:
    mirror = Resolved("apt source", "deb.debian.org", ("203.0.113.80",))
    finding = probe_from_facts(facts(mirrors=(mirror,))).finding("package mirror")
    assert finding.status == Status.WARN
    assert finding.detail == (
        "deb.debian.org resolves to 203.0.113.80, inside the guide's external network "
        "203.0.113.0/24"
    )
    assert finding.consequence == (
        "isolated labs (the default on qemu:///system) keep the guide's addresses; a lab with "
        "host gateways (options.isolated = false) must move its external network (--auto-subnets)"
    )


def test_mirrors_outside_and_unresolvable() -> None:
    ok = probe_from_facts(facts()).finding("package mirror")
    assert ok.status == Status.OK
    assert ok.detail == "deb.debian.org resolves to 151.101.2.132"
    assert ok.consequence == "outside the guide's networks (10.0.0.0/24, 203.0.113.0/24)"
    lost = Resolved("apt proxy", "proxy.invalid", (), "Name or service not known")
    finding = probe_from_facts(facts(mirrors=(lost,))).finding("package mirror")
    assert finding.status == Status.WARN
    assert finding.detail == "could not resolve apt proxy proxy.invalid: Name or service not known"


def test_a_dns_server_in_the_management_network() -> None:
    finding = probe_from_facts(facts(nameservers=("10.0.0.2",))).finding("DNS servers")
    assert finding.status == Status.WARN
    assert finding.detail == "10.0.0.2 is inside 10.0.0.0/24"
    assert finding.consequence == (
        "isolated labs (the default on qemu:///system) keep the guide's addresses; a lab with "
        "host gateways (options.isolated = false) must move its management network (--auto-subnets)"
    )


def test_routes_that_overlap_the_guides_networks() -> None:
    routes = (HostRoute("0.0.0.0/0", "eth0"), HostRoute("10.0.0.0/16", "eth1"))
    finding = probe_from_facts(facts(routes=routes)).finding("routes")
    assert finding.status == Status.WARN
    assert finding.detail == (
        "routes: 10.0.0.0/16 via eth1; 10.0.0.0/16 via eth1 overlaps the guide's management "
        "network 10.0.0.0/24"
    )
    assert finding.consequence == (
        "isolated labs (the default on qemu:///system) keep the guide's addresses; a lab with "
        "host gateways (options.isolated = false) must move its management network (--auto-subnets)"
    )
    only_default = probe_from_facts(facts(routes=routes[:1])).finding("routes")
    assert only_default.status == Status.OK and only_default.detail == "only a default route"


def test_a_labs_own_libvirt_networks_are_listed_but_not_a_clash() -> None:
    own = LibvirtNetworkFact("guide-3node-external", "g3n-ext", ("203.0.113.0/24",), "guide-3node")
    foreign = LibvirtNetworkFact("office", "br9", ("10.0.0.0/24",), None)
    finding = probe_from_facts(facts(libvirt_networks=(own,))).finding("libvirt networks")
    assert finding.status == Status.OK
    assert finding.detail == "guide-3node-external 203.0.113.0/24, lab guide-3node's"
    finding = probe_from_facts(facts(libvirt_networks=(own, foreign))).finding("libvirt networks")
    assert finding.status == Status.WARN
    assert "office overlaps the guide's management network 10.0.0.0/24" in finding.detail
    assert finding.consequence == (
        "isolated labs (the default on qemu:///system) keep the guide's addresses; a lab with "
        "host gateways (options.isolated = false) must move its management network (--auto-subnets)"
    )


@pytest.mark.parametrize(
    ("available", "status", "consequence"),
    [
        (
            8 * GiB,
            Status.OK,
            "enough for every built-in lab: guide-2node-legacy 4 GB, guide-3node 4.5 GB",
        ),
        (
            4 * GiB,
            Status.WARN,
            "`plan` refuses guide-3node (needs 4.5 GB); fits: guide-2node-legacy 4 GB",
        ),
        (
            2 * GiB,
            Status.FAIL,
            "`plan` refuses guide-2node-legacy (needs 4 GB), guide-3node (needs 4.5 GB): every built-in lab",
        ),
    ],
)
def test_memory(available: int, status: Status, consequence: str) -> None:
    finding = probe_from_facts(facts(memory_available=available)).finding("memory")
    assert (finding.status, finding.consequence) == (status, consequence)
    assert finding.detail.endswith("available (MemAvailable)")


def test_disk_names_where_it_was_measured() -> None:
    finding = probe_from_facts(facts(disk_path=Path("/var/lib"), disk_free=16 * GiB)).finding(
        "disk"
    )
    assert finding.detail == "16 GB free at /var/lib (where /var/lib/labbuilder will be)"
    assert finding.status == Status.WARN and "guide-3node (needs 20 GB)" in finding.consequence


def test_render_findings_has_one_row_per_finding() -> None:
    probe = probe_from_facts(facts(nested=INTEL_NOT_NESTED))
    table = render_findings(probe)
    assert [c.header for c in table.columns] == ["status", "check", "found", "consequence", "fix"]
    assert table.row_count == len(probe.findings)
    out = io.StringIO()
    Console(file=out, width=250, color_system=None).print(table)
    text = out.getvalue()
    assert "labbuilder doctor --enable-nested" in text
    assert "virt_type = qemu" in text and "[" not in probe.finding("acceleration").detail


# --- the boot sector ------------------------------------------------------------------------


def test_the_boot_sector_is_an_mbr_that_points_at_its_marker() -> None:
    sector = probeguest.boot_sector()
    assert len(sector) == 512 and sector[510:] == b"\x55\xaa"
    text = sector.index(b"LBPROBE-OK\r\n\x00")
    assert sector[6] == 0xBE  # mov si, imm16
    assert int.from_bytes(sector[7:9], "little") == 0x7C00 + text
    assert sector[9:12] == b"\xba\xf8\x03"  # mov dx, 0x3f8 (COM1)
    assert b"LBPROBE-OK" not in probeguest.boot_sector(b"")
    with pytest.raises(ValueError):
        probeguest.boot_sector(b"x" * 500)


def test_the_probe_domain_has_no_network_and_logs_its_serial_port(tmp_path: Path) -> None:
    xml = probeguest.probe_domain_xml(
        "lbprobe-kvm-1-abc", "kvm", tmp_path / "boot.raw", tmp_path / "serial.log"
    )
    root = ET.fromstring(xml)
    assert root.get("type") == "kvm" and root.findtext("name") == "lbprobe-kvm-1-abc"
    assert root.findtext("memory") == "16" and root.find("memory").get("unit") == "MiB"  # type: ignore[union-attr]
    assert root.find("devices/interface") is None
    serial = root.find("devices/serial")
    assert serial is not None and serial.get("type") == "file"
    assert serial.find("source").get("path") == str(tmp_path / "serial.log")  # type: ignore[union-attr]


def test_the_linux_probe_domain_boots_the_kernel_alone(tmp_path: Path) -> None:
    xml = probeguest.kernel_domain_xml(
        "lbprobe-kvm-1-abc", "kvm", tmp_path / "vmlinuz", tmp_path / "serial.log"
    )
    root = ET.fromstring(xml)
    assert root.get("type") == "kvm" and root.findtext("name") == "lbprobe-kvm-1-abc"
    assert root.findtext("memory") == "256" and root.find("memory").get("unit") == "MiB"  # type: ignore[union-attr]
    assert root.findtext("os/kernel") == str(tmp_path / "vmlinuz")
    assert root.findtext("os/cmdline") == (
        "earlyprintk=serial,ttyS0,115200 console=ttyS0 panic=-1 root=/dev/null"
    )
    assert root.find("os/initrd") is None and root.find("os/boot") is None
    assert root.find("devices/disk") is None and root.find("devices/interface") is None
    assert root.findtext("on_reboot") == "destroy"  # panic=-1 reboots: the guest ends itself
    serial = root.find("devices/serial")
    assert serial is not None and serial.get("type") == "file"
    assert serial.find("source").get("path") == str(tmp_path / "serial.log")  # type: ignore[union-attr]
    # No marker may be in what the kernel echoes of its own command line.
    assert not any(m.decode() in probeguest.KERNEL_CMDLINE for m in probeguest.LINUX_MARKERS)


SERIAL = (
    b"\x1b[?7l\x1b[2J\x1b[0m[    0.000000] Linux version 6.1.0-50-cloud-amd64 (debian-kernel@lists.debian.org)\r\n"
    b"[    0.000000] Command line: console=ttyS0 panic=-1 root=/dev/null\r\n"
    b"[    0.412345] smpboot: CPU0: Intel Xeon Processor (Sapphire Rapids) (family: 0x6)\r\n"
)
VFS = b'[    2.585057] VFS: Cannot open root device "null" or unknown-block(0,0): error -6\r\n'
PANIC = b"[    2.585927] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)\r\n"
VMLINUZ = Path("/c/built/debian-12-0123456789abcdef/vmlinuz")


def test_the_linux_proof_in_words() -> None:
    Waited = probeguest.Waited
    booted = probeguest.linux_reason(
        Waited(b"VFS: Cannot open root device", None, 2.6, SERIAL + VFS + PANIC), VMLINUZ
    )
    assert booted == (
        f"booted Linux 6.1.0-50-cloud-amd64 ({VMLINUZ}) to mounting its root file system "
        '("VFS: Cannot open root device") 2.6 s after start'
    )
    silent = probeguest.linux_reason(Waited(None, None, 30.0, b""), VMLINUZ)
    assert silent == (
        f"Linux ({VMLINUZ}) did not get to mounting its root file system within 30.0 s; the "
        "serial port stayed silent"
    )
    quiet = probeguest.linux_reason(
        Waited(None, None, 11.6, b"Probing EDD (edd=off to disable)... ok\r\n", 10.0), VMLINUZ
    )
    assert quiet == (
        f"Linux ({VMLINUZ}) did not get to mounting its root file system: its serial port "
        "gained nothing for 10 s (11.6 s after start); its last line on the serial port: "
        '"Probing EDD (edd=off to disable)... ok"'
    )
    paused = probeguest.linux_reason(
        Waited(None, "was paused (reason unknown)", 0.9, SERIAL), VMLINUZ
    )
    assert paused == (
        f"Linux 6.1.0-50-cloud-amd64 ({VMLINUZ}) did not get to mounting its root file system: "
        "the guest was paused (reason unknown) 0.9 s after start; its last line on the serial "
        'port: "smpboot: CPU0: Intel Xeon Processor (Sapphire Rapids) (family: 0x6)"'
    )
    assert probeguest.last_line(b"Probing EDD (edd=off to disable)... ok\r\n\x1b[2J\r\n") == (
        "Probing EDD (edd=off to disable)... ok"
    )
    assert len(probeguest.last_line(b"x" * 500)) == 120


def test_a_serial_log_that_stops_growing_ends_the_wait_early(tmp_path: Path) -> None:
    # libvirt's test driver gives a domain that runs; the log is a real file another thread
    # writes to: the wait goes on while it grows, and ends once it has gained nothing for
    # the quiet time, long before the deadline.
    conn = libvirt.open("test:///default")
    try:
        domain = conn.lookupByName("test")
        log = tmp_path / "serial.log"
        log.write_bytes(b"Probing EDD (edd=off to disable)... ok\r\n")

        def grow() -> None:
            for i in range(6):
                time.sleep(0.1)
                with log.open("ab") as out:
                    out.write(f"[    0.{i}] line\r\n".encode())

        writer = threading.Thread(target=grow)
        started = time.monotonic()
        writer.start()
        waited = probeguest._wait_for_marker(
            domain, log, started + 30, probeguest.LINUX_MARKERS, quiet=0.4
        )
        writer.join()
        seconds = time.monotonic() - started
        assert waited.marker is None and waited.stopped is None and waited.quiet == 0.4
        assert waited.output.endswith(b"[    0.5] line\r\n")  # it waited while the log grew
        assert 0.9 <= seconds < 5
        # Without a quiet time, silence is waited out to the deadline.
        waited = probeguest._wait_for_marker(
            domain, log, time.monotonic() + 0.6, probeguest.LINUX_MARKERS
        )
        assert waited.quiet is None and waited.seconds >= 0.6
        # A marker ends the wait whatever the quiet time.
        with log.open("ab") as out:
            out.write(VFS)
        waited = probeguest._wait_for_marker(
            domain, log, time.monotonic() + 30, probeguest.LINUX_MARKERS, quiet=0.4
        )
        assert waited.marker == b"VFS: Cannot open root device" and waited.quiet is None
    finally:
        conn.close()


def test_a_marker_is_found_wherever_it_is_and_the_earliest_wins() -> None:
    markers = probeguest.LINUX_MARKERS
    assert (
        probeguest._first_marker(SERIAL + VFS + PANIC, markers) == b"VFS: Cannot open root device"
    )
    assert probeguest._first_marker(SERIAL + PANIC, markers) == b"VFS: Unable to mount root fs"
    early = b"Kernel panic - not syncing: Attempted to kill the idle task!\r\n"
    assert probeguest._first_marker(SERIAL + early, markers) is None  # a panic alone is no proof


QEMU_LOG = """\
2026-11-26 01:44:37.812+0000: starting up libvirt version: 9.0.0, qemu version: 7.2.22
LC_ALL=C \\
/usr/bin/qemu-system-x86_64 \\
-name guest=lbprobe-kvm-1-abc,debug-threads=on \\
-msg timestamp=on
Could not access KVM kernel module: Permission denied
2026-11-26T01:44:37.985545Z qemu-system-x86_64: -accel kvm: failed to initialize kvm: Permission denied
2026-11-26T01:44:38.000000Z qemu-system-x86_64: terminating on signal 15 from pid 3362 (libvirtd)
2026-11-26 01:44:37.994+0000: shutting down, reason=failed
"""


def test_qemus_own_messages_are_taken_from_libvirts_log() -> None:
    assert probeguest.qemu_messages(QEMU_LOG) == (
        "Could not access KVM kernel module: Permission denied "
        "qemu-system-x86_64: -accel kvm: failed to initialize kvm: Permission denied"
    )


KVM_INTERNAL_ERROR_LOG = """\
2026-11-26 02:07:30.855+0000: starting up libvirt version: 9.0.0, qemu version: 7.2.22
2026-11-26T02:07:30.971645Z qemu-system-x86_64: warning: host doesn't support requested feature: CPUID.01H:ECX.pni [bit 0]
KVM internal error. Suberror: 1
extra data[0]: 0x0000000000000001
extra data[1]: 0x74204dc70f48f00f
emulation failure
RAX=ffff8cb7c1040040 RBX=0000000000000000 RCX=0000000080400040 RDX=0000000000400001
RIP=ffffffff9af14b60 RFL=00000006 [-----P-] CPL=0 II=0 A20=1 SMM=0 HLT=0
ES =0000 0000000000000000 00000000 00000000
CS =0010 0000000000000000 ffffffff 00a09b00 DPL=0 CS64 [-RA]
GDT=     fffffe0000001000 0000007f
CR0=80050033 CR2=ffff8cb81a601000 CR3=0000000059810000 CR4=000100b0
EFER=0000000000000d01
Code=24 5b 80 41 81 e3 00 00 00 40 48 8b 4c 24 58 74 31 48 89 f0 <f0> 48 0f c7 4d 20 74 66
2026-11-26T02:12:40.565676Z qemu-system-x86_64: terminating on signal 15 from pid 3362 (libvirtd)
2026-11-26 02:12:42.570+0000: shutting down, reason=destroyed
"""


def test_a_kvm_internal_error_is_kept_without_its_register_dump() -> None:
    assert probeguest.qemu_messages(KVM_INTERNAL_ERROR_LOG) == (
        "qemu-system-x86_64: warning: host doesn't support requested feature: CPUID.01H:ECX.pni "
        "[bit 0] KVM internal error. Suberror: 1 emulation failure"
    )


def running_test_guests(names: list[str]) -> Any:
    """libvirt's test driver with transient guests ``names`` running beside its own "test"."""
    conn = libvirt.open("test:///default")
    for name in names:
        conn.createXML(
            f'<domain type="test"><name>{name}</name><memory unit="MiB">16</memory>'
            "<os><type>hvm</type></os></domain>",
            0,
        )
    return conn


@pytest.fixture
def empty_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``lv.connect`` reaches a test-driver host with no domain at all."""
    node = tmp_path / "empty-node.xml"
    node.write_text("<node></node>")
    monkeypatch.setattr(lv, "connect", lambda uri: libvirt.open(f"test://{node}"))


def test_stale_probe_guests_of_dead_processes_are_swept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = 2**22 + 17  # above pid_max's default range: no such process
    logs, parent = tmp_path / "logs", tmp_path / "tmp"
    logs.mkdir()
    parent.mkdir()
    monkeypatch.setattr(probeguest, "QEMU_LOG_DIRS", (logs,))
    for name in (f"lbprobe-kvm-{dead}-a1b2c3", f"lbprobe-kvm-{os.getpid()}-d4e5f6"):
        (logs / f"{name}.log").write_text("QEMU's log\n")
    for name in (f"lbprobe-{dead}-x_1y2z3w", f"lbprobe-{os.getpid()}-abcdefgh", "lbprobe-other"):
        (parent / name).mkdir()
        (parent / name / "vmlinuz").write_bytes(b"MZ")
    mine = f"lbprobe-kvm-{os.getpid()}-d4e5f6"
    conn = running_test_guests([f"lbprobe-kvm-{dead}-a1b2c3", mine, "guide3node-compute1"])
    try:
        assert probeguest.sweep_stale_probe_guests(conn, parent) == [f"lbprobe-kvm-{dead}-a1b2c3"]
        assert probeguest.probe_guests(conn) == [mine]  # a transient guest destroyed is gone
    finally:
        for name in (mine, "guide3node-compute1"):
            probeguest.destroy_probe_guest(conn, name)
        conn.close()
    assert sorted(path.name for path in logs.iterdir()) == [f"lbprobe-kvm-{os.getpid()}-d4e5f6.log"]
    assert sorted(path.name for path in parent.iterdir()) == [
        f"lbprobe-{os.getpid()}-abcdefgh",
        "lbprobe-other",
    ]


# --- reading the host -----------------------------------------------------------------------

CPUINFO = "processor\t: 0\nvendor_id\t: {vendor}\nflags\t\t: fpu vme {flag} sse2 hypervisor\n\n"


def fake_host(tmp_path: Path, flag: str, nested: str | None) -> tuple[Path, Path]:
    """/proc/cpuinfo with ``flag`` and /sys/module with the matching module's ``nested``."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(CPUINFO.format(vendor="GenuineIntel", flag=flag) * 2)
    sys_module = tmp_path / "module"
    module = hostprobe.MODULE_FOR_FLAG.get(flag)
    if module and nested is not None:
        (sys_module / module / "parameters").mkdir(parents=True)
        (sys_module / module / "parameters" / "nested").write_text(nested + "\n")
    return cpuinfo, sys_module


@pytest.mark.parametrize(
    ("flag", "parameter", "expected", "enabled"),
    [
        ("vmx", "Y", NestedFacts("vmx", "kvm_intel", "Y"), True),
        ("vmx", "N", NestedFacts("vmx", "kvm_intel", "N"), False),
        ("svm", "1", NestedFacts("svm", "kvm_amd", "1"), True),
        ("svm", "0", NestedFacts("svm", "kvm_amd", "0"), False),
        ("vmx", None, NestedFacts("vmx", "kvm_intel", None), None),  # kvm_intel not loaded
        ("pse", None, NestedFacts(None, None, None), False),  # no VT-x/AMD-V at all
    ],
)
def test_nested_is_read_from_the_module_parameter_and_the_cpu_flags(
    tmp_path: Path, flag: str, parameter: str | None, expected: NestedFacts, enabled: bool | None
) -> None:
    facts_read = hostprobe.read_nested(*fake_host(tmp_path, flag, parameter))
    assert facts_read == expected and facts_read.enabled is enabled


def test_dev_kvm_mode_and_owner(tmp_path: Path) -> None:
    node = tmp_path / "kvm"
    node.write_text("")
    node.chmod(0o600)
    found = hostprobe.read_dev_kvm(node)
    assert found.exists and found.mode == 0o600 and found.root_only == (os.geteuid() == 0)
    assert found.describe().startswith(f"{node} crw-------")
    assert hostprobe.read_dev_kvm(tmp_path / "missing") == DevKvm(
        False, path=str(tmp_path / "missing")
    )


def test_the_probe_kernel_is_the_newest_built_images_kernel(tmp_path: Path) -> None:
    assert find_probe_kernel(tmp_path) is None  # no built/ at all
    built = tmp_path / "built"
    for index, name in enumerate(["debian-12-aaaa", "debian-12-bbbb", ".build-debian-12-cccc-7"]):
        (built / name).mkdir(parents=True)
        kernel = built / name / "vmlinuz"
        kernel.write_bytes(b"MZ kernel")
        os.utime(kernel, (1_700_000_000 + index, 1_700_000_000 + index))
    (built / "debian-12-dddd").mkdir()  # no kernel: a downloaded image's folder, say
    (built / "debian-12-eeee").mkdir()
    (built / "debian-12-eeee" / "vmlinuz").write_bytes(b"")  # empty: not a kernel
    assert find_probe_kernel(tmp_path) == built / "debian-12-bbbb" / "vmlinuz"
    # The cache folder doctor uses honours $LABBUILDER_CACHE_DIR.
    cache = default_cache_dir({"LABBUILDER_CACHE_DIR": str(tmp_path), "HOME": "/nonexistent"})
    assert find_probe_kernel(cache) == built / "debian-12-bbbb" / "vmlinuz"


def test_kvm_modules_are_read_from_sys_module(tmp_path: Path) -> None:
    for name in ("kvm", "kvm_pvm", "ext4", "kvmfoo"):
        (tmp_path / name).mkdir()
    assert hostprobe.read_kvm_modules(tmp_path) == ("kvm", "kvm_pvm", "kvmfoo")
    assert hostprobe.read_kvm_modules(tmp_path / "missing") == ()


def test_apt_proxies_in_both_forms(tmp_path: Path) -> None:
    folder = tmp_path / "apt.conf.d"
    folder.mkdir()
    (folder / "01proxy").write_text('Acquire::http::Proxy "http://10.0.0.1:3142";\n')
    (folder / "02block").write_text(
        'Acquire {\n  https::Proxy "http://cache.example:3128/";\n};\n'
        '// Acquire::http::Proxy "http://commented.example:1";\n'
    )
    assert hostprobe.apt_proxy_hosts([tmp_path / "apt.conf", folder]) == [
        "10.0.0.1",
        "cache.example",
    ]


# --- enabling nested virtualization ---------------------------------------------------------

CONF = Path("/etc/modprobe.d/labbuilder-nested.conf")
READY = hostprobe.NestedState(INTEL_NOT_NESTED, True, "a KVM probe guest ran", (), True)


def test_the_nested_plan_reloads_the_module_and_persists_it() -> None:
    assert hostprobe.nested_plan(READY, CONF) == [
        "modprobe -r kvm_intel",
        "modprobe kvm_intel nested=1",
        f"echo 'options kvm_intel nested=1' > {CONF}",
    ]
    assert hostprobe.nested_plan(replace(READY, nested=INTEL_NESTED), CONF) == []


@pytest.mark.parametrize(
    ("change", "message", "hint"),
    [
        ({"nested": NestedFacts(None, None, None)}, "neither vmx", "firmware"),
        (
            {"nested": NestedFacts("vmx", "kvm_intel", None)},
            "kvm_intel is not loaded",
            "modprobe kvm_intel nested=1",
        ),
        (
            {"kvm_works": False, "kvm_reason": "Permission denied"},
            "KVM does not run guests on this host (Permission denied)",
            "modprobe -r kvm_intel && modprobe kvm_intel nested=1",
        ),
        (
            {"active_domains": ("guide-3node-compute1",)},
            "1 guest(s) are running (guide-3node-compute1)",
            "modprobe -r kvm_intel && modprobe kvm_intel nested=1 && echo 'options kvm_intel nested=1' >",
        ),
        ({"root": False}, "needs root", "sudo labbuilder doctor --enable-nested"),
    ],
)
def test_the_nested_plan_refuses_and_says_what_to_run(
    change: dict[str, Any], message: str, hint: str
) -> None:
    with pytest.raises(HostError) as err:
        hostprobe.nested_plan(replace(READY, **change), CONF)
    assert message in err.value.message
    assert err.value.hint is not None and hint in err.value.hint


@pytest.fixture
def fabricated_intel_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """An Intel host with kvm_intel nested=N in fabricated files, whose "modprobe" only
    records its argv (and flips the fabricated parameter as the real one would)."""
    cpuinfo, sys_module = fake_host(tmp_path, "vmx", "N")
    monkeypatch.setattr(hostprobe, "CPUINFO", cpuinfo)
    monkeypatch.setattr(hostprobe, "SYS_MODULE", sys_module)
    monkeypatch.setattr(hostprobe, "MODPROBE_CONF", tmp_path / "labbuilder-nested.conf")
    calls: list[list[str]] = []

    def run(argv: list[str]) -> None:
        calls.append(argv)
        if argv == ["modprobe", "kvm_intel", "nested=1"]:
            (sys_module / "kvm_intel" / "parameters" / "nested").write_text("Y\n")

    monkeypatch.setattr(hostprobe, "_run", run)
    return calls


@pytest.mark.integration
def test_refusals_on_this_host_are_real_and_touch_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    # This host's KVM is kvm_pvm: no vmx/svm, no kvm_intel/kvm_amd. Whatever the host, a
    # refusal must come before any command runs: "_run" fails the test if it is reached.
    def forbidden(argv: list[str]) -> None:
        pytest.fail(f"enable_nested ran {argv} on the real host")

    monkeypatch.setattr(hostprobe, "_run", forbidden)
    nested = hostprobe.read_nested()
    if nested.cpu_flag is not None and nested.parameter is not None and not nested.enabled:
        pytest.skip("this host could really reload its KVM module; only the sandbox may")
    for dry_run in (True, False):
        if nested.enabled:
            assert hostprobe.enable_nested(dry_run=dry_run, uri=URI) == []
            continue
        with pytest.raises(HostError) as err:
            hostprobe.enable_nested(dry_run=dry_run, uri=URI)
        assert err.value.hint  # says what to do instead


@pytest.mark.integration
def test_dry_run_plan_against_the_real_libvirt(
    fabricated_intel_host: list[list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The CPU facts are fabricated (this host has no kvm_intel); the guests are libvirt's real
    # ones: with any running (other tests' guests), the plan must refuse and name them.
    seen: list[tuple[str, ...]] = []
    real_active_domains = hostprobe.active_domains

    def spy(conn: Any) -> tuple[str, ...]:
        seen.append(real_active_domains(conn))
        return seen[-1]

    monkeypatch.setattr(hostprobe, "active_domains", spy)
    try:
        actions = hostprobe.enable_nested(dry_run=True, uri=URI, kvm_works=True)
    except HostError as err:
        assert seen and seen[0], err
        assert f"{len(seen[0])} guest(s) are running" in err.message
    else:
        assert seen == [()]
        assert actions[:2] == ["modprobe -r kvm_intel", "modprobe kvm_intel nested=1"]
    assert fabricated_intel_host == []  # a dry run runs nothing
    assert not hostprobe.MODPROBE_CONF.exists()


def test_enable_nested_runs_modprobe_then_persists(
    fabricated_intel_host: list[list[str]],
    monkeypatch: pytest.MonkeyPatch,
    empty_host: None,
) -> None:
    # The real reload (modprobe -r kvm_intel) cannot be exercised here: this sandbox has no
    # kvm_intel, and reloading KVM would kill other users' guests. Its commands are recorded.
    actions = hostprobe.enable_nested(dry_run=False, uri=URI, kvm_works=True)
    assert fabricated_intel_host == [
        ["modprobe", "-r", "kvm_intel"],
        ["modprobe", "kvm_intel", "nested=1"],
    ]
    assert actions[-1] == f"echo 'options kvm_intel nested=1' > {hostprobe.MODPROBE_CONF}"
    assert "options kvm_intel nested=1\n" in hostprobe.MODPROBE_CONF.read_text()
    assert hostprobe.read_nested().enabled is True


def test_a_failed_reload_restores_kvm_and_persists_nothing(
    fabricated_intel_host: list[list[str]],
    monkeypatch: pytest.MonkeyPatch,
    empty_host: None,
) -> None:
    calls = fabricated_intel_host

    def run(argv: list[str]) -> None:
        calls.append(argv)
        if "nested=1" in argv:
            raise HostError("`modprobe kvm_intel nested=1` failed (exit 1): invalid parameter")

    monkeypatch.setattr(hostprobe, "_run", run)
    with pytest.raises(HostError, match="invalid parameter"):
        hostprobe.enable_nested(dry_run=False, uri=URI, kvm_works=True)
    assert calls[-1] == ["modprobe", "kvm_intel"]
    assert not hostprobe.MODPROBE_CONF.exists()


# --- probe guests under the real libvirtd ---------------------------------------------------


@pytest.fixture
def conn() -> Iterator[Any]:
    connection = lv.connect(URI)
    yield connection
    connection.close()


@pytest.fixture
def probe_dir() -> Iterator[Path]:
    """Where probe guests' files go; QEMU's user must be able to reach them (not pytest's
    0700 tmp_path)."""
    folder = Path(tempfile.mkdtemp(prefix="lbtest-probe-", dir="/tmp"))
    folder.chmod(0o711)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def assert_nothing_left(conn: Any, probe_dir: Path) -> None:
    mine = [name for name in probeguest.probe_guests(conn) if f"-{os.getpid()}-" in name]
    assert mine == [], f"probe guests left in libvirt: {mine}"
    assert list(probe_dir.iterdir()) == [], "probe files left behind"
    logs = list(Path("/var/log/libvirt/qemu").glob(f"lbprobe-*-{os.getpid()}-*.log"))
    assert logs == [], "libvirt's logs of probe guests left behind"


@pytest.mark.integration
def test_the_boot_sector_prints_its_marker_under_tcg(conn: Any, probe_dir: Path) -> None:
    # The same boot sector as the KVM probe: if this passes, a KVM probe without the marker
    # means KVM, not the boot sector, is broken.
    result = probeguest.boot_probe_guest(conn, domain_type="qemu", timeout=30, parent=probe_dir)
    assert result.marker_seen, result.reason
    assert result.reason.startswith("printed LBPROBE-OK") and result.run_seconds < 30
    assert_nothing_left(conn, probe_dir)


@pytest.mark.integration
def test_a_too_short_timeout_kills_the_guest(conn: Any, probe_dir: Path) -> None:
    silent = probeguest.boot_sector(b"")  # prints only CR LF: the marker can never come
    result = probeguest.boot_probe_guest(
        conn, domain_type="qemu", timeout=0.5, sector=silent, parent=probe_dir
    )
    assert not result.marker_seen
    assert result.reason.startswith("no LBPROBE-OK on the serial port within")
    assert 0.5 <= result.run_seconds < 10
    assert_nothing_left(conn, probe_dir)


@pytest.mark.integration
@pytest.mark.parametrize("with_kernel", [False, True], ids=["boot-sector", "linux"])
def test_the_guest_is_destroyed_when_waiting_fails(
    conn: Any, probe_dir: Path, monkeypatch: pytest.MonkeyPatch, with_kernel: bool
) -> None:
    kernel = built_kernel() if with_kernel else None

    def interrupted(
        domain: Any,
        serial_log: Path,
        deadline: float,
        markers: tuple[bytes, ...],
        *,
        quiet: float | None = None,
    ) -> probeguest.Waited:
        assert domain.isActive()
        raise KeyboardInterrupt

    monkeypatch.setattr(probeguest, "_wait_for_marker", interrupted)
    with pytest.raises(KeyboardInterrupt):
        probeguest.boot_probe_guest(
            conn, domain_type="qemu", timeout=5, kernel=kernel, parent=probe_dir
        )
    assert_nothing_left(conn, probe_dir)


def built_kernel() -> Path:
    """The newest built image's kernel in the shared test image cache; skips without one."""
    kernel = find_probe_kernel(TEST_CACHE)
    if kernel is None:
        pytest.skip(
            f"no built image with a kernel in {TEST_CACHE / 'built'}: tests/test_imagebuild.py "
            f"builds one (or: LABBUILDER_CACHE_DIR={TEST_CACHE} labbuilder images build debian-12)"
        )
    return kernel


@pytest.mark.integration
def test_a_linux_kernel_gets_to_mounting_root_under_tcg(conn: Any, probe_dir: Path) -> None:
    # The kernel the KVM proof boots: if it gets there under TCG, a KVM guest that does not
    # means KVM, not the kernel, is broken.
    kernel = built_kernel()
    result = probeguest.boot_probe_guest(
        conn, domain_type="qemu", timeout=180, kernel=kernel, parent=probe_dir
    )
    assert result.marker_seen, result.reason
    assert result.proof == Proof.LINUX and result.domain_type == "qemu"
    assert result.reason.startswith("booted Linux ") and f"({kernel})" in result.reason
    assert "to mounting its root file system" in result.reason and result.run_seconds < 180
    assert_nothing_left(conn, probe_dir)


@pytest.mark.integration
def test_a_linux_guest_that_times_out_is_destroyed_with_its_files(
    conn: Any, probe_dir: Path
) -> None:
    kernel = built_kernel()
    result = probeguest.boot_probe_guest(
        conn, domain_type="qemu", timeout=0.3, kernel=kernel, parent=probe_dir
    )
    assert not result.marker_seen and result.proof == Proof.LINUX
    assert "did not get to mounting its root file system within 0." in result.reason
    assert 0.3 <= result.run_seconds < 10
    assert_nothing_left(conn, probe_dir)
    assert kernel.is_file()  # the cache's kernel is untouched: the guest booted a copy


def _probe_here(kernel: Path | None) -> Iterator[tuple[Any, float, Path]]:
    """A real probe_host, with its probe guests' files in a folder of its own (so that
    leftovers can be told from other runs' files)."""
    folder = Path(tempfile.mkdtemp(prefix="lbtest-probe-", dir="/tmp"))
    folder.chmod(0o711)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(probeguest, "_default_parent", lambda: folder)
            started = time.monotonic()
            probe = probe_host(
                URI, storage=Path("/var/lib/labbuilder-probe-test/disks"), kernel=kernel
            )
            yield probe, time.monotonic() - started, folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def host_probe() -> Iterator[tuple[Any, float, Path]]:
    """probe_host without a kernel: the boot sector only."""
    yield from _probe_here(None)


@pytest.fixture(scope="module")
def host_probe_linux() -> Iterator[tuple[Any, float, Path]]:
    """probe_host with the test cache's built kernel: the full proof."""
    yield from _probe_here(built_kernel())


@pytest.mark.integration
def test_probe_host_on_this_machine_is_complete(host_probe: Any, conn: Any) -> None:
    probe, seconds, folder = host_probe
    assert {f.name for f in probe.findings} >= {
        "libvirt",
        "acceleration",
        "nested virtualization",
        "CPUs",
        "memory",
        "disk",
        "routes",
        "libvirt networks",
        "package mirror",
    }
    assert probe.finding("libvirt").status == Status.OK
    assert probe.libvirt_version and probe.qemu_version
    assert probe.acceleration in (Acceleration.KVM, Acceleration.TCG)
    assert probe.domain_type == ("kvm" if probe.acceleration == Acceleration.KVM else "qemu")
    assert probe.virt_type == ("kvm" if probe.cpu_passthrough else "qemu")
    acceleration = probe.finding("acceleration")
    assert acceleration.status == Status.WARN  # TCG, or KVM proven only in real mode
    if probe.acceleration == Acceleration.KVM:
        assert "only 16-bit real mode was proven" in acceleration.detail
        assert acceleration.fix == "labbuilder images build debian-12 && labbuilder doctor"
    if Path("/dev/kvm").exists():
        assert "domain type kvm" in acceleration.detail  # a KVM guest was really tried
    assert 0 < probe.seconds <= seconds
    assert not [n for n in probeguest.probe_guests(conn) if f"-{os.getpid()}-" in n]
    assert_nothing_left(conn, folder)


@pytest.mark.integration
def test_the_linux_proof_on_this_host_agrees_with_a_direct_check(
    host_probe_linux: Any, conn: Any, probe_dir: Path
) -> None:
    # Whatever this host's KVM does, the probe's answer must hold up: "kvm" only if the
    # kernel really boots under KVM (again), "tcg" only with the reason named, for a kernel
    # that does boot under TCG (so the kernel is not what failed).
    probe, seconds, folder = host_probe_linux
    kernel = built_kernel()
    assert_nothing_left(conn, folder)
    assert 0 < probe.seconds <= seconds
    if not Path("/dev/kvm").exists():
        pytest.skip("no /dev/kvm here: the KVM proof is not tried")
    acceleration = probe.finding("acceleration")
    if probe.acceleration == Acceleration.KVM:
        assert (acceleration.status, probe.domain_type) == (Status.OK, "kvm")
        assert "booted Linux" in acceleration.detail and str(kernel) in acceleration.detail
        again = probeguest.boot_probe_guest(
            conn, domain_type="kvm", timeout=30, kernel=kernel, parent=probe_dir
        )
        assert again.marker_seen, f"the probe said KVM runs Linux, a second boot: {again.reason}"
    else:
        assert (acceleration.status, probe.domain_type) == (Status.WARN, "qemu")
        assert acceleration.consequence.startswith("domains use plain QEMU (TCG)")
        detail = acceleration.detail
        if detail.startswith("KVM runs 16-bit real mode"):
            assert f"({kernel}) did not get to mounting its root file system" in detail
            assert any(
                how in detail
                for how in (
                    "within",
                    "was paused",
                    "is gone",
                    "stopped",
                    "libvirt could not",
                    "gained nothing",
                )
            ), detail
            if "gained nothing" in detail:  # a stalled guest ends long before the timeout
                assert probe.seconds < 25, detail
        else:  # the boot sector failed already: the Linux proof was not needed
            assert detail.startswith(
                ("a probe guest with domain type kvm did not run: ", "KVM not tested: ")
            )
        control = probeguest.boot_probe_guest(
            conn, domain_type="qemu", timeout=180, kernel=kernel, parent=probe_dir
        )
        assert control.marker_seen, f"the kernel does not boot under TCG either: {control.reason}"
    assert_nothing_left(conn, probe_dir)
