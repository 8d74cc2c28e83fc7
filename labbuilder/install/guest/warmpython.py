#!/usr/bin/env python3
"""Runs *inside a lab node* on the install pipeline's fast path: a ``python3`` whose imports are
already done.

Under software emulation importing openstacksdk takes most of a minute, and the fast path's
checks and API steps each start a Python that imports it. This script is a drop-in for the
three ways they call ``python3``::

    warmpython.py -c CODE [ARG ...]
    warmpython.py - [ARG ...]          (the code on stdin)
    warmpython.py FILE [ARG ...]

It hands the code to a server on a Unix socket (``SOCKET``), which imported openstacksdk once
and forks a child per call. The child takes the caller's stdin, stdout and stderr (passed over
the socket), environment, working directory and arguments, runs the code as ``__main__``, and
the caller exits with the code's exit status. The first call starts the server (in the
background, for every later call). Without a server, or if the server cannot be reached, the
code runs in the calling process, as ``python3`` would run it.

A call is never lost and never waits without end:

- The conversation on the socket: the caller sends the request; the child answers ``ready``;
  the caller answers ``go``, its three standard streams riding along; the child answers ``run``
  and only then runs the code; the exit status follows as ``exit N``. A caller that hears no
  ``ready`` in time goes away and runs the code itself: the child, reading no ``go``, runs
  nothing. A caller that hears no ``run`` knows the code never started and runs it itself.
- The child writes its own exit status, so a call outlives a server that is killed. The server
  waits for every child (a pidfd each) and writes the status of a child that died without
  writing it (killed by signal N: ``exit 128+N``, as a shell reports it).
- The server exits after ``IDLE`` seconds *without a running call* and without a request, and
  when the openstacksdk it imported or this script changes on disk (a package upgraded, a new
  labbuilder's script put in place); it then stops listening at once (a new
  server may start) but waits for its running calls and reports them. Idle time is measured on
  the monotonic clock: a guest paused by a snapshot and its clock stepped afterwards changes
  nothing for a running call.
- A child whose caller went away (a check's timeout) is stopped.

Every start, call and exit is logged in ``LOG``. It uses only the standard library and must run
on the guest's Python (3.9 or later: pidfds), so labbuilder never imports it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from typing import Any

# WARMPYTHON_DIR, WARMPYTHON_PRELOAD (comma-separated modules, the first one watched) and
# WARMPYTHON_IDLE change where the server lives, what it imports and when it leaves:
# labbuilder's own tests use them.
DIRECTORY = os.environ.get("WARMPYTHON_DIR", "/run/labbuilder")
SOCKET = f"{DIRECTORY}/warmpython.sock"
LOCK = f"{DIRECTORY}/warmpython.lock"  # holds the running server's process id
LOG = f"{DIRECTORY}/warmpython.log"
IDLE = float(os.environ.get("WARMPYTHON_IDLE", "900"))  # seconds without a call, then it exits
START_WAIT = 180.0  # seconds a caller waits for a server that is starting to listen
# seconds a caller waits for a child to take its request
READY_WAIT = float(os.environ.get("WARMPYTHON_READY_WAIT", "60"))
PRELOAD = tuple(filter(None, os.environ.get("WARMPYTHON_PRELOAD", "").split(","))) or (
    "openstack",
    "openstack.connection",
    "openstack.compute.v2._proxy",
    "openstack.network.v2._proxy",
    "openstack.image.v2._proxy",
    "openstack.identity.v3._proxy",
    "openstack.block_storage.v3._proxy",
    "openstack.object_store.v1._proxy",
    "openstack.orchestration.v1._proxy",
    "openstack.placement.v1._proxy",
    "keystoneauth1.identity.v3",
)
MAX_FDS = 3
LOST_THE_LOCK = 0  # the server's exit status when another one runs already
NO_SERVER = 3  # the server's exit status when it cannot serve (no module, no pidfds)
MAX_REQUEST = 64 * 1024 * 1024


# --- the caller ------------------------------------------------------------------------------


def parse_command(argv: list[str], stdin_text: Any) -> tuple[str, str, list[str]]:
    """(code, file name, sys.argv) of ``-c CODE``, ``-`` and ``FILE`` command lines."""
    if not argv:
        raise SystemExit("usage: warmpython.py -c CODE | - | FILE [ARG ...]")
    if argv[0] == "-c":
        if len(argv) < 2:
            raise SystemExit("warmpython.py: -c needs an argument")
        return argv[1], "<string>", ["-c", *argv[2:]]
    if argv[0] == "-":
        return stdin_text(), "<stdin>", ["-", *argv[1:]]
    with open(argv[0], encoding="utf-8") as source:
        return source.read(), argv[0], argv


SHARED_TOKENS = "LABBUILDER_SHARED_TOKENS"  # a private folder: calls share tokens through it


def share_tokens(folder: str) -> None:
    """Calls made with ``LABBUILDER_SHARED_TOKENS`` set to a private folder (a board's look at
    a node: its checks at once) share one Identity token per set of credentials: the first
    call to need one asks keystone and leaves it there (mode 0600, under a lock), the others
    use it until it is two minutes from expiring. Under emulation a token costs a second of the
    controller's CPU (bcrypt), and a look runs a dozen API checks at once. They share the
    services' version documents (``share_discovery``) the same way."""
    try:
        from keystoneauth1.identity import base  # type: ignore[import-untyped]
    except ImportError:
        return
    share_discovery(folder)
    fetch = base.BaseIdentityPlugin.get_access
    if getattr(fetch, "shared", False):
        return

    def get_access(plugin: Any, session: Any, **kwargs: Any) -> Any:
        key = plugin.get_cache_id() if plugin.auth_ref is None else None
        if not key:
            return fetch(plugin, session, **kwargs)
        path = os.path.join(folder, hashlib.sha256(key.encode()).hexdigest())
        with open(path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            with contextlib.suppress(OSError, ValueError, KeyError):  # noqa: SIM117 - Python 3.9
                with open(path, encoding="utf-8") as state:
                    plugin.set_auth_state(state.read())
            shared = plugin.auth_ref
            access = fetch(plugin, session, **kwargs)  # asks keystone only if it must
            if plugin.auth_ref is not shared:
                write_private(path, plugin.get_auth_state())
            return access

    get_access.shared = True  # type: ignore[attr-defined]
    base.BaseIdentityPlugin.get_access = get_access


def share_discovery(folder: str) -> None:
    """Each new connection reads a service's version document (its API's versions and
    microversions) before its first call: the calls of one look read it once per URL and share
    it through ``folder``. A look lasts seconds; its services' versions do not change meanwhile,
    and a service that is down still fails the call that follows."""
    try:
        from keystoneauth1 import discover  # type: ignore[import-untyped]
    except ImportError:
        return
    fetch = discover.get_version_data
    if getattr(fetch, "shared", False):
        return

    def get_version_data(session: Any, url: str, authenticated: Any = None) -> Any:
        key = json.dumps(["discovery", url, authenticated])
        path = os.path.join(folder, hashlib.sha256(key.encode()).hexdigest())
        with contextlib.suppress(OSError, ValueError):  # noqa: SIM117 - Python 3.9
            with open(path, encoding="utf-8") as known:
                return json.load(known)
        data = fetch(session, url, authenticated=authenticated)
        with contextlib.suppress(OSError, TypeError, ValueError):
            write_private(path, json.dumps(data))
        return data

    get_version_data.shared = True  # type: ignore[attr-defined]
    discover.get_version_data = get_version_data


def write_private(path: str, text: str) -> None:
    """Write ``path`` whole (readers see the old file or the new one), mode 0600."""
    new = f"{path}.{os.getpid()}.new"
    fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)
    os.replace(new, path)


def run_here(code: str, filename: str, args: list[str]) -> int:
    """Run ``code`` as ``__main__`` in this process; its exit status, as python3 gives it."""
    sys.argv = args
    if os.environ.get(SHARED_TOKENS):
        share_tokens(os.environ[SHARED_TOKENS])
    if filename not in ("<string>", "<stdin>"):
        sys.path.insert(0, os.path.dirname(os.path.abspath(filename)))
    try:
        exec(compile(code, filename, "exec"), {"__name__": "__main__", "__file__": filename})
    except SystemExit as done:
        return exit_status(done.code)
    except BaseException:  # noqa: BLE001 - what python3 does: the traceback, status 1
        traceback.print_exc()
        return 1
    return 0


def exit_status(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def connect() -> socket.socket | None:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.connect(SOCKET)
        return client
    except OSError:
        client.close()
        return None


def start_server() -> socket.socket | None:
    """Start a server and connect to it: None if none listens within ``START_WAIT`` seconds
    (no openstacksdk, not root, or another caller's server still importing)."""
    try:
        os.makedirs(DIRECTORY, mode=0o700, exist_ok=True)
        with open(LOG, "ab") as log_file, open(os.devnull, "rb") as null:
            server = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--serve"],
                stdin=null, stdout=log_file, stderr=log_file, start_new_session=True,
                close_fds=True,
            )  # fmt: skip
    except OSError:
        return None
    deadline = time.monotonic() + START_WAIT
    while time.monotonic() < deadline:
        client = connect()
        if client is not None:
            return client
        status = server.poll()
        if status is not None and (status != LOST_THE_LOCK or not server_running()):
            return None
        time.sleep(0.2)
    return None


def server_running() -> bool:
    """Whether a server holds the lock (starting, importing or serving)."""
    try:
        with open(LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    return False


class Reply:
    """The lines a child (or its server) writes back to a caller."""

    def __init__(self, client: socket.socket) -> None:
        self.client = client
        self.buffer = b""

    def line(self, timeout: float | None) -> str | None:
        """The next line; None at the end of the conversation or after ``timeout`` seconds."""
        self.client.settimeout(timeout)
        while b"\n" not in self.buffer:
            try:
                chunk = self.client.recv(256)
            except OSError:  # a timeout, or the other end is gone
                return None
            if not chunk:
                return None
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode(errors="replace")


def call(code: str, filename: str, args: list[str]) -> int:
    """Run the code in the server (started if need be); here if the server does not take it."""
    client = connect() or start_server()
    if client is None:
        return run_here(code, filename, args)
    with client:
        request = json.dumps(
            {
                "code": code,
                "filename": filename,
                "argv": args,
                "env": dict(os.environ),
                "cwd": os.getcwd(),
            }
        ).encode()
        sys.stdout.flush()
        sys.stderr.flush()
        reply = Reply(client)
        try:
            client.sendall(len(request).to_bytes(8, "big") + request)
        except OSError:
            return run_here(code, filename, args)  # nobody took it: the code never started
        if reply.line(READY_WAIT) != "ready":
            return run_here(code, filename, args)  # the child runs nothing without our "go"
        try:  # our standard streams travel with the "go", to a child that is there to take them
            socket.send_fds(client, [b"go\n"], [0, 1, 2])
        except OSError:
            return run_here(code, filename, args)
        first = reply.line(None)
        if first is None or not first.startswith("run"):
            return run_here(code, filename, args)  # the child died before the code started
        last = reply.line(None)
        if last is None or not last.startswith("exit "):
            print(
                "warmpython: the server and the process running the code are both gone;"
                " the code's exit status is lost",
                file=sys.stderr,
            )
            return 1
        return int(last.split()[1])


# --- the server ------------------------------------------------------------------------------


def watched_module() -> str | None:
    module = sys.modules.get(PRELOAD[0])
    return getattr(module, "__file__", None) if module is not None else None


def mtime(path: str | None) -> float | None:
    if path is None:
        return None
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None


class Call:
    """A running call: its child process, the pidfd that says when it ends, and the caller's
    connection (to write the exit status of a child that could not)."""

    def __init__(self, pid: int, pidfd: int, conn: socket.socket) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self.conn = conn
        self.started = time.monotonic()


class Server:
    """Accepts calls and forks a child for each; see the module's docstring."""

    def __init__(self, listener: socket.socket, lock: Any, watched: str) -> None:
        self.listener: socket.socket | None = listener
        self.inode = os.stat(SOCKET).st_ino  # the socket file this server bound
        self.lock = lock
        self.watched = (watched, os.path.abspath(__file__))
        self.stamp = [mtime(path) for path in self.watched]
        self.calls: dict[int, Call] = {}  # by pidfd
        self.selector = selectors.DefaultSelector()
        self.selector.register(listener, selectors.EVENT_READ)
        self.last_activity = time.monotonic()

    def loop(self) -> int:
        while self.listener is not None or self.calls:
            timeout = None
            if self.listener is not None and not self.calls:
                timeout = max(0.0, self.last_activity + IDLE - time.monotonic())
            events = self.selector.select(timeout)
            idle = not events and not self.calls and self.listener is not None
            if idle and time.monotonic() >= self.last_activity + IDLE:
                log(f"server {os.getpid()}: idle for {IDLE:.0f} s, exiting")
                self.stop_listening()
            for key, _ in events:
                if key.fileobj is self.listener:
                    self.accept()
                else:
                    self.reap(self.calls[int(key.fd)])
        return 0

    def accept(self) -> None:
        assert self.listener is not None
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        self.last_activity = time.monotonic()
        changed = [p for p, m in zip(self.watched, self.stamp) if mtime(p) != m]  # noqa: B905 - Python 3.9
        if changed:
            log(f"server {os.getpid()}: {changed[0]} changed, exiting after its calls")
            conn.close()  # the caller hears no "ready" and runs the code itself
            self.stop_listening()
            return
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            self.become_child(conn)
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:  # the child has gone already and was reaped: nothing to report
            conn.close()
            return
        self.calls[pidfd] = Call(pid, pidfd, conn)
        self.selector.register(pidfd, selectors.EVENT_READ)
        log(f"server {os.getpid()}: call {pid} started")

    def become_child(self, conn: socket.socket) -> None:
        """In the forked child: drop the server's descriptors, run the call, exit."""
        status = 1
        try:
            self.selector.close()
            if self.listener is not None:
                self.listener.close()
            self.lock.close()  # the server's lock stays the server's
            for other in self.calls.values():
                os.close(other.pidfd)
                other.conn.close()  # its caller sees the end when its own child is gone
            status = child(conn)
        finally:
            os._exit(status)

    def reap(self, done: Call) -> None:
        self.selector.unregister(done.pidfd)
        del self.calls[done.pidfd]
        os.close(done.pidfd)
        _, wait_status = os.waitpid(done.pid, 0)
        if os.WIFSIGNALED(wait_status):
            status = 128 + os.WTERMSIG(wait_status)
        else:
            status = os.waitstatus_to_exitcode(wait_status) & 0xFF
        with contextlib.suppress(OSError), done.conn:
            done.conn.sendall(f"exit {status}\n".encode())  # the first "exit" line counts
        seconds = time.monotonic() - done.started
        log(f"server {os.getpid()}: call {done.pid} ended with exit {status} in {seconds:.1f} s")
        self.last_activity = time.monotonic()

    def stop_listening(self) -> None:
        """Let a new server start: remove this one's socket (if it is still this one's) and
        release the lock. Running calls go on and are reported."""
        if self.listener is None:
            return
        with contextlib.suppress(OSError):
            if os.stat(SOCKET).st_ino == self.inode:
                os.unlink(SOCKET)
        self.selector.unregister(self.listener)
        self.listener.close()
        self.listener = None
        with contextlib.suppress(OSError):
            fcntl.flock(self.lock, fcntl.LOCK_UN)


def warm_up() -> None:
    """Done once in the server for all its calls: what every new connection would otherwise
    do once in its process. keystoneauth finds its plugins among the installed packages' entry
    points (stevedore, kept in memory per ``sys.path``): 0.03 s natively, most of a second of
    an emulated CPU for each API call."""
    with contextlib.suppress(Exception):
        from keystoneauth1 import loading

        loading.get_plugin_loader("password")


def serve() -> int:
    os.makedirs(DIRECTORY, mode=0o700, exist_ok=True)
    lock = open(LOCK, "a")  # noqa: SIM115 - held for the server's life
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return LOST_THE_LOCK  # another server runs
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    if not hasattr(os, "pidfd_open"):
        log(f"server {os.getpid()}: this Python has no pidfds, exiting (callers run the code)")
        return NO_SERVER
    started = time.monotonic()
    for name in PRELOAD:
        with contextlib.suppress(Exception):
            __import__(name)
    warm_up()
    watched = watched_module()
    if watched is None:
        log(f"server {os.getpid()}: cannot import {PRELOAD[0]}, exiting (callers run the code)")
        return NO_SERVER
    with contextlib.suppress(FileNotFoundError):
        os.unlink(SOCKET)  # a server that was killed left it
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o077)
    listener.bind(SOCKET)
    os.umask(old_umask)
    listener.listen(64)
    server = Server(listener, lock, watched)
    log(f"server {os.getpid()} ready in {time.monotonic() - started:.1f} s (watching {watched})")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # calls go on and report themselves
    try:
        return server.loop()
    finally:
        server.stop_listening()


def child(conn: socket.socket) -> int:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        header = receive(conn, 8)
        size = int.from_bytes(header, "big")
        if len(header) != 8 or size > MAX_REQUEST:
            return 1
        data = receive(conn, size)
        if len(data) != size:
            return 1
        request = json.loads(data)
        conn.sendall(b"ready\n")
        answer, fds, _flags, _addr = socket.recv_fds(conn, 3, MAX_FDS)
        if answer != b"go\n" or len(fds) != MAX_FDS:
            for fd in fds:
                os.close(fd)
            return 1  # the caller gave up waiting and runs the code itself
        conn.sendall(f"run {os.getpid()}\n".encode())
    except (OSError, ValueError):
        return 1
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.environ.clear()
    os.environ.update(request["env"])
    with contextlib.suppress(OSError):
        os.chdir(request["cwd"])
    finished = threading.Event()
    watcher = threading.Thread(target=stop_when_caller_leaves, args=(conn, finished), daemon=True)
    watcher.start()
    status = run_here(request["code"], request["filename"], request["argv"])
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    finished.set()  # the caller, told the status, goes away: that stops nothing any more
    with contextlib.suppress(OSError):
        conn.sendall(f"exit {status}\n".encode())
    return status


def receive(conn: socket.socket, size: int) -> bytes:
    """``size`` bytes, or fewer if the caller stops sending."""
    data = b""
    while len(data) < size:
        chunk = conn.recv(min(1 << 20, size - len(data)))
        if not chunk:
            break
        data += chunk
    return data


def stop_when_caller_leaves(conn: socket.socket, finished: threading.Event) -> None:
    """The caller sends nothing more: an end of file means it went away (killed, timed out),
    unless the code has finished (its status is on the way to the caller)."""
    with contextlib.suppress(OSError):
        while conn.recv(64):
            pass
    if not finished.is_set():
        os._exit(143)


def log(message: str) -> None:
    print(time.strftime("%Y-%m-%d %H:%M:%S"), message, flush=True)


def main() -> int:
    if sys.argv[1:] == ["--serve"]:
        return serve()
    code, filename, args = parse_command(sys.argv[1:], sys.stdin.read)
    return call(code, filename, args)


if __name__ == "__main__":
    sys.exit(main())
