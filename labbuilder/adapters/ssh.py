"""SSH to lab nodes with paramiko: one session per node, commands quoted centrally.

``run("systemctl is-active %s", unit)`` quotes every argument with ``shlex.quote``; the result
is a ``CommandResult``. Nothing here knows about labs or stages.
"""

from __future__ import annotations

import shlex
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import paramiko

from labbuilder.errors import GuestCommandError


@dataclass(frozen=True)
class CommandResult:
    command: str
    rc: int
    stdout: str
    stderr: str

    @property
    def failed(self) -> bool:
        return self.rc != 0

    def check(self, node: str) -> CommandResult:
        if self.failed:
            raise GuestCommandError(
                f"on {node}: command failed\nCommand: {self.command}\nExit code: {self.rc}\n"
                f"Stdout: {_tail(self.stdout)}\nStderr: {_tail(self.stderr)}"
            )
        return self


def _tail(text: str, lines: int = 15) -> str:
    kept = text.rstrip().splitlines()[-lines:]
    return "\n".join(kept) if kept else "(empty)"


def quote_command(template: str, *args: object) -> str:
    return template % tuple(shlex.quote(str(arg)) for arg in args) if args else template


def port_open(host: str, port: int = 22, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class SSHSession:
    """A logged-in SSH session to one node."""

    def __init__(self, host: str, user: str, key_path: Path, *, timeout: float = 15.0) -> None:
        self.host = host
        self.user = user
        self._client = paramiko.SSHClient()
        # Lab nodes get fresh host keys at first boot; the lab's network is private to the host.
        self._client.set_missing_host_key_policy(paramiko.AutoAddPolicy())  # noqa: S507
        self._client.connect(
            host,
            username=user,
            key_filename=str(key_path),
            timeout=timeout,
            banner_timeout=timeout,
            auth_timeout=timeout,
            allow_agent=False,
            look_for_keys=False,
        )

    def run(
        self, template: str, *args: object, timeout: float = 600.0, sudo: bool = False
    ) -> CommandResult:
        command = quote_command(template, *args)
        if sudo:
            command = "sudo -n sh -c " + shlex.quote(command)
        _, stdout, stderr = self._client.exec_command(command, timeout=timeout)
        deadline = time.monotonic() + timeout
        channel = stdout.channel
        while not channel.exit_status_ready():
            if time.monotonic() > deadline:
                channel.close()
                return CommandResult(command, 124, "", f"timed out after {timeout:.0f} s")
            time.sleep(0.05)
        out = stdout.read().decode(errors="replace")
        err = stderr.read().decode(errors="replace")
        return CommandResult(command, channel.recv_exit_status(), out, err)

    def run_script(
        self,
        script: str,
        *,
        timeout: float = 1800.0,
        on_output: Callable[[str], None] | None = None,
        interpreter: str = "bash",
    ) -> CommandResult:
        """Run ``script`` as root with ``interpreter``. The script travels on stdin into a
        private temporary file (nothing of it shows in ``ps`` or argv), which then runs with
        stdin from /dev/null: a command in it that reads stdin (rabbitmqctl does) cannot eat
        the rest of the script, as it would with ``bash -s``.

        Output lines go to ``on_output`` as they arrive (stdout and stderr interleaved, stderr
        lines prefixed with ``! ``). On timeout the channel is closed and rc is 124.
        """
        transport = self._client.get_transport()
        if transport is None or not transport.is_active():
            raise GuestCommandError(f"on {self.host}: the SSH connection is closed")
        channel = transport.open_session()
        runner = (
            'f=$(mktemp) && cat > "$f" && { '
            f'{interpreter} "$f" < /dev/null; rc=$?; rm -f "$f"; exit $rc; }}'
        )
        channel.exec_command("sudo -n sh -c " + shlex.quote(runner))
        channel.sendall(script.encode())
        channel.shutdown_write()
        out: list[bytes] = []
        err: list[bytes] = []
        pending = {"out": b"", "err": b""}
        deadline = time.monotonic() + timeout

        def emit(kind: str, data: bytes, final: bool = False) -> None:
            pending[kind] += data
            *lines, pending[kind] = pending[kind].split(b"\n")
            if final and pending[kind]:
                lines.append(pending[kind])
                pending[kind] = b""
            if on_output is not None:
                prefix = "! " if kind == "err" else ""
                for line in lines:
                    on_output(prefix + line.decode(errors="replace"))

        while True:
            busy = False
            if channel.recv_ready():
                data = channel.recv(65536)
                out.append(data)
                emit("out", data)
                busy = True
            if channel.recv_stderr_ready():
                data = channel.recv_stderr(65536)
                err.append(data)
                emit("err", data)
                busy = True
            if not busy:
                if (
                    channel.exit_status_ready()
                    and not channel.recv_ready()
                    and not channel.recv_stderr_ready()
                ):
                    break
                if time.monotonic() > deadline:
                    channel.close()
                    emit("out", b"", final=True)
                    return CommandResult(
                        interpreter,
                        124,
                        b"".join(out).decode(errors="replace"),
                        f"timed out after {timeout:.0f} s",
                    )
                time.sleep(0.05)
        emit("out", b"", final=True)
        emit("err", b"", final=True)
        rc = channel.recv_exit_status()
        channel.close()
        return CommandResult(
            interpreter,
            rc,
            b"".join(out).decode(errors="replace"),
            b"".join(err).decode(errors="replace"),
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> SSHSession:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
