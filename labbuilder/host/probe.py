"""The host probe behind ``labbuilder doctor``: what this host offers a lab, and what follows.

``probe_host`` gathers the facts (``labbuilder.adapters.hostprobe`` and ``.probeguest``), then
``probe_from_facts`` turns them into a ``HostProbe``: ``decide`` picks the acceleration, the
domain type and what the compute nodes' nova uses, and ``labbuilder.host.findings`` words one
``Finding`` per check. ``render_findings`` is the table the CLI prints.

Whether hardware acceleration works is not read from /dev/kvm or from libvirt's capabilities:
probe guests of domain type kvm are booted and must print a marker on their serial port
(``labbuilder.adapters.probeguest``). First a 512-byte boot sector: it fails fast where QEMU
may not open /dev/kvm, but proves only 16-bit real mode. Then, given a ``kernel`` (the
direct-boot ``vmlinuz`` of a built image: ``find_probe_kernel``), that 64-bit Linux kernel,
which must get to mounting its root file system; only then is KVM chosen. A KVM that runs the
boot sector but pauses ("KVM internal error ... emulation failure") or hangs under Linux means
TCG. Without a kernel the real-mode proof decides, and the finding says so.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from labbuilder.adapters import hostprobe, probeguest
from labbuilder.adapters import libvirt as lv
from labbuilder.adapters.hostprobe import find_probe_kernel
from labbuilder.common.errors import HypervisorError
from labbuilder.host import facts as hostfacts
from labbuilder.host.findings import findings, render_findings
from labbuilder.lab.files import builtin_lab_names, load_builtin_lab
from labbuilder.model.lab import Lab, LibvirtNetworkFact
from labbuilder.model.probe import (
    Acceleration,
    AccelerationFacts,
    BootResult,
    Decision,
    DomainType,
    Finding,
    HostProbe,
    HostProbeFacts,
    LabNeed,
    Proof,
    Resolved,
    Status,
    VirtType,
)

__all__ = [
    "Acceleration",
    "AccelerationFacts",
    "BootResult",
    "Decision",
    "DomainType",
    "Finding",
    "HostProbe",
    "HostProbeFacts",
    "LabNeed",
    "Proof",
    "Resolved",
    "Status",
    "VirtType",
    "decide",
    "find_probe_kernel",
    "gather_facts",
    "lab_need",
    "probe_from_facts",
    "probe_host",
    "render_findings",
]

LOCAL_HOSTS = frozenset({None, "", "localhost", "127.0.0.1", "::1"})
ACCELERATION_TIMEOUT = 30.0  # s per probe guest; Linux under working KVM takes 1-3 s
NO_KERNEL = "no Linux kernel was given to boot"


def decide(facts: AccelerationFacts) -> Decision:
    """How the lab's domains run, and what nova-compute on its compute nodes uses.

    * no KVM guest ran: domain type qemu (TCG), virt_type qemu, no CPU passthrough;
    * KVM runs and nests: domain type kvm, virt_type kvm, host-passthrough CPU (with vmx/svm);
    * KVM runs but does not nest: domain type kvm, virt_type qemu (instances under TCG).
    """
    if not facts.kvm_guest_ran:
        return Decision(Acceleration.TCG, VirtType.QEMU, False, DomainType.QEMU)
    if facts.nested is True:
        return Decision(Acceleration.KVM, VirtType.KVM, True, DomainType.KVM)
    return Decision(Acceleration.KVM, VirtType.QEMU, False, DomainType.KVM)


def probe_from_facts(facts: HostProbeFacts, seconds: float = 0.0) -> HostProbe:
    decision = decide(facts.acceleration)
    return HostProbe(
        uri=facts.uri,
        findings=findings(facts, decision),
        acceleration=decision.acceleration,
        nested=facts.nested.enabled,
        virt_type=decision.virt_type,
        cpu_passthrough=decision.cpu_passthrough,
        domain_type=decision.domain_type,
        libvirt_version=facts.libvirt_version,
        qemu_version=facts.qemu_version,
        seconds=seconds,
    )


def probe_host(
    uri: str,
    *,
    storage: Path,
    acceleration_timeout: float = ACCELERATION_TIMEOUT,
    kernel: Path | None = None,
) -> HostProbe:
    """Probe this host for a lab at libvirt ``uri`` whose disks go to ``storage``.

    ``kernel`` is a Linux bzImage (``find_probe_kernel``) for the KVM proof: KVM counts as
    working only if it boots that kernel to mounting its root file system. Without it, only
    the real-mode boot sector is proven (and the acceleration finding says so).
    ``acceleration_timeout`` is how long each KVM probe guest gets, once libvirt has started
    it, to print its marker; starting it (libvirt's ``createXML``) is not counted. Never
    raises for what it finds (an unreachable libvirt is a failed finding), only for bugs.
    """
    started = time.monotonic()
    facts = gather_facts(
        uri, storage=storage, acceleration_timeout=acceleration_timeout, kernel=kernel
    )
    return probe_from_facts(facts, time.monotonic() - started)


def gather_facts(
    uri: str,
    *,
    storage: Path,
    acceleration_timeout: float = ACCELERATION_TIMEOUT,
    kernel: Path | None = None,
) -> HostProbeFacts:
    dev_kvm = hostprobe.read_dev_kvm()
    libvirt_version: str | None = None
    qemu_version: str | None = None
    libvirt_error: str | None = None
    networks: tuple[LibvirtNetworkFact, ...] | None = None
    boot: BootResult | None = None
    linux: BootResult | None = None
    not_tried: str | None = None
    linux_not_tried: str | None = NO_KERNEL if kernel is None else "KVM was not tested"
    try:
        conn = lv.connect(uri)
    except HypervisorError as err:
        libvirt_error, not_tried = err.message, "libvirt is not reachable"
    else:
        try:
            libvirt_version, qemu_version = hostprobe.libvirt_versions(conn)
            networks = lv.network_facts(conn)
            if urlsplit(uri).hostname not in LOCAL_HOSTS:
                not_tried = f"{uri} is another host; the probe guest's files are local"
            elif not dev_kvm.exists:
                not_tried = "there is no /dev/kvm"
            else:
                probeguest.sweep_stale_probe_guests(conn)
                boot = probeguest.boot_probe_guest(
                    conn, domain_type=DomainType.KVM, timeout=acceleration_timeout
                )
                linux, linux_not_tried = _boot_linux(conn, boot, kernel, acceleration_timeout)
        except HypervisorError as err:
            libvirt_error = f"libvirt at {uri} failed: {err.detail or err.message}"
            not_tried = not_tried or "libvirt failed"
        finally:
            conn.close()
    return HostProbeFacts(
        uri=uri,
        libvirt_version=libvirt_version,
        qemu_version=qemu_version,
        libvirt_error=libvirt_error,
        dev_kvm=dev_kvm,
        kvm_boot=boot,
        kvm_not_tried=not_tried,
        kvm_linux=linux,
        linux_not_tried=None if linux is not None else linux_not_tried,
        kvm_modules=hostprobe.read_kvm_modules(),
        nested=hostprobe.read_nested(),
        cpus=os.cpu_count(),
        memory_available=hostfacts.read_memory_available(),
        storage=storage,
        disk_path=hostfacts.existing_parent(storage),
        disk_free=shutil.disk_usage(hostfacts.existing_parent(storage)).free,
        routes=hostfacts.read_routes(),
        libvirt_networks=networks,
        mirrors=tuple(
            [hostprobe.resolve("apt source", host) for host in hostfacts.apt_source_hosts()]
            + [hostprobe.resolve("apt proxy", host) for host in hostprobe.apt_proxy_hosts()]
        ),
        nameservers=tuple(hostfacts.nameservers()),
        labs=tuple(lab_need(load_builtin_lab(name)) for name in builtin_lab_names()),
        ksm=hostprobe.read_ksm(),
    )


def _boot_linux(
    conn: Any, boot: BootResult, kernel: Path | None, timeout: float
) -> tuple[BootResult | None, str | None]:
    """The Linux proof after the boot sector's, or why it was not tried."""
    if kernel is None:
        return None, NO_KERNEL
    if not boot.marker_seen:
        return None, "the boot sector did not run"
    try:
        return probeguest.boot_probe_guest(
            conn, domain_type=DomainType.KVM, timeout=timeout, kernel=kernel
        ), None
    except OSError as err:  # copying the kernel: a missing or unreadable file, a full disk
        return None, f"the kernel {kernel} could not be copied for a probe guest: {err}"


def lab_need(lab: Lab) -> LabNeed:
    return LabNeed(
        name=lab.name,
        memory=sum(node.memory for node in lab.nodes),
        disk=sum(node.disk + sum(d.size for d in node.extra_disks) for node in lab.nodes),
        vcpus=sum(node.vcpus for node in lab.nodes),
        max_node_vcpus=max((node.vcpus for node in lab.nodes), default=0),
    )
