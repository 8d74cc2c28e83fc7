"""Boot a tiny transient guest to find out whether a libvirt domain type really runs guests.

``/dev/kvm`` existing, and libvirt saying it supports domain type ``kvm``, do not prove that a
KVM guest runs: QEMU may not be allowed to open ``/dev/kvm``, or KVM may fail on the first
instruction. ``boot_probe_guest`` boots a 512-byte boot sector (``boot_sector``) that writes
``MARKER`` to COM1 and halts, with COM1 logged to a file, and waits for the marker.

The guest is transient (``createXML``), named ``lbprobe-<type>-<pid>-<random>``, has 16 MiB of
memory and no network, and lives in a temporary directory. It is destroyed and the directory
removed whatever happens, also on a timeout or an exception.
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
from typing import Any
from xml.sax.saxutils import escape, quoteattr

import libvirt

from labbuilder.probemodel import BootResult

MARKER = b"LBPROBE-OK"
NAME_PREFIX = "lbprobe-"
MEMORY_MIB = 16
_POLL_SECONDS = 0.05
_NAME = re.compile(rf"^{NAME_PREFIX}[a-z]+-(\d+)-[0-9a-f]+$")
_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT[\d:.]+Z ")
_LIBVIRT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+\+\d{4}: ")
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
    """Domain XML of a probe guest: 16 MiB, one vCPU, one IDE disk, COM1 to a file, no NIC."""
    return f"""<domain type={quoteattr(domain_type)}>
  <name>{escape(name)}</name>
  <memory unit="MiB">{MEMORY_MIB}</memory>
  <vcpu>1</vcpu>
  <os><type arch="x86_64" machine="pc">hvm</type><boot dev="hd"/></os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type="file" device="disk">
      <driver name="qemu" type="raw"/>
      <source file={quoteattr(str(disk))}/>
      <target dev="hda" bus="ide"/>
    </disk>
    <serial type="file">
      <source path={quoteattr(str(serial_log))}/>
      <target port="0"/>
    </serial>
    <memballoon model="none"/>
  </devices>
</domain>"""


def probe_name(domain_type: str) -> str:
    return f"{NAME_PREFIX}{domain_type}-{os.getpid()}-{secrets.token_hex(3)}"


def boot_probe_guest(
    conn: Any,
    *,
    domain_type: str,
    timeout: float,
    sector: bytes | None = None,
    parent: Path | None = None,
) -> BootResult:
    """Boot a probe guest of ``domain_type`` and wait up to ``timeout`` seconds, counted from
    the moment libvirt has started it, for ``MARKER`` in its serial log.

    ``sector`` replaces the boot sector (tests use a silent one); ``parent`` is where the
    temporary directory goes (default: the system's temporary directory). Never raises for a
    guest that does not run: that is the answer, in ``BootResult.reason``.
    """
    name = probe_name(domain_type)
    workdir = Path(tempfile.mkdtemp(prefix=NAME_PREFIX, dir=parent or _default_parent()))
    try:
        result = _boot(conn, name, domain_type, timeout, workdir, sector)
    finally:
        try:
            destroy_probe_guest(conn, name)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
            qemu_says = take_qemu_log(name)
    if not result.marker_seen and qemu_says and qemu_says not in result.reason:
        result = replace(result, reason=f"{result.reason} (QEMU's log: {qemu_says})")
    return result


def _boot(
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
    seen, reason = _wait_for_marker(domain, serial_log, running + timeout)
    return BootResult(domain_type, seen, reason, running - started, time.monotonic() - running)


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
    command line, timestamps, or the signal libvirt stopped it with."""
    lines: dict[str, None] = {}
    for raw in log.splitlines():
        line = _TIMESTAMP.sub("", raw).strip()
        if (
            not line
            or _LIBVIRT_LINE.match(line)
            or line.endswith("\\")
            or line.startswith(("-", "/"))
            or "terminating on signal" in line
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


def _wait_for_marker(domain: Any, serial_log: Path, deadline: float) -> tuple[bool, str]:
    started = time.monotonic()
    while True:
        if serial_log.exists() and MARKER in serial_log.read_bytes():
            return True, f"printed {MARKER.decode()} {time.monotonic() - started:.1f} s after start"
        try:
            state, why = domain.state()
        except libvirt.libvirtError as err:
            if err.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise
            return False, "the guest disappeared before printing its marker"
        if state not in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED):
            name = _STATES.get(state, str(state))
            return False, f"the guest stopped ({name}, reason {why}) before printing its marker"
        if time.monotonic() >= deadline:
            waited = time.monotonic() - started
            return False, f"no {MARKER.decode()} on the serial port within {waited:.1f} s"
        time.sleep(_POLL_SECONDS)


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


def probe_guests(conn: Any) -> list[str]:
    """Names of the probe guests that exist at ``conn``."""
    return sorted(d.name() for d in conn.listAllDomains() if d.name().startswith(NAME_PREFIX))


def sweep_stale_probe_guests(conn: Any) -> list[str]:
    """Destroy probe guests left by probes whose process is gone (killed -9, host crash).

    Only meaningful for a local libvirt: the pid in the name is a pid on this host.
    """
    swept = []
    for name in probe_guests(conn):
        match = _NAME.match(name)
        if match and not _process_alive(int(match.group(1))):
            destroy_probe_guest(conn, name)
            swept.append(name)
    return swept


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
