"""The host probe's model: what ``labbuilder doctor`` found (``Finding``, ``HostProbe``) and the
facts it found them from (``HostProbeFacts``). Frozen dataclasses and enums; no I/O.

``labbuilder.host.probe`` decides and orchestrates, ``labbuilder.host.findings`` words the findings,
``labbuilder.adapters.hostprobe`` and ``labbuilder.adapters.probeguest`` gather the facts.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import NamedTuple

from labbuilder.model.lab import HostRoute, LibvirtNetworkFact


class Status(StrEnum):
    OK = "ok"
    WARN = "warn"  # a lab works, but slower or only with an option (--auto-subnets, ...)
    FAIL = "fail"  # a lab cannot be built until this is fixed


class Acceleration(StrEnum):
    """How the lab's domains run on this host."""

    KVM = "kvm"  # hardware-assisted, through /dev/kvm
    TCG = "tcg"  # QEMU's software emulation


class VirtType(StrEnum):
    """nova-compute's ``[libvirt] virt_type`` on the lab's compute nodes."""

    KVM = "kvm"
    QEMU = "qemu"


class DomainType(StrEnum):
    """``<domain type=...>`` of the lab's libvirt domains."""

    KVM = "kvm"
    QEMU = "qemu"


@dataclass(frozen=True)
class Finding:
    """One thing ``labbuilder doctor`` checked."""

    name: str  # "libvirt", "acceleration", "nested virtualization", "memory", ...
    status: Status
    detail: str  # what was found, with numbers and versions
    consequence: str  # what follows for a lab
    fix: str | None = None  # the exact command to run, when there is one


@dataclass(frozen=True)
class HostProbe:
    """The answer of ``probe_host``: the findings, and the choices a lab on this host gets."""

    uri: str
    findings: tuple[Finding, ...]
    acceleration: Acceleration
    nested: bool | None  # None: could not be told (the KVM module is not loaded)
    virt_type: VirtType
    cpu_passthrough: bool  # compute nodes get <cpu mode="host-passthrough"/>
    domain_type: DomainType
    libvirt_version: str | None  # None: libvirt was not reachable
    qemu_version: str | None
    seconds: float = 0.0  # how long the probe took

    @property
    def status(self) -> Status:
        """The worst status among the findings."""
        statuses = {finding.status for finding in self.findings}
        for status in (Status.FAIL, Status.WARN):
            if status in statuses:
                return status
        return Status.OK

    def finding(self, name: str) -> Finding:
        return next(finding for finding in self.findings if finding.name == name)


class Proof(StrEnum):
    """What a probe guest ran (``labbuilder.adapters.probeguest``)."""

    REAL_MODE = "real mode"  # a 512-byte boot sector: 16-bit real-mode code printed a marker
    LINUX = "linux"  # a 64-bit Linux kernel booted to mounting its root file system


class Decision(NamedTuple):
    """What ``decide`` makes of the acceleration facts."""

    acceleration: Acceleration
    virt_type: VirtType
    cpu_passthrough: bool
    domain_type: DomainType


# --- facts ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AccelerationFacts:
    """The two facts the acceleration decision rests on."""

    kvm_guest_ran: bool  # a domain of type kvm ran the probe: Linux when tried, else real mode
    nested: bool | None  # the host's KVM offers VT-x/AMD-V to its guests


@dataclass(frozen=True)
class BootResult:
    """What happened to one probe guest (``labbuilder.adapters.probeguest``)."""

    domain_type: str  # "kvm" or "qemu"
    marker_seen: bool
    reason: str  # how it ran, or why it did not
    start_seconds: float  # how long libvirt took to start it (createXML)
    run_seconds: float  # from start to the marker, or to giving up
    proof: Proof = Proof.REAL_MODE  # what it ran


@dataclass(frozen=True)
class DevKvm:
    """``/dev/kvm`` as the file system shows it."""

    exists: bool
    mode: int = 0  # permission bits
    owner: str = ""
    group: str = ""
    path: str = "/dev/kvm"

    def describe(self) -> str:
        if not self.exists:
            return f"no {self.path}"
        return f"{self.path} {_mode_string(self.mode)} {self.owner}:{self.group}"

    @property
    def root_only(self) -> bool:
        """Only root may open it: QEMU run by libvirt as its own user (libvirt-qemu) may not."""
        return self.exists and self.owner == "root" and not self.mode & 0o066


def _mode_string(mode: int) -> str:
    bits = "".join(
        flag if mode & (1 << (8 - index)) else "-" for index, flag in enumerate("rwxrwxrwx")
    )
    return "c" + bits


@dataclass(frozen=True)
class KsmFacts:
    """The kernel's same-page merging (``/sys/kernel/mm/ksm``); ``run`` None: no KSM."""

    run: int | None  # 0 stopped, 1 running, 2 unmerging
    pages_sharing: int = 0  # guest pages that point at a shared page (what is saved)
    pages_shared: int = 0


@dataclass(frozen=True)
class NestedFacts:
    """Whether the host's KVM module offers VT-x/AMD-V to its guests."""

    cpu_flag: str | None  # "vmx" or "svm" when /proc/cpuinfo lists it
    module: str | None  # "kvm_intel" or "kvm_amd", after the flag
    parameter: str | None  # the module's ``nested`` parameter; None: module not loaded

    @property
    def enabled(self) -> bool | None:
        if self.cpu_flag is None:
            return False
        if self.parameter is None:
            return None
        return self.parameter.strip().upper() in ("Y", "1")


@dataclass(frozen=True)
class Resolved:
    """A host name the host needs (package mirror, proxy) and the IPv4 addresses it has."""

    what: str  # "apt source", "apt proxy"
    host: str
    addresses: tuple[str, ...]
    error: str | None = None  # why it could not be resolved


@dataclass(frozen=True)
class LabNeed:
    """What a built-in lab needs from the host, to word capacity findings."""

    name: str
    memory: int  # bytes, all nodes together
    disk: int  # bytes the disks can grow to, all together
    vcpus: int  # all nodes together
    max_node_vcpus: int


@dataclass(frozen=True)
class HostProbeFacts:
    """Everything ``probe_host`` gathered. ``None`` means: could not be found out."""

    uri: str
    libvirt_version: str | None = None
    qemu_version: str | None = None
    libvirt_error: str | None = None  # None: libvirt was reachable
    dev_kvm: DevKvm = DevKvm(exists=False)
    kvm_boot: BootResult | None = None  # the boot sector; None: not tried (``kvm_not_tried``)
    kvm_not_tried: str | None = None
    kvm_linux: BootResult | None = None  # the Linux kernel; None: not tried (``linux_not_tried``)
    linux_not_tried: str | None = None
    kvm_modules: tuple[str, ...] = ()  # the loaded kernel modules named kvm*
    nested: NestedFacts = NestedFacts(None, None, None)
    cpus: int | None = None
    memory_available: int | None = None  # bytes
    storage: Path = Path("/")  # where the lab's disks go
    disk_path: Path = Path("/")  # where the free space was measured: ``storage`` or a parent
    disk_free: int | None = None  # bytes
    routes: tuple[HostRoute, ...] = ()
    libvirt_networks: tuple[LibvirtNetworkFact, ...] | None = None
    mirrors: tuple[Resolved, ...] = ()
    nameservers: tuple[str, ...] = ()
    labs: tuple[LabNeed, ...] = ()
    ksm: KsmFacts = KsmFacts(None)

    @property
    def acceleration(self) -> AccelerationFacts:
        """KVM runs guests when the boot sector ran and, if a Linux kernel was booted too, so
        did Linux: the Linux proof overrules the real-mode one."""
        ran = self.kvm_boot is not None and self.kvm_boot.marker_seen
        if ran and self.kvm_linux is not None:
            ran = self.kvm_linux.marker_seen
        return AccelerationFacts(kvm_guest_ran=ran, nested=self.nested.enabled)
