"""SSH to lab nodes with paramiko: one session per node, commands quoted centrally.

``run("systemctl is-active %s", unit)`` quotes every argument with ``shlex.quote``; the result
is a ``CommandResult``. Nothing here knows about labs or stages.

Every session checks the node's host key against a known_hosts file (the lab's, next to its
key: labbuilder made every node's host key) and refuses a missing or different key. Sessions
send keepalives, and the kernel drops a connection whose data stays unacknowledged, so a lost
node is noticed in about a minute and a half instead of never.

``run_script`` runs a script detached from the connection (``setsid``, output and exit status
to files in a private directory in the guest) and follows its output: when the connection
drops, the session logs in again and goes on reading where it stopped; when the script's time
is up, its whole session of processes is stopped in the guest (TERM, then KILL).
"""

from __future__ import annotations

import secrets
import shlex
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn, Protocol

import paramiko

from labbuilder.adapters import netns
from labbuilder.common.errors import (
    GuestAuthenticationError,
    GuestCommandError,
    GuestTransportError,
)

KEEPALIVE_SECONDS = 15
# Linux: a connection whose sent data stays unacknowledged this long is dropped (the keepalives
# are such data), so a guest that vanished is noticed instead of waited for without end.
UNACKED_MS = 90_000
RECONNECT_SECONDS = 300.0  # how long a dropped session is tried again, within the step's time
MAX_RECONNECTS = 5  # per script
KILL_GRACE_STEPS = 50  # tenths of a second between TERM and KILL
LOST = 255  # exit code of a script whose result could not be collected
RUN_ROOT = "/run/labbuilder"
ANSWER_POLL = 0.002  # seconds between looks for a conversation's answer (its timing's grain)


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


class HostKeyError(GuestCommandError):
    """A node's SSH host key is not the one in the lab's known_hosts (or none is known)."""


class ConnectionLostError(GuestCommandError):
    """The SSH connection to a node dropped and could not be made again in time."""


def _problem(err: BaseException) -> str:
    return str(err) or type(err).__name__


def _tail(text: str, lines: int = 15) -> str:
    kept = text.rstrip().splitlines()[-lines:]
    return "\n".join(kept) if kept else "(empty)"


def quote_command(template: str, *args: object) -> str:
    return template % tuple(shlex.quote(str(arg)) for arg in args) if args else template


def port_open(
    host: str, port: int = 22, timeout: float = 2.0, *, namespace: str | None = None
) -> bool:
    """Whether ``host``:``port`` accepts a connection (from ``namespace``: an isolated lab's
    gateway namespace; None: from the host)."""
    try:
        with netns.connect(namespace, host, port, timeout=timeout):
            return True
    except OSError:
        return False


# --- the runner in the guest ------------------------------------------------------------------
# Each runs as root with ``sh -c SCRIPT sh RUN_ROOT ID ...``: only the run's id and numbers are
# on the command line; the script travels on stdin into the run's private directory.

# $1 run root, $2 id, $3 interpreter, $4 the script's size ("-": the interpreter refuses an
# incomplete script itself, see ``_whole``). Start the script (when it arrived whole) in a
# session of its own, its output and exit status going to files in the run's private
# directory (which ``_FOLLOW`` removes once it has the exit status), then follow it.
_START = """set -e
umask 077
_RUN='echo $$ > "$1/pid"
if [ -e "$1/stop" ]; then
  echo "labbuilder: the session was closed before the script started; it did not run" >> "$1/err"
  echo 143 > "$1/rc"
  exit
fi
"$2" "$1/script" < /dev/null >> "$1/out" 2>> "$1/err"
echo $? > "$1/rc"'
[ -d "$1" ] || mkdir -p "$1"
d="$1/$2"
mkdir -p "$d"
cat > "$d/script"
if [ "$4" != - ] && [ "$(wc -c < "$d/script")" -ne "$4" ]; then
  echo "labbuilder: the script arrived incomplete; it did not run" >&2
  exit 255
fi
: >> "$d/out"
: >> "$d/err"
setsid sh -c "$_RUN" sh "$d" "$3" < /dev/null > /dev/null 2>&1 &
pid=$!
set +e
o=0
e=0
"""

# $1 run root, $2 id; $o and $e: the bytes of stdout and stderr already read, $pid the run's
# session leader (read from its directory when not set). The output from there on, until the
# session leader ends; then its exit status as ours. Only the newest follower (a follower of
# a dropped connection may still run) removes the run's directory.
_FOLLOW = """d="$1/$2"
if [ -z "$pid" ] && ! read -r pid < "$d/pid"; then
  echo "labbuilder: run $2 did not start, or is gone from $1 (did the node restart?)" >&2
  exit 255
fi
echo $$ > "$d/follower"
tail -s 0.05 --pid="$pid" -c +$((o + 1)) -f "$d/out" &
tail -s 0.05 --pid="$pid" -c +$((e + 1)) -f "$d/err" >&2 &
wait
{ read -r follower < "$d/follower"; } 2> /dev/null
[ "$follower" = $$ ] || exit 255  # a follower of a newer connection collects the run
rc=255
if ! { read -r rc < "$d/rc"; } 2> /dev/null; then
  rc=255
  echo "labbuilder: the script ended without an exit status" >&2
fi
rm -rf "$d" < /dev/null > /dev/null 2>&1 &  # not waited for
exit "$rc"
"""

# $1 run root, $2 id. Stop every process of the run's session: TERM, then KILL after 5 s. It
# says "stopping" first: from there on it finishes even if the connection closes.
_KILL = f"""d="$1/$2"
echo stopping
umask 077
mkdir -p "$d" && : > "$d/stop"
{{ read -r sid < "$d/pid"; }} 2> /dev/null || exit 0  # not started: it sees "stop" and does not
i=0
# TERM again each time: a child forked while pkill read the process table was not signalled
while pkill -TERM -s "$sid" && [ $i -lt {KILL_GRACE_STEPS} ]; do
  sleep 0.1
  i=$((i + 1))
done
pkill -KILL -s "$sid"
rm -rf "$d"
exit 0
"""


def _whole(script: str, interpreter: str) -> tuple[bytes, str]:
    """The script as sent, and the size the runner checks it against. A shell script is sent
    as one brace group: the shell reads a whole group before it runs any of it, so a script
    cut short on the way (the connection dropped) is a syntax error and runs nothing; this
    costs the guest nothing, unlike counting its bytes there."""
    if interpreter in ("bash", "sh"):
        return ("{\n" + script + ("" if script.endswith("\n") else "\n") + "}\n").encode(), "-"
    data = script.encode()
    return data, str(len(data))


class Channel(Protocol):
    """The part of paramiko's Channel the runner uses (a fake one in tests)."""

    closed: bool

    def sendall(self, data: bytes) -> None: ...
    def shutdown_write(self) -> None: ...
    def recv_ready(self) -> bool: ...
    def recv(self, size: int) -> bytes: ...
    def recv_stderr_ready(self) -> bool: ...
    def recv_stderr(self, size: int) -> bytes: ...
    def exit_status_ready(self) -> bool: ...
    def recv_exit_status(self) -> int: ...
    def close(self) -> None: ...


class Transport(Protocol):
    """How a script reaches one guest and runs there (the install engine's view of a node)."""

    def run_script(
        self,
        script: str,
        *,
        timeout: float = ...,
        on_output: Callable[[str], None] | None = ...,
        interpreter: str = ...,
    ) -> CommandResult: ...


class GuestSession(Transport, Protocol):
    """A logged-in session to one guest (``SSHSession``): commands, scripts, and closing.
    Its connection failures are ``GuestTransportError`` (``GuestAuthenticationError`` while
    the guest refuses the lab's key), ``HostKeyError`` and ``ConnectionLostError``."""

    def run(
        self, template: str, *args: object, timeout: float = ..., sudo: bool = ...
    ) -> CommandResult: ...

    def close(self) -> None: ...


class _Lost(Exception):
    """The connection under a channel dropped."""


_NETWORK_ERRORS = (OSError, EOFError, paramiko.SSHException)


class _RefuseUnknownHost(paramiko.RejectPolicy):
    def __init__(self, session: SSHSession) -> None:
        self.session = session

    def missing_host_key(self, client: Any, hostname: str, key: Any) -> NoReturn:
        raise self.session._host_key_error(
            f"{self.session.known_hosts} holds no key for it (it presented {key.get_name()} "
            f"{key.fingerprint})"
        )


class _Output:
    """What a script printed so far: bytes per stream, complete lines to ``on_output``."""

    def __init__(self, on_output: Callable[[str], None] | None) -> None:
        self.on_output = on_output
        self.data = {"out": bytearray(), "err": bytearray()}
        self.pending = {"out": b"", "err": b""}

    def add(self, kind: str, data: bytes, final: bool = False) -> None:
        self.data[kind] += data
        self.pending[kind] += data
        *lines, self.pending[kind] = self.pending[kind].split(b"\n")
        if final and self.pending[kind]:
            lines.append(self.pending[kind])
            self.pending[kind] = b""
        if self.on_output is not None:
            prefix = "! " if kind == "err" else ""
            for line in lines:
                self.on_output(prefix + line.decode(errors="replace"))

    def note(self, text: str) -> None:
        if self.on_output is not None:
            self.on_output("! labbuilder: " + text)

    def text(self, kind: str) -> str:
        return bytes(self.data[kind]).decode(errors="replace")


class Conversation:
    """A command in the guest answering lines on its stdin with lines on its stdout
    (``SSHSession.converse``)."""

    def __init__(self, channel: Any, command: str, node: str) -> None:
        self._channel = channel
        self.command = command
        self.node = node
        self._buffer = b""

    def ask(self, line: str, timeout: float) -> str:
        """Send ``line``; the next line the command prints (without its newline).
        GuestCommandError if the command ends or says nothing within ``timeout`` seconds."""
        try:
            self._channel.sendall(line.encode() + b"\n")
            deadline = time.monotonic() + timeout
            while b"\n" not in self._buffer:
                if self._channel.recv_ready():
                    self._buffer += self._channel.recv(4096)
                elif self._channel.exit_status_ready() or self._channel.closed:
                    result = self.close(5.0)
                    raise GuestCommandError(
                        f"node {self.node}: the command ended (exit code {result.rc}) instead "
                        f"of answering {line.split()[0]!r}: {_tail(result.stderr, 3)}",
                        "run it by hand on the node to see why (`labbuilder ssh`)",
                    )
                elif time.monotonic() > deadline:
                    raise GuestCommandError(
                        f"node {self.node} did not answer {line.split()[0]!r} within "
                        f"{timeout:.0f} s",
                        "the node may be overloaded; `labbuilder status` shows it",
                    )
                else:
                    time.sleep(ANSWER_POLL)
        except (*_NETWORK_ERRORS, EOFError) as err:
            raise GuestTransportError(_problem(err)) from None
        answer, self._buffer = self._buffer.split(b"\n", 1)
        return answer.decode(errors="replace")

    def close(self, timeout: float) -> CommandResult:
        """Close its stdin and wait for the command to end: its exit status (124 if it does
        not end within ``timeout`` seconds), the rest of its output and its errors."""
        channel = self._channel
        try:
            channel.shutdown_write()
            deadline = time.monotonic() + timeout
            rest = [self._buffer]
            errors = []
            while True:
                if channel.recv_ready():
                    rest.append(channel.recv(65536))
                elif channel.recv_stderr_ready():
                    errors.append(channel.recv_stderr(65536))
                elif channel.exit_status_ready():
                    rc = channel.recv_exit_status()
                    break
                elif time.monotonic() > deadline or channel.closed:
                    rc = 124
                    break
                else:
                    time.sleep(0.02)
        except (*_NETWORK_ERRORS, EOFError) as err:
            raise GuestTransportError(_problem(err)) from None
        finally:
            self._buffer = b""
            channel.close()
        text = b"".join(rest).decode(errors="replace")
        return CommandResult(self.command, rc, text, b"".join(errors).decode(errors="replace"))


class SSHSession:
    """A logged-in SSH session to one node.

    The node's host key must be in ``known_hosts`` (by default the file ``known_hosts`` next
    to ``key_path``: a lab's state directory keeps both); ``node`` names it in errors.
    """

    sudo = "sudo -n "
    run_root = RUN_ROOT

    def __init__(
        self,
        host: str,
        user: str,
        key_path: Path,
        *,
        timeout: float = 15.0,
        known_hosts: Path | None = None,
        node: str | None = None,
        namespace: str | None = None,
    ) -> None:
        self.host = host
        self.namespace = namespace  # an isolated lab's gateway namespace: connect from there
        self.user = user
        self.key_path = key_path
        self.timeout = timeout
        self.known_hosts = known_hosts or key_path.with_name("known_hosts")
        self.node = node or host
        self._lock = threading.Lock()
        self._generation = 0
        self._client: Any = None
        self._closed = False
        self._runs: set[str] = set()  # scripts running now (their run ids)
        self._open()

    # --- connecting ---------------------------------------------------------------------------

    def _host_key_error(self, problem: str, *, unreadable: bool = False) -> HostKeyError:
        if unreadable:
            hint = (
                "the lab was made by an older labbuilder that did not write known_hosts: "
                "`labbuilder down` and `labbuilder up` remake it with host keys labbuilder knows"
            )
        else:
            hint = (
                "labbuilder made every node's host key; another key means another machine "
                f"answers at {self.host}, or a node made by an older labbuilder or from an "
                "image whose cloud-init cannot take the key (`labbuilder down` and "
                "`labbuilder up` remake it)"
            )
        return HostKeyError(
            f"SSH host key check failed for node {self.node} ({self.host}): {problem}; "
            "refusing to connect",
            hint,
        )

    def _open(self) -> None:
        """Log in (again); the client replaces the previous one."""
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(_RefuseUnknownHost(self))
        try:
            client.get_host_keys().load(str(self.known_hosts))
        except OSError as err:
            raise self._host_key_error(
                f"cannot read {self.known_hosts} ({err.strerror})", unreadable=True
            ) from None
        sock = netns.connect(self.namespace, self.host, 22, timeout=self.timeout)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if hasattr(socket, "TCP_USER_TIMEOUT"):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, UNACKED_MS)
            client.connect(
                self.host,
                username=self.user,
                key_filename=str(self.key_path),
                timeout=self.timeout,
                banner_timeout=self.timeout,
                auth_timeout=self.timeout,
                allow_agent=False,
                look_for_keys=False,
                sock=sock,
            )
        except paramiko.BadHostKeyException as err:
            client.close()
            sock.close()
            raise self._host_key_error(
                f"it presented {err.key.get_name()} {err.key.fingerprint}, but "
                f"{self.known_hosts} holds {err.expected_key.get_name()} "
                f"{err.expected_key.fingerprint}"
            ) from None
        except paramiko.AuthenticationException as err:
            client.close()
            sock.close()
            raise GuestAuthenticationError(_problem(err)) from err
        except paramiko.SSHException as err:
            client.close()
            sock.close()
            raise GuestTransportError(_problem(err)) from err
        except BaseException:
            client.close()
            sock.close()
            raise
        transport = client.get_transport()
        if transport is not None:
            transport.set_keepalive(KEEPALIVE_SECONDS)
        old, self._client = self._client, client
        self._generation += 1
        if old is not None:
            old.close()

    def _alive(self) -> bool:
        transport = self._client.get_transport() if self._client is not None else None
        return transport is not None and bool(transport.is_active())

    def _reconnect(self, generation: int, until: float) -> None:
        """Log in again unless another thread did already since ``generation``; tries until
        ``until`` (monotonic). A wrong host key is not tried again."""
        with self._lock:
            if self._generation != generation and self._alive():
                return
            if self._closed:
                raise ConnectionLostError(f"the SSH session to node {self.node} was closed")
            problem = "the connection dropped"
            while True:
                try:
                    self._open()
                    return
                except HostKeyError:
                    raise
                except (*_NETWORK_ERRORS, GuestTransportError) as err:
                    problem = _problem(err)
                if time.monotonic() + 2 > until:
                    raise ConnectionLostError(
                        f"lost the SSH connection to node {self.node} ({self.host}) and could "
                        f"not log in again: {problem}",
                        "check that the node runs (`labbuilder status`); running the same "
                        "command again continues where it stopped",
                    )
                time.sleep(2)

    def _channel(self, command: str) -> Channel:
        """A channel running ``command``; reconnects first when the session is gone."""
        if not self._alive():
            self._reconnect(self._generation, time.monotonic() + 60)
        try:
            transport = self._client.get_transport()
            channel = transport.open_session(timeout=self.timeout)
            channel.exec_command(command)
        except _NETWORK_ERRORS as err:
            raise _Lost(str(err)) from None
        return channel  # type: ignore[no-any-return]

    # --- commands -----------------------------------------------------------------------------

    def run(
        self, template: str, *args: object, timeout: float = 600.0, sudo: bool = False
    ) -> CommandResult:
        command = quote_command(template, *args)
        if sudo:
            command = "sudo -n sh -c " + shlex.quote(command)
        if not self._alive():
            self._reconnect(self._generation, time.monotonic() + 60)
        try:
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
        except paramiko.SSHException as problem:
            raise GuestTransportError(_problem(problem)) from problem

    def converse(self, template: str, *args: object, sudo: bool = False) -> Conversation:
        """Start a command whose stdin and stdout are a conversation in lines
        (``Conversation.ask``): one login's channel for many quick round trips, with no
        process started per question."""
        command = quote_command(template, *args)
        if sudo:
            command = "sudo -n sh -c " + shlex.quote(command)
        try:
            return Conversation(self._channel(command), command, self.node)
        except _Lost as err:
            raise GuestTransportError(str(err)) from None

    def _runner(self, body: str, *args: object) -> str:
        """The command line that runs one of the runner's shell texts as root."""
        words = " ".join(shlex.quote(str(arg)) for arg in (self.run_root, *args))
        return f"{self.sudo}sh -c {shlex.quote(body)} sh {words}"

    def run_script(
        self,
        script: str,
        *,
        timeout: float = 1800.0,
        on_output: Callable[[str], None] | None = None,
        interpreter: str = "bash",
    ) -> CommandResult:
        """Run ``script`` as root with ``interpreter``. The script travels on stdin into a
        private file in the guest (nothing of it shows in ``ps`` or argv), which then runs
        with stdin from /dev/null in a session of its own, detached from the connection, its
        output and exit status going to files next to it: a command in it that reads stdin
        (rabbitmqctl does) cannot eat the rest of the script.

        Output lines go to ``on_output`` as they arrive (stdout and stderr interleaved, stderr
        lines prefixed with ``! ``). When the connection drops, the session logs in again and
        goes on from the byte it had read (raising ``ConnectionLostError`` if it cannot within
        ``RECONNECT_SECONDS``). On timeout every process of the script's session is stopped in
        the guest, and rc is 124.
        """
        run_id = secrets.token_hex(8)
        self._runs.add(run_id)  # before the check: a close() from now on stops this run
        if self._closed:
            self._runs.discard(run_id)
            raise ConnectionLostError(f"the SSH session to node {self.node} was closed")
        try:
            return self._run_script(run_id, script, timeout, on_output, interpreter)
        finally:
            self._runs.discard(run_id)

    def _run_script(
        self,
        run_id: str,
        script: str,
        timeout: float,
        on_output: Callable[[str], None] | None,
        interpreter: str,
    ) -> CommandResult:
        deadline = time.monotonic() + timeout
        output = _Output(on_output)
        data, size = _whole(script, interpreter)
        command = self._runner(_START + _FOLLOW, run_id, interpreter, size)
        reconnects = 0
        generation = self._generation
        try:
            channel = self._channel(command)
            channel.sendall(data)
            channel.shutdown_write()
        except (_Lost, *_NETWORK_ERRORS) as err:
            # Nothing tells whether the script started: following it finds out.
            output.note(f"the SSH connection dropped while the script was sent ({err})")
            channel = self._follow_again(run_id, output, generation, deadline, reconnects)
            reconnects += 1
        while True:
            state = self._read(channel, output, deadline)
            if state == "exit":
                rc = channel.recv_exit_status()
                channel.close()
                break
            channel.close()
            if state == "timeout":
                output.add("out", b"", final=True)
                output.add("err", b"", final=True)
                stopped = self._stop(run_id)
                return CommandResult(
                    interpreter,
                    124,
                    output.text("out"),
                    output.text("err") + f"\ntimed out after {timeout:.0f} s; {stopped}",
                )
            if reconnects >= MAX_RECONNECTS:
                raise ConnectionLostError(
                    f"the SSH connection to node {self.node} ({self.host}) dropped "
                    f"{reconnects + 1} times during one script",
                    "check the host's and the node's network; running the same command again "
                    "continues where it stopped",
                )
            reconnects += 1
            output.note(
                "the SSH connection dropped; logging in again to follow the script from "
                f"byte {len(output.data['out'])} of its output"
            )
            channel = self._follow_again(run_id, output, generation, deadline, reconnects)
            generation = self._generation
        output.add("out", b"", final=True)
        output.add("err", b"", final=True)
        return CommandResult(interpreter, rc, output.text("out"), output.text("err"))

    def _follow_again(
        self, run_id: str, output: _Output, generation: int, deadline: float, tries: int
    ) -> Channel:
        """A channel following run ``run_id`` from where ``output`` stopped, on a session made
        again (several tries within the step's time and ``RECONNECT_SECONDS``)."""
        until = min(deadline, time.monotonic() + RECONNECT_SECONDS)
        while True:
            self._reconnect(generation, until)
            follow = "o=$3\ne=$4\npid=\n" + _FOLLOW
            command = self._runner(follow, run_id, len(output.data["out"]), len(output.data["err"]))
            try:
                return self._channel(command)
            except _Lost:
                generation = self._generation
                if time.monotonic() > until or tries > MAX_RECONNECTS:
                    raise ConnectionLostError(
                        f"lost the SSH connection to node {self.node} ({self.host}) and could "
                        "not follow the running script again",
                        "check that the node runs (`labbuilder status`)",
                    ) from None
                tries += 1

    def _read(self, channel: Channel, output: _Output, deadline: float) -> str:
        """Read ``channel`` until the script's exit status arrives ("exit"), its time is up
        ("timeout") or the connection drops ("lost")."""
        try:
            while True:
                busy = False
                if channel.recv_ready():
                    output.add("out", channel.recv(65536))
                    busy = True
                if channel.recv_stderr_ready():
                    output.add("err", channel.recv_stderr(65536))
                    busy = True
                if busy:
                    continue
                if channel.exit_status_ready():
                    if channel.recv_ready() or channel.recv_stderr_ready():
                        continue
                    # paramiko: "ready" with -1 when the channel closed without an exit status
                    return "exit" if channel.recv_exit_status() != -1 else "lost"
                if channel.closed or not self._alive():
                    return "lost"
                if time.monotonic() > deadline:
                    return "timeout"
                time.sleep(0.05)
        except _NETWORK_ERRORS:
            return "lost"

    def _stop(self, run_id: str) -> str:
        """Stop every process of run ``run_id`` in the guest; says how that went."""
        try:
            channel = self._channel(self._runner(_KILL, run_id))
            channel.shutdown_write()
            end = time.monotonic() + 60
            while not channel.exit_status_ready():
                if time.monotonic() > end or channel.closed:
                    channel.close()
                    return "stopping its processes in the guest did not finish"
                time.sleep(0.05)
            rc = channel.recv_exit_status()
            channel.close()
        except (_Lost, GuestCommandError, *_NETWORK_ERRORS) as err:
            return f"its processes in the guest could not be stopped: {err}"
        if rc != 0:
            return f"stopping its processes in the guest failed (exit code {rc})"
        return "its processes in the guest were stopped"

    def close(self) -> None:
        """Close the session. Scripts it still runs (another thread follows them, or the
        caller was interrupted) are stopped in the guest: the stop is under way before the
        connection closes (a few seconds at most)."""
        self._closed = True
        for run_id in list(self._runs) if self._alive() else ():
            try:
                channel = self._channel(self._runner(_KILL, run_id))
                channel.shutdown_write()
                end = time.monotonic() + 5
                while not (channel.recv_ready() or channel.exit_status_ready()):
                    if time.monotonic() > end:
                        break
                    time.sleep(0.05)
            except (_Lost, GuestCommandError, *_NETWORK_ERRORS):
                break
        if self._client is not None:
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
