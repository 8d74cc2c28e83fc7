"""The readiness ladder of one node: domain running → NIC link → port 22 open → SSH login →
configured by cloud-init (its init and config stages; services the image starts at boot may
still be starting, and the install's steps wait for those they use). Each rung has its own
timeout and its own diagnosis; a failure names the node and the rung and shows the last console
lines (kernel panic, cloud-init error). An emulated guest whose kernel stalls while it boots (a soft
lockup, an RCU stall, a hung task: rare, from a loaded host) is reset once, said in the log.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from labbuilder.adapters import netns
from labbuilder.adapters.hypervisor import Hypervisor
from labbuilder.adapters.ssh import SSHSession, port_open
from labbuilder.common.errors import (
    GuestAuthenticationError,
    GuestTransportError,
    HypervisorError,
)

RUNGS = ("running", "link", "port 22", "ssh login", "cloud-init")
# Seconds per rung; generous enough for emulated (TCG) guests on a busy two-core host.
DEFAULT_TIMEOUTS = {
    "running": 60.0,
    "link": 300.0,
    "port 22": 300.0,
    "ssh login": 180.0,
    "cloud-init": 600.0,
}
CONSOLE_LINES = 15
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")
_FATAL = re.compile(
    r"Kernel panic|end Kernel panic|VFS: Unable to mount root|Attempted to kill init"
)
# The kernel's own headlines for a stall; the trace under them is registers and addresses.
_STALL = re.compile(
    r"soft lockup|hard LOCKUP|self-detected stall|detected stalls|blocked for more than \d+ sec"
    r"|BUG: |Oops|general protection fault"
)
BOOT_RUNGS = ("link", "port 22")  # the rungs a stalled kernel never reaches
# A node normally reaches its link within 20-40 s; a stalled one this long after its rung began
# is reset (once) rather than waited for until the rung's timeout.
STALL_GRACE = 90.0

RungCallback = Callable[[str, str, float], None]  # node, rung, seconds since the node started


class NodeNotReadyError(HypervisorError):
    """A node did not reach a rung of the readiness ladder."""


@dataclass(frozen=True)
class NodeTarget:
    """What the ladder needs to know about one node."""

    name: str
    address: str  # management address, reachable from the host
    mac: str  # management NIC's MAC
    user: str
    key_path: Path
    console_log: Path
    namespace: str | None = None  # an isolated lab's gateway namespace: reached from there


def console_tail(path: Path, lines: int = CONSOLE_LINES) -> str:
    try:
        text = path.read_bytes().decode(errors="replace")
    except OSError:
        return "(no console log)"
    kept = [_ANSI.sub("", line).rstrip() for line in text.splitlines()[-lines:]]
    return "\n".join(kept) or "(the console printed nothing)"


def kernel_stall(path: Path, offset: int = 0) -> str | None:
    """The first stall headline the guest's kernel printed on its console after byte
    ``offset``, or None."""
    try:
        with path.open("rb") as console:
            console.seek(offset)
            text = console.read().decode(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if _STALL.search(line):
            return _ANSI.sub("", line).strip()[:200]
    return None


def _console_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def wait_ready(
    hypervisor: Hypervisor,
    domain: str,
    node: NodeTarget,
    *,
    timeouts: dict[str, float] | None = None,
    on_rung: RungCallback | None = None,
    stop: threading.Event | None = None,
    note: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Climb the ladder of ``node``, whose domain is ``domain`` on ``hypervisor``; return the
    seconds at which each rung was reached. ``stop`` set (the rest of ``up`` failed) ends the
    climb at the next poll. A kernel stall on the way to the node's network resets the domain
    once (``note`` says so) and the rung is waited for anew."""
    limits = {**DEFAULT_TIMEOUTS, **(timeouts or {})}
    start = time.monotonic()
    reached: dict[str, float] = {}
    console_from = 0  # the console's bytes before a reset are not this boot's
    restarted = False
    checks: dict[str, Callable[[], str | None]] = {
        "running": lambda: _running(hypervisor, domain),
        "link": lambda: _link(node),
        "port 22": lambda: (
            None if port_open(node.address, 22, timeout=2.0, namespace=node.namespace) else "closed"
        ),
        "ssh login": lambda: _login(node),
        "cloud-init": lambda: _cloud_init(node),
    }
    for rung in RUNGS:
        if on_rung is not None:
            on_rung(node.name, rung, time.monotonic() - start)
        began = time.monotonic()
        deadline = began + limits[rung]
        problem: str | None = "not checked yet"
        while True:
            if stop is not None and stop.is_set():
                raise NodeNotReadyError(f"node {node.name}: stopped before '{rung}'")
            _raise_on_fatal_console(node, rung)
            problem = _running(hypervisor, domain) if rung != "running" else None
            if problem is None or not problem.startswith("fatal: "):
                problem = checks[rung]()
            if problem is None:
                break
            if problem.startswith("fatal: "):
                raise _not_ready(node, rung, limits[rung], problem.removeprefix("fatal: "))
            now = time.monotonic()
            stall = kernel_stall(node.console_log, console_from) if rung in BOOT_RUNGS else None
            overdue = now - began > STALL_GRACE or now > deadline
            if stall is not None and not restarted and overdue:
                console_from = _console_size(node.console_log)
                hypervisor.reset_domain(domain)
                restarted = True
                began, deadline = now, now + limits[rung]
                if note is not None:
                    note(f"node {node.name}: its kernel stalled while booting ({stall}); reset it")
                continue
            if now > deadline:
                if stall is not None:
                    problem += f"; the guest's kernel reported: {stall}"
                raise _not_ready(node, rung, limits[rung], problem)
            time.sleep(1.0)
        reached[rung] = time.monotonic() - start
    if on_rung is not None:
        on_rung(node.name, "ready", time.monotonic() - start)
    return reached


def _not_ready(node: NodeTarget, rung: str, limit: float, problem: str) -> NodeNotReadyError:
    return NodeNotReadyError(
        f"node {node.name} did not reach '{rung}' within {limit:.0f} s: {problem}\n"
        f"last console lines ({node.console_log}):\n{console_tail(node.console_log)}",
        f"look at the whole console with `labbuilder console {node.name}` or in "
        f"{node.console_log}; `labbuilder down` removes the lab",
    )


def _raise_on_fatal_console(node: NodeTarget, rung: str) -> None:
    tail = console_tail(node.console_log, 60)
    if _FATAL.search(tail):
        raise _not_ready(node, rung, 0, "the guest's kernel failed (see the console)")


def _running(hypervisor: Hypervisor, domain: str) -> str | None:
    try:
        state = hypervisor.domain_state(domain)
    except HypervisorError as err:
        return f"fatal: libvirt lost the domain: {err.detail or err.message}"
    if state == "running":
        return None
    if state in ("crashed", "shut off", "paused"):
        return f"fatal: the domain is {state}{qemu_reason(domain)}"
    return f"the domain is {state}"


def qemu_reason(domain: str) -> str:
    """QEMU's own complaint from libvirt's log of the domain (a local host only)."""
    log = Path("/var/log/libvirt/qemu") / f"{domain}.log"
    with contextlib.suppress(OSError):
        lines = log.read_text(errors="replace").splitlines()
        for line in reversed(lines[-200:]):
            if "KVM internal error" in line or "emulation failure" in line or "error" in line:
                return f" (QEMU: {line.strip()})"
    return ""


def _link(node: NodeTarget) -> str | None:
    """The host has seen the node's management MAC answer at its planned address."""
    # A connection attempt makes the host resolve the address; the answer lands in the host's
    # neighbour table (libvirt's own ARP reader fails on some kernels, so it is read here).
    try:
        with netns.connect(node.namespace, node.address, 22, timeout=1.0):
            return None
    except OSError:
        pass
    if node.namespace is not None:
        with netns.inside(node.namespace):  # the namespace's own table, read by this thread
            seen = neighbours(node.address, Path("/proc/thread-self/net/arp"))
    else:
        seen = neighbours(node.address)
    if node.mac in seen:
        return None
    return f"no answer from {node.mac} at {node.address}: the guest's network is not up yet"


def neighbours(address: str, table: Path = Path("/proc/net/arp")) -> set[str]:
    """MACs the host's ARP table holds for ``address`` (complete entries only)."""
    macs = set()
    with contextlib.suppress(OSError):
        for line in table.read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) >= 4 and fields[0] == address and fields[2] != "0x0":
                macs.add(fields[3].lower())
    return macs


def _session(node: NodeTarget) -> SSHSession:
    """A session that checks the node's host key against the lab's known_hosts (next to the
    lab's key); a wrong key is not a rung to wait for: its ``HostKeyError`` ends the ladder."""
    return SSHSession(
        node.address,
        node.user,
        node.key_path,
        timeout=10.0,
        node=node.name,
        namespace=node.namespace,
    )


def _login(node: NodeTarget) -> str | None:
    try:
        with _session(node) as session:
            result = session.run("true", timeout=30.0)
            return None if result.rc == 0 else f"`true` exited {result.rc}"
    except GuestAuthenticationError:
        return f"the lab key is not accepted for user {node.user} yet"
    except (GuestTransportError, OSError) as err:
        return f"ssh: {err}"


# What cloud-init has done: its status file (cloud-init 0.7.7 and later), else whether it has
# finished (boot-finished, written at the end of its final stage) and its result.
_CLOUD_INIT_STATUS = (
    "if [ -e /run/cloud-init/status.json ]; then echo status; cat /run/cloud-init/status.json; "
    "elif [ -e /var/lib/cloud/instance/boot-finished ]; then echo result; "
    "cat /var/lib/cloud/data/result.json 2>/dev/null || echo '{}'; else echo waiting; fi"
)


def _cloud_init(node: NodeTarget) -> str | None:
    """None once cloud-init has configured the node (users, keys, passwords, hostname, network,
    apt: its init and config stages). Its final stage (user scripts, messages; it runs after
    multi-user.target, so after every service the image starts at boot, RabbitMQ's 1-2 minutes
    under emulation among them) is not waited for: the install's steps wait for the services
    they use."""
    try:
        with _session(node) as session:
            result = session.run(_CLOUD_INIT_STATUS, timeout=60.0)
    except (GuestTransportError, OSError) as err:
        return f"ssh: {err}"
    return cloud_init_problem(result.stdout, result.rc)


def cloud_init_problem(stdout: str, rc: int) -> str | None:
    """What ``_CLOUD_INIT_STATUS`` printed, judged: None (configured), what is awaited, or a
    ``fatal:`` problem (cloud-init's errors)."""
    kind, _, output = stdout.strip().partition("\n")
    if kind not in ("status", "result") or rc != 0:
        return "cloud-init has not finished"
    try:
        data = json.loads(output or "{}").get("v1", {})
    except (json.JSONDecodeError, AttributeError):
        return None if kind == "result" else "cloud-init's status is being written"
    if kind == "status":
        stages = {key: value for key, value in data.items() if isinstance(value, dict)}
        errors = [str(error) for stage in stages.values() for error in stage.get("errors") or []]
        if not errors and (stages.get("modules-config") or {}).get("finished") is None:
            return "cloud-init has not configured the node yet"
    else:
        errors = [str(error) for error in data.get("errors", [])]
    if errors:
        return "fatal: cloud-init reported errors: " + "; ".join(errors)
    return None
    if errors:
        return "fatal: cloud-init reported errors: " + "; ".join(str(e) for e in errors)
    return None
