"""Boot a transient probe guest to find out whether a libvirt domain type really runs guests.

``/dev/kvm`` existing, and libvirt saying it supports domain type ``kvm``, do not prove that a
KVM guest runs: QEMU may not be allowed to open ``/dev/kvm``, or KVM may fail on the first
instruction. ``boot_probe_guest`` boots one of two guests, with COM1 logged to a file, and waits
for a marker in that log:

* a 512-byte boot sector (``boot_sector``) that writes ``MARKER`` to COM1 and halts. Quick
  (well under a second), but it proves only 16-bit real mode: a host whose KVM runs it may
  still fail a 64-bit Linux kernel (a KVM that cannot emulate ``lock cmpxchg16b`` pauses the
  guest with "KVM internal error ... emulation failure"; others hang while decompressing);
* with ``kernel``: that Linux kernel (a bzImage, e.g. a built image's direct-boot ``vmlinuz``),
  with no disk and no initrd, on ``KERNEL_CMDLINE`` (``root=/dev/null``). The proof is the
  kernel reaching the point where it mounts its root file system, after all its initcalls
  (CPU and memory setup, ACPI, timers, drivers): one of ``LINUX_MARKERS`` on the serial port,
  "VFS: Cannot open root device" / "VFS: Unable to mount root fs" as it has no root device
  (or "Run /init as init process" and friends, should a kernel find an init). "Kernel panic"
  alone is not a marker: an early crash panics too. With ``panic=-1`` the kernel then reboots
  at once and ``<on_reboot>destroy</on_reboot>`` ends the guest. Under working KVM that takes
  1-3 s, under TCG a few seconds to a minute.

The guest is transient (``createXML``), named ``lbprobe-<type>-<pid>-<random>``, has no disk
but the boot sector and no network, and its files (boot sector or a copy of the kernel, serial
log) live in a temporary directory ``lbprobe-<pid>-<random>``. It is destroyed, the directory
removed and libvirt's QEMU log of it taken (read, then deleted) whatever happens, also on a
timeout or an exception; ``sweep_stale_probe_guests`` clears what a killed probe left.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import stat
import struct
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import libvirt

from labbuilder.adapters.libvirterrors import translated
from labbuilder.adapters.processes import process_alive
from labbuilder.libvirtxml.render import Disk, Domain, Serial, domain_xml
from labbuilder.model.probe import BootResult, Proof

MARKER = b"LBPROBE-OK"
LINUX_MARKERS = (
    b"VFS: Cannot open root device",
    b"VFS: Unable to mount root fs",
    b"Run /init as init process",
    b"Run /sbin/init as init process",
    b"No working init found",
)
# earlyprintk: the kernel's setup code writes to COM1 at once, so a Linux that runs is never
# silent for long (under TCG it reaches its root mount in about 2 s here).
KERNEL_CMDLINE = "earlyprintk=serial,ttyS0,115200 console=ttyS0 panic=-1 root=/dev/null"
# A Linux probe guest whose serial port gains nothing for this long has stalled: the answer is
# in, and a guest spinning in KVM stops taking a host core from the lab's image builds.
LINUX_QUIET_SECONDS = 10.0
NAME_PREFIX = "lbprobe-"
MEMORY_MIB = 16
KERNEL_MEMORY_MIB = 256
_POLL_SECONDS = 0.05
_NAME = re.compile(rf"^{NAME_PREFIX}[a-z]+-(\d+)-[0-9a-f]+$")
_WORKDIR = re.compile(rf"^{NAME_PREFIX}(\d+)-[A-Za-z0-9_]+$")
_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT[\d:.]+Z ")
_LIBVIRT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+\+\d{4}: ")
# QEMU's register dump after "KVM internal error": "RAX=..", "ES =..", "Code=..", "extra data[0]:"
_REGISTER_DUMP = re.compile(r"^(?:[A-Z][A-Z0-9]{1,4}\s*=|Code=|extra data\[\d+\]:)")
_LINUX_VERSION = re.compile(rb"Linux version (\S+)")
_ESCAPE = re.compile(r"\x1b(?:\[[0-9;?]*[A-Za-z]|[()][0-9A-Za-z]|[78=>c])")
_KERNEL_TIME = re.compile(r"^\[\s*\d+\.\d+\]\s*")
_LAST_LINE_CHARS = 120
QEMU_LOG_DIRS = (Path("/var/log/libvirt/qemu"), Path.home() / ".cache/libvirt/qemu/log")
_STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: "no state",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "blocked",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutting down",
    libvirt.VIR_DOMAIN_SHUTOFF: "shut off",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended",
}
_PAUSED = {
    libvirt.VIR_DOMAIN_PAUSED_UNKNOWN: "reason unknown: QEMU stopped it, e.g. on a KVM error",
    libvirt.VIR_DOMAIN_PAUSED_USER: "by a user",
    libvirt.VIR_DOMAIN_PAUSED_IOERROR: "on an I/O error",
    libvirt.VIR_DOMAIN_PAUSED_WATCHDOG: "by its watchdog",
    libvirt.VIR_DOMAIN_PAUSED_CRASHED: "crashed",
}


class Waited(NamedTuple):
    """How waiting for a probe guest's marker ended."""

    marker: bytes | None  # the marker found in the serial log; None: not found
    stopped: str | None  # how the guest stopped without it ("was paused (...)"); None: timeout
    seconds: float  # from the start of waiting to the marker, the stop or the deadline
    output: bytes  # the serial log as last read
    quiet: float | None = None  # it ended because the log gained nothing for this many seconds


def boot_sector(marker: bytes = MARKER) -> bytes:
    """A 512-byte MBR boot sector: 16-bit real-mode code that writes ``marker`` and CR LF to
    the COM1 data port (0x3F8), then halts forever. An empty marker writes only CR LF.

    The BIOS loads it at 0x7C00; the code sets DS to 0 and addresses the text absolutely, so it
    runs whether the BIOS jumps to 0000:7C00 or 07C0:0000.
    """
    base = 0x7C00
    code = bytearray()
    code += b"\xfa"  # cli
    code += b"\xfc"  # cld
    code += b"\x31\xc0"  # xor ax, ax
    code += b"\x8e\xd8"  # mov ds, ax
    text_operand = len(code) + 1
    code += b"\xbe\x00\x00"  # mov si, <text>        (patched below)
    code += b"\xba\xf8\x03"  # mov dx, 0x3f8         (COM1 transmit register)
    loop = len(code)
    code += b"\xac"  # lodsb                         (al = [ds:si++])
    code += b"\x84\xc0"  # test al, al
    code += b"\x74\x03"  # jz halt                  (skips the next 3 bytes)
    code += b"\xee"  # out dx, al
    code += bytes([0xEB, (loop - (len(code) + 2)) & 0xFF])  # jmp loop
    halt = len(code)
    code += b"\xf4"  # hlt
    code += bytes([0xEB, (halt - (len(code) + 2)) & 0xFF])  # jmp halt
    code[text_operand : text_operand + 2] = struct.pack("<H", base + len(code))
    code += marker + b"\r\n\x00"
    if len(code) > 510:
        raise ValueError(f"marker too long for a boot sector: {len(marker)} bytes")
    return bytes(code.ljust(510, b"\x00")) + b"\x55\xaa"


def probe_domain_xml(name: str, domain_type: str, disk: Path, serial_log: Path) -> str:
    """Domain XML of a boot-sector probe guest: 16 MiB, one vCPU, one IDE disk, COM1 to a
    file, no NIC."""
    domain = Domain(
        type=domain_type,
        name=name,
        memory=MEMORY_MIB,
        memory_unit="MiB",
        platform=False,
        on_reboot="destroy",
        disks=(Disk("hda", "raw", file=str(disk), bus="ide"),),
        serials=(Serial(0, file=str(serial_log)),),
        console=False,
        rng=False,
    )
    return domain_xml(domain)


def kernel_domain_xml(
    name: str, domain_type: str, kernel: Path, serial_log: Path, cmdline: str = KERNEL_CMDLINE
) -> str:
    """Domain XML of a Linux probe guest: the lab nodes' machine (pc, ACPI, APIC, the default
    CPU model, one vCPU) with 256 MiB, direct kernel boot of ``kernel`` without initrd, no
    disk, no NIC, COM1 to a file; a reboot (``panic=-1``) destroys it."""
    domain = Domain(
        type=domain_type,
        name=name,
        memory=KERNEL_MEMORY_MIB,
        memory_unit="MiB",
        kernel=str(kernel),
        cmdline=cmdline,
        on_reboot="destroy",
        serials=(Serial(0, file=str(serial_log)),),
        console=False,
        rng=False,
    )
    return domain_xml(domain)


def probe_name(domain_type: str) -> str:
    return f"{NAME_PREFIX}{domain_type}-{os.getpid()}-{secrets.token_hex(3)}"


@translated
def boot_probe_guest(
    conn: Any,
    *,
    domain_type: str,
    timeout: float,
    sector: bytes | None = None,
    kernel: Path | None = None,
    parent: Path | None = None,
) -> BootResult:
    """Boot a probe guest of ``domain_type`` and wait up to ``timeout`` seconds, counted from
    the moment libvirt has started it, for its marker in its serial log: the boot sector's
    ``MARKER``, or with ``kernel`` one of ``LINUX_MARKERS`` (see the module's doc).

    ``sector`` replaces the boot sector (tests use a silent one); ``parent`` is where the
    temporary directory goes (default: the system's temporary directory). Never raises for a
    guest that does not run: that is the answer, in ``BootResult.reason``; a ``kernel`` that
    cannot be read raises OSError.
    """
    name = probe_name(domain_type)
    workdir = Path(tempfile.mkdtemp(prefix=_workdir_prefix(), dir=parent or _default_parent()))
    try:
        if kernel is None:
            result = _boot_sector(conn, name, domain_type, timeout, workdir, sector)
        else:
            result = _boot_kernel(conn, name, domain_type, timeout, workdir, kernel)
    finally:
        try:
            destroy_probe_guest(conn, name)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
            qemu_says = take_qemu_log(name)
    if not result.marker_seen and qemu_says and qemu_says not in result.reason:
        result = replace(result, reason=f"{result.reason} (QEMU's log: {qemu_says})")
    return result


def _boot_sector(
    conn: Any, name: str, domain_type: str, timeout: float, workdir: Path, sector: bytes | None
) -> BootResult:
    # QEMU opens the disk as its own user (libvirt-qemu on Debian): let it traverse.
    workdir.chmod(0o711)
    disk, serial_log = workdir / "boot.raw", workdir / "serial.log"
    disk.write_bytes(sector if sector is not None else boot_sector())
    xml = probe_domain_xml(name, domain_type, disk, serial_log)
    started = time.monotonic()
    try:
        domain = conn.createXML(xml, 0)
    except libvirt.libvirtError as err:
        reason = _creation_failure(domain_type, err)
        return BootResult(domain_type, False, reason, time.monotonic() - started, 0.0)
    running = time.monotonic()
    waited = _wait_for_marker(domain, serial_log, running + timeout, (MARKER,))
    return BootResult(
        domain_type,
        waited.marker is not None,
        sector_reason(waited),
        running - started,
        time.monotonic() - running,
    )


def _boot_kernel(
    conn: Any, name: str, domain_type: str, timeout: float, workdir: Path, kernel: Path
) -> BootResult:
    # A copy: QEMU (as libvirt-qemu) may not reach the image cache (~root/.cache is 0700), and
    # libvirt's DAC driver chowns the kernel it boots while the guest runs.
    workdir.chmod(0o711)
    copy, serial_log = workdir / "vmlinuz", workdir / "serial.log"
    shutil.copyfile(kernel, copy)
    copy.chmod(0o644)
    xml = kernel_domain_xml(name, domain_type, copy, serial_log)
    started = time.monotonic()
    try:
        domain = conn.createXML(xml, 0)
    except libvirt.libvirtError as err:
        reason = _creation_failure(domain_type, err)
        return BootResult(domain_type, False, reason, time.monotonic() - started, 0.0, Proof.LINUX)
    running = time.monotonic()
    waited = _wait_for_marker(
        domain, serial_log, running + timeout, LINUX_MARKERS, quiet=LINUX_QUIET_SECONDS
    )
    return BootResult(
        domain_type,
        waited.marker is not None,
        linux_reason(waited, kernel),
        running - started,
        time.monotonic() - running,
        Proof.LINUX,
    )


def sector_reason(waited: Waited) -> str:
    """How the boot-sector guest ran, or why it did not, in words."""
    marker = MARKER.decode()
    if waited.marker is not None:
        return f"printed {marker} {waited.seconds:.1f} s after start"
    if waited.stopped is not None:
        return f"the guest {waited.stopped} before printing its marker"
    return f"no {marker} on the serial port within {waited.seconds:.1f} s"


def linux_reason(waited: Waited, kernel: Path) -> str:
    """How the Linux guest ran, or why it did not, in words: the kernel's version, the marker
    or how far it got (its last line on the serial port)."""
    found = _LINUX_VERSION.search(waited.output)
    linux = f"Linux {found.group(1).decode(errors='replace')}" if found else "Linux"
    if waited.marker is not None:
        return (
            f"booted {linux} ({kernel}) to mounting its root file system "
            f'("{waited.marker.decode()}") {waited.seconds:.1f} s after start'
        )
    last = last_line(waited.output)
    progress = (
        f'its last line on the serial port: "{last}"' if last else "the serial port stayed silent"
    )
    if waited.stopped is not None:
        how = f": the guest {waited.stopped} {waited.seconds:.1f} s after start"
    elif waited.quiet is not None:
        how = (
            f": its serial port gained nothing for {waited.quiet:.0f} s "
            f"({waited.seconds:.1f} s after start)"
        )
    else:
        how = f" within {waited.seconds:.1f} s"
    return f"{linux} ({kernel}) did not get to mounting its root file system{how}; {progress}"


def last_line(output: bytes) -> str:
    """The last non-empty line of a serial log, without terminal escapes, control characters
    and the kernel's timestamp, shortened to ``_LAST_LINE_CHARS``."""
    text = _ESCAPE.sub("", output.decode(errors="replace"))
    lines = [
        _KERNEL_TIME.sub("", "".join(c for c in line if c.isprintable())).strip()
        for line in text.replace("\r", "\n").split("\n")
    ]
    last = next((line for line in reversed(lines) if line), "")
    if len(last) > _LAST_LINE_CHARS:
        last = last[: _LAST_LINE_CHARS - 3] + "..."
    return last


def take_qemu_log(name: str) -> str:
    """QEMU's own messages from libvirt's log of the probe guest ``name``, which is removed:
    libvirt's error can hide them ("failed to connect to monitor socket")."""
    for folder in QEMU_LOG_DIRS:
        path = folder / f"{name}.log"
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        with contextlib.suppress(OSError):
            path.unlink()
        return qemu_messages(text)
    return ""


def qemu_messages(log: str) -> str:
    """The lines of a libvirt QEMU log that QEMU wrote, without libvirt's own lines, the
    command line, timestamps, the signal libvirt stopped it with, or the register dump after a
    "KVM internal error" (its "emulation failure" line stays)."""
    lines: dict[str, None] = {}
    for raw in log.splitlines():
        line = _TIMESTAMP.sub("", raw).strip()
        if (
            not line
            or _LIBVIRT_LINE.match(line)
            or line.endswith("\\")
            or line.startswith(("-", "/"))
            or "terminating on signal" in line
            or _REGISTER_DUMP.match(line)
        ):
            continue
        lines[line] = None
    return " ".join(lines)


def _default_parent() -> Path:
    """The temporary directory, if QEMU's user can traverse to it; else /tmp."""
    parent = Path(tempfile.gettempdir()).resolve()
    for folder in (parent, *parent.parents):
        if not folder.stat().st_mode & stat.S_IXOTH:
            return Path("/tmp")
    return parent


def _creation_failure(domain_type: str, err: Any) -> str:
    # QEMU's stderr comes with timestamps ("2026-01-01T10:00:00.123456Z qemu-system-x86_64:").
    message = " ".join(_TIMESTAMP.sub("", str(err.get_error_message())).split())
    code = err.get_error_code()
    if code in (libvirt.VIR_ERR_CONFIG_UNSUPPORTED, libvirt.VIR_ERR_NO_SUPPORT):
        return f"libvirt does not support domain type {domain_type} here: {message}"
    if code in (libvirt.VIR_ERR_OPERATION_DENIED, libvirt.VIR_ERR_AUTH_FAILED):
        return f"libvirt refused to start a guest (permission): {message}"
    return f"libvirt could not start a guest with domain type {domain_type}: {message}"


def _wait_for_marker(
    domain: Any,
    serial_log: Path,
    deadline: float,
    markers: tuple[bytes, ...],
    *,
    quiet: float | None = None,
) -> Waited:
    """Poll the serial log for any of ``markers`` until the guest stops or ``deadline``, or
    with ``quiet`` until the log has gained nothing for that many seconds."""
    started = changed = time.monotonic()
    seen = -1
    while True:
        output = _read(serial_log)
        if len(output) != seen:
            seen, changed = len(output), time.monotonic()
        marker = _first_marker(output, markers)
        if marker is not None:
            return Waited(marker, None, time.monotonic() - started, output)
        stopped = _stopped(domain)
        if stopped is not None:
            # It may have printed the marker and rebooted (panic=-1) since the log was read.
            output = _read(serial_log)
            marker = _first_marker(output, markers)
            return Waited(marker, None if marker else stopped, time.monotonic() - started, output)
        now = time.monotonic()
        if now >= deadline:
            return Waited(None, None, now - started, output)
        if quiet is not None and now - changed >= quiet:
            return Waited(None, None, now - started, output, quiet)
        time.sleep(_POLL_SECONDS)


def _read(serial_log: Path) -> bytes:
    try:
        return serial_log.read_bytes()
    except FileNotFoundError:
        return b""


def _first_marker(output: bytes, markers: tuple[bytes, ...]) -> bytes | None:
    found = [(output.find(marker), marker) for marker in markers if marker in output]
    return min(found)[1] if found else None


def _stopped(domain: Any) -> str | None:
    """How the guest stopped ("was paused (...)", "is gone (...)"); None while it runs."""
    try:
        state, why = domain.state()
    except libvirt.libvirtError as err:
        if err.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            raise
        return "is gone (it rebooted, powered off or crashed: each destroys a probe guest)"
    if state in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED):
        return None
    if state == libvirt.VIR_DOMAIN_PAUSED:
        return f"was paused ({_PAUSED.get(why, f'reason {why}')})"
    return f"stopped ({_STATES.get(state, str(state))}, reason {why})"


@translated
def destroy_probe_guest(conn: Any, name: str) -> None:
    """Destroy the probe guest ``name`` if it (still) exists. Transient: that removes it."""
    try:
        conn.lookupByName(name).destroy()
    except libvirt.libvirtError as err:
        if err.get_error_code() not in (
            libvirt.VIR_ERR_NO_DOMAIN,
            libvirt.VIR_ERR_OPERATION_INVALID,  # no longer running
        ):
            raise


@translated
def probe_guests(conn: Any) -> list[str]:
    """Names of the probe guests that exist at ``conn``."""
    return sorted(d.name() for d in conn.listAllDomains() if d.name().startswith(NAME_PREFIX))


@translated
def sweep_stale_probe_guests(conn: Any, parent: Path | None = None) -> list[str]:
    """Destroy probe guests left by probes whose process is gone (killed -9, host crash), and
    remove their QEMU logs and their temporary directories in ``parent`` (default: the
    system's temporary directory). Returns the guests destroyed.

    Only meaningful for a local libvirt: the pid in the name is a pid on this host.
    """
    swept = []
    for name in probe_guests(conn):
        match = _NAME.match(name)
        if match and not process_alive(int(match.group(1))):
            destroy_probe_guest(conn, name)
            swept.append(name)
    for folder in QEMU_LOG_DIRS:
        for log in _glob(folder, f"{NAME_PREFIX}*.log"):
            match = _NAME.match(log.name.removesuffix(".log"))
            if match and not process_alive(int(match.group(1))):
                with contextlib.suppress(OSError):
                    log.unlink()
    for workdir in _glob(parent or _default_parent(), f"{NAME_PREFIX}*-*"):
        match = _WORKDIR.match(workdir.name)
        if match and workdir.is_dir() and not process_alive(int(match.group(1))):
            shutil.rmtree(workdir, ignore_errors=True)
    return swept


def _workdir_prefix() -> str:
    return f"{NAME_PREFIX}{os.getpid()}-"


def _glob(folder: Path, pattern: str) -> list[Path]:
    try:
        return list(folder.glob(pattern))
    except OSError:
        return []
