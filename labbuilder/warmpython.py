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
and forks a child per request. The child takes the caller's stdin, stdout and stderr (passed over
the socket), environment, working directory and arguments, runs the code as ``__main__``, and
sends back its exit status, which becomes the caller's. The first call starts the server (in the
background, for every later call) and waits for it. Without a server, or if the server cannot
be reached, the code runs in the calling process, as ``python3`` would run it.

The server exits after ``IDLE`` seconds without a request, and when the openstacksdk it imported
changes on disk; it does not stay without one (a caller then runs the code itself). A child
whose caller went away (a check's timeout) is stopped. It uses only the standard library and
must run on the guest's Python, so labbuilder never imports it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from typing import Any

# WARMPYTHON_DIR and WARMPYTHON_PRELOAD (comma-separated modules, the first one watched) change
# where the server lives and what it imports: labbuilder's own tests use them.
DIRECTORY = os.environ.get("WARMPYTHON_DIR", "/run/labbuilder")
SOCKET = f"{DIRECTORY}/warmpython.sock"
LOCK = f"{DIRECTORY}/warmpython.lock"  # holds the running server's process id
LOG = f"{DIRECTORY}/warmpython.log"
IDLE = 900.0  # seconds without a request before the server exits
START_WAIT = 120.0  # seconds a caller waits for a server it started to listen
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


def run_here(code: str, filename: str, args: list[str]) -> int:
    """Run ``code`` as ``__main__`` in this process; its exit status, as python3 gives it."""
    sys.argv = args
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
    """Start a server and connect to it; None if it cannot start (no openstacksdk, not root)."""
    try:
        os.makedirs(DIRECTORY, mode=0o700, exist_ok=True)
        with open(LOG, "ab") as log, open(os.devnull, "rb") as null:
            server = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--serve"],
                stdin=null, stdout=log, stderr=log, start_new_session=True, close_fds=True,
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
        reply = b""
        try:
            socket.send_fds(client, [len(request).to_bytes(8, "big")], [0, 1, 2])
            client.sendall(request)
            while reply.count(b"\n") < 2:
                chunk = client.recv(64)
                if not chunk:
                    break
                reply += chunk
        except OSError:
            pass
    lines = reply.decode(errors="replace").splitlines()
    if not lines or lines[0] != "run":  # the server turned it down before running anything
        return run_here(code, filename, args)
    if len(lines) < 2 or not lines[1].startswith("exit "):
        print("warmpython: the code stopped without an exit status", file=sys.stderr)
        return 1
    return int(lines[1].split()[1])


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
    with contextlib.suppress(FileNotFoundError):
        os.unlink(SOCKET)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o077)
    listener.bind(SOCKET)
    os.umask(old_umask)
    listener.listen(64)  # callers queue while the imports below run
    started = time.monotonic()
    for name in PRELOAD:
        with contextlib.suppress(Exception):
            __import__(name)
    watched = watched_module()
    if watched is None:
        log(f"server {os.getpid()}: cannot import {PRELOAD[0]}, exiting (callers run the code)")
        listener.close()
        os.unlink(SOCKET)
        return 3
    stamp = mtime(watched)
    log(f"server {os.getpid()} ready in {time.monotonic() - started:.1f} s (watching {watched})")
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # leave no socket behind
    listener.settimeout(IDLE)
    try:
        while True:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                log(f"server {os.getpid()}: idle for {IDLE:.0f} s, exiting")
                return 0
            if mtime(watched) != stamp:
                log(f"server {os.getpid()}: {watched} changed, exiting")
                conn.close()  # the caller runs the code itself
                return 0
            sys.stdout.flush()
            sys.stderr.flush()
            if os.fork() == 0:
                listener.close()
                os._exit(child(conn))
            conn.close()
    finally:
        with contextlib.suppress(OSError):
            os.unlink(SOCKET)
        listener.close()


def child(conn: socket.socket) -> int:
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        header, fds, _flags, _addr = socket.recv_fds(conn, 8, MAX_FDS)
        size = int.from_bytes(header, "big")
        if len(header) != 8 or len(fds) != MAX_FDS or size > MAX_REQUEST:
            return 1
        data = b""
        while len(data) < size:
            chunk = conn.recv(min(1 << 20, size - len(data)))
            if not chunk:
                return 1
            data += chunk
        request = json.loads(data)
    except (OSError, ValueError):
        return 1
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    try:
        conn.sendall(b"run\n")
    except OSError:
        return 1
    os.environ.clear()
    os.environ.update(request["env"])
    with contextlib.suppress(OSError):
        os.chdir(request["cwd"])
    threading.Thread(target=stop_when_caller_leaves, args=(conn,), daemon=True).start()
    status = run_here(request["code"], request["filename"], request["argv"])
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    with contextlib.suppress(OSError):
        conn.sendall(f"exit {status}\n".encode())
    return status


def stop_when_caller_leaves(conn: socket.socket) -> None:
    """The caller sends nothing more: an end of file means it went away (killed, timed out)."""
    with contextlib.suppress(OSError):
        while conn.recv(64):
            pass
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
