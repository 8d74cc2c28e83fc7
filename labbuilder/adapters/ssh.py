"""SSH to lab nodes with paramiko: one session per node, commands quoted centrally.

``run("systemctl is-active %s", unit)`` quotes every argument with ``shlex.quote``; the result
is a ``CommandResult``. Nothing here knows about labs or stages.
"""

from __future__ import annotations

import shlex
import socket
import time
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
