"""``SSHSession`` over local processes instead of SSH, for tests of its runner without guests.

``LocalSession`` runs every channel's command with ``sh -c`` on this host (no ``sudo``, its run
directory under a test folder), so the shell that runs scripts detached, follows their output
and stops them is the real one. ``drop()`` ends the "connection" as when it goes: every
channel's pipes close (its processes go on until they write), and the session is not alive until it logs in again
(``refuse_logins`` makes that fail).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import IO

from labbuilder.adapters.ssh import Channel, SSHSession


class LocalChannel:
    """A command in its own process group, with the part of paramiko's Channel we use."""

    def __init__(self, command: str) -> None:
        self.command = command
        self.proc = subprocess.Popen(
            ["sh", "-c", command],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self.closed = False
        self.hung_up = False  # closed before its command ended: no exit status
        self._buffers = {"out": bytearray(), "err": bytearray()}
        self._lock = threading.Lock()
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._readers = [
            threading.Thread(target=self._pump, args=(kind, stream), daemon=True)
            for kind, stream in (("out", self.proc.stdout), ("err", self.proc.stderr))
        ]
        for reader in self._readers:
            reader.start()

    def _pump(self, kind: str, stream: IO[bytes]) -> None:
        with contextlib.suppress(ValueError, OSError):  # closed by hang_up()
            for chunk in iter(lambda: stream.read1(4096), b""):  # type: ignore[attr-defined]
                with self._lock:
                    self._buffers[kind] += chunk

    def _take(self, kind: str, size: int) -> bytes:
        with self._lock:
            data = bytes(self._buffers[kind][:size])
            del self._buffers[kind][:size]
            return data

    def sendall(self, data: bytes) -> None:
        if self.closed:
            raise OSError("the channel is closed")
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def shutdown_write(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()

    def recv_ready(self) -> bool:
        return bool(self._buffers["out"])

    def recv(self, size: int) -> bytes:
        return self._take("out", size)

    def recv_stderr_ready(self) -> bool:
        return bool(self._buffers["err"])

    def recv_stderr(self, size: int) -> bytes:
        return self._take("err", size)

    def exit_status_ready(self) -> bool:
        # As paramiko's: also "ready" once closed, with -1 when no exit status came.
        finished = not any(reader.is_alive() for reader in self._readers)
        return self.closed or (self.proc.poll() is not None and finished)

    def recv_exit_status(self) -> int:
        return -1 if self.hung_up else self.proc.wait()

    def hang_up(self) -> None:
        """The connection is gone: our ends of its pipes close; its processes go on until
        they write (SIGPIPE), as a command's do in a guest whose client vanished."""
        if self.proc.poll() is None:
            self.hung_up = True
        self.closed = True
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError, ValueError):
                    stream.close()

    def close(self) -> None:
        if self.hung_up:
            return  # its connection is gone: closing it reaches nothing
        self.closed = True
        if self.proc.poll() is None:
            self.hung_up = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGHUP)
        self.proc.wait()


class LocalSession(SSHSession):
    """An ``SSHSession`` whose channels are local processes (see the module's doc)."""

    sudo = ""

    def __init__(self, run_root: Path, node: str = "local") -> None:
        # No SSH: only what the runner uses of a session.
        self.run_root = str(run_root)
        self.host = "127.0.0.1"
        self.node = node
        self.user = "test"
        self.key_path = self.known_hosts = Path("/dev/null")
        self.timeout = 5.0
        self._lock = threading.Lock()
        self._generation = 0
        self._client = None
        self._closed = False
        self._runs: set[str] = set()
        self.connected = True
        self.refuse_logins = False
        self.logins = 0
        self.channels: list[LocalChannel] = []

    def _open(self) -> None:
        if self.refuse_logins:
            raise ConnectionRefusedError("connection refused (the test refuses logins)")
        self.logins += 1
        self._generation += 1
        self.connected = True

    def _alive(self) -> bool:
        return self.connected

    def _channel(self, command: str) -> Channel:
        if not self._alive():
            self._reconnect(self._generation, time.monotonic() + 60)
        channel = LocalChannel(command)
        self.channels.append(channel)
        return channel

    def drop(self) -> None:
        """The connection goes: its channels' processes are hung up."""
        channels = list(self.channels)  # not those of the next login
        self.connected = False
        for channel in channels:
            channel.hang_up()

    def drop_after(self, seconds: float) -> threading.Thread:
        def later() -> None:
            time.sleep(seconds)
            self.drop()

        thread = threading.Thread(target=later)
        thread.start()
        return thread

    def close(self) -> None:
        super().close()  # stops the scripts it runs, through a channel of its own
        self.connected = False
