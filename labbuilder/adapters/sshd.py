"""An sshd of labbuilder's own (a class's SSH entry): started with its own configuration file,
found again by it, stopped. The host's own sshd, its configuration and its accounts are never
touched. May import: ``common``, ``adapters.processes``.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

from labbuilder.adapters import processes
from labbuilder.common.errors import HostError

SSHD = Path("/usr/sbin/sshd")
PRIVSEP_DIR = Path("/run/sshd")  # Debian's sshd wants it, whether or not the host runs its own


def check_host() -> None:
    if not SSHD.exists():
        raise HostError(
            f"{SSHD} is missing: a class's SSH entry for its students is an sshd of its own",
            "install openssh-server (scripts/setup-host installs it without starting the host's "
            "own sshd)",
        )


def _listening(address: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((address, port), timeout=0.5):
        return True
    return False


def start(config: Path, log: Path, address: str, port: int) -> int:
    """Start ``sshd -D -f config`` in a session of its own and wait until it listens on
    ``address``:``port``; its pid. An sshd of this configuration that runs already is kept."""
    check_host()
    running = pids(config)
    if running:
        return running[0]
    if _listening("127.0.0.1" if address in ("0.0.0.0", "") else address, port):
        raise HostError(
            f"port {port} is in use on this host",
            "choose another with the class file's limits.access_port",
        )
    PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
    probe = "127.0.0.1" if address in ("0.0.0.0", "") else address
    return processes.start_daemon(
        lambda _fd: [str(SSHD), "-D", "-e", "-f", str(config)],
        log,
        ready=lambda: _listening(probe, port),
    )


def pids(config: Path) -> list[int]:
    """The listening sshd processes started with ``config`` (not their sessions). sshd
    rewrites its command line (``sshd: /usr/sbin/sshd -D -e -f CONFIG [listener] ...``), so
    the words are looked for in it as one line."""
    wanted = f"{SSHD} -D -e -f {config}"

    def listener(argv: list[str]) -> bool:
        line = " ".join(argv).removeprefix("sshd: ")
        return line == wanted or line.startswith(f"{wanted} [listener]")

    return [pid for pid in processes.daemons(listener) if _leads_its_session(pid)]


def _leads_its_session(pid: int) -> bool:
    """The listener leads the session it was started in; the children it forks for each
    connection (which may keep its command line for a moment) do not."""
    try:
        return os.getsid(pid) == pid
    except OSError:
        return False


def stop(config: Path) -> bool:
    """Stop the sshd of ``config`` (its open sessions end with it); whether one ran."""
    found = pids(config)
    for pid in found:
        processes.stop(pid)
    return bool(found)
