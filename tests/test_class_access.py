"""A class's SSH entry for real: its own sshd on this host, plain OpenSSH clients with each
student's key, two students' labs stood in for by real network namespaces (each lab's gateway
namespace, holding the controller's address 10.0.0.11 with a real HTTP server on it). Each key
reaches its own student's lab, is refused for the other's and for anything but the entry's two
requests, and `close_access` leaves no sshd and no file. The whole class, with real guests, is
tested in test_install_e2e.py."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns

from labbuilder.adapters import netns, sshd
from labbuilder.api import classroom
from labbuilder.lab.classfile import load_class_file
from labbuilder.lab.classplan import plan_class
from labbuilder.lab.view import plan_as_dict
from labbuilder.lifecycle import registry
from labbuilder.lifecycle.state import new_ed25519_key, write_secret_file
from labbuilder.model.lab import HostFacts

pytestmark = [pytest.mark.integration]
CLASS = "lbtest-acc"
STUDENTS = ("alice", "bob")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def hello(student: str) -> type[BaseHTTPRequestHandler]:
    class Hello(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            body = f"hello from {student}'s controller\n".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    return Hello


def stand_in(namespace: str, student: str) -> ThreadingHTTPServer:
    """The lab's gateway namespace with the controller's address and an HTTP server on it."""
    pr_netns.create(namespace)
    with netns.inside(namespace), IPRoute() as inner:
        loopback = inner.link_lookup(ifname="lo")[0]
        inner.link("set", index=loopback, state="up")
        inner.addr("add", index=loopback, address="10.0.0.11", prefixlen=32)
        server = ThreadingHTTPServer(("10.0.0.11", 80), hello(student))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def klass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    monkeypatch.setenv("LABBUILDER_STATE_DIR", str(tmp_path / "state"))
    private, public = new_ed25519_key()
    bob_key = tmp_path / "bob-key"
    write_secret_file(bob_key, private)
    port = free_port()
    class_file = tmp_path / "class.toml"
    (tmp_path / "lab.toml").write_text(
        'name = "x"\n[nodes.network]\ncount = 0\n[nodes.compute]\ncount = 0\n'
    )
    class_file.write_text(
        f'name = "{CLASS}"\nlab = "lab.toml"\n[[students]]\nname = "alice"\n'
        f'[[students]]\nname = "bob"\nssh_key = "{public.decode()} bob@laptop"\n'
        f'[limits]\naccess_port = {port}\naccess_address = "127.0.0.1"\n'
        'access_host = "127.0.0.1"\n'
    )
    spec = load_class_file(class_file)
    planned = plan_class(spec, HostFacts())
    servers = []
    try:
        for student, lab, plan in planned.labs:
            state = tmp_path / "state" / "labs" / lab.name
            record = {"lab": lab.name, "plan": plan_as_dict(plan), "user": "debian"}
            write_secret_file(state / "lab.json", json.dumps(record).encode())
            registry.register(lab.name, state, lab.libvirt_uri)
            assert plan.gateway is not None
            servers.append(stand_in(plan.gateway.namespace, student))
        entry = classroom.open_access(spec)
        keys = {
            "alice": classroom.student_dir(spec, "alice") / f"{CLASS}-alice",
            "bob": bob_key,
        }
        known = tmp_path / "known_hosts"
        known.write_text(f"[127.0.0.1]:{port} {entry.host_key}\n")
        yield {"spec": spec, "port": port, "keys": keys, "known": known, "entry": entry}
    finally:
        classroom.close_access(spec)
        for server in servers:
            server.shutdown()
            server.server_close()
        for _, lab, plan in planned.labs:
            registry.unregister(lab.name)
            if plan.gateway is not None:
                netns.remove_gateway(plan.gateway.namespace)


def ask(
    klass: dict[str, Any], student: str, *request: str, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ssh", "-p", str(klass["port"]), "-i", str(klass["keys"][student]),
         "-o", "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={klass['known']}",
         "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
         "root@127.0.0.1", *request],
        input=stdin, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


GET = "GET / HTTP/1.0\r\nHost: controller\r\n\r\n"


def test_each_students_key_reaches_their_own_lab_and_nothing_else(klass: dict[str, Any]) -> None:
    alice = ask(klass, "alice", "relay", "controller", "80", stdin=GET)
    assert "hello from alice's controller" in alice.stdout, alice.stderr
    bob = ask(klass, "bob", "relay", "10.0.0.11", "80", stdin=GET)
    assert "hello from bob's controller" in bob.stdout, bob.stderr

    across = ask(klass, "bob", "relay", f"{CLASS}-alice-controller", "80", stdin=GET)
    assert across.returncode != 0 and "is not in lab lbtest-acc-bob" in across.stderr
    outside = ask(klass, "alice", "relay", "127.0.0.1", "22")
    assert outside.returncode != 0 and "is not in lab lbtest-acc-alice" in outside.stderr
    shell = ask(klass, "alice", "bash", "-c", "id")
    assert shell.returncode != 0 and "uid=0" not in shell.stdout
    assert "does not take" in shell.stderr
    forward = subprocess.run(
        ["ssh", "-p", str(klass["port"]), "-i", str(klass["keys"]["alice"]),
         "-o", f"UserKnownHostsFile={klass['known']}", "-o", "BatchMode=yes",
         "-o", "ExitOnForwardFailure=yes", "-N", "-L", "127.0.0.1:0:10.0.0.11:80",
         "root@127.0.0.1"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert forward.returncode != 0  # no port forwarding through the entry


def test_the_students_files_name_their_key_and_the_entry(klass: dict[str, Any]) -> None:
    spec = klass["spec"]
    folder = classroom.student_dir(spec, "alice")
    assert (folder / f"{CLASS}-alice").stat().st_mode & 0o777 == 0o600
    lines = (spec and (classroom.class_dir(spec) / "access" / "authorized_keys")).read_text()
    assert lines.count('restrict,pty,command="') == 2 and "bob@laptop" in lines
    config = sshd.pids(classroom.class_dir(spec) / "access" / "sshd_config")
    assert len(config) == 1


def test_closing_the_entry_leaves_no_sshd_and_no_file(klass: dict[str, Any]) -> None:
    spec = klass["spec"]
    config = classroom.class_dir(spec) / "access" / "sshd_config"
    assert classroom.close_access(spec)
    assert sshd.pids(config) == []
    assert not classroom.class_dir(spec).exists()
    refused = ask(klass, "alice", "relay", "controller", "80", stdin=GET)
    assert refused.returncode != 0
