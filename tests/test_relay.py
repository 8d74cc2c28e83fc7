"""Relays into a lab: `labbuilder forward` (a host port to a node's port) and ssh's ProxyCommand
(`labbuilder relay`), against a real HTTP server, on the host and inside a real network
namespace (as an isolated lab's nodes are reached); and the ssh_config that uses the relay."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns

from labbuilder.adapters import netns, relay
from labbuilder.lifecycle.state import LabState
from labbuilder.lifecycle.status import render_ssh_config

NAMESPACE = "lbtest-relay-ns"


class Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        body = f"hello from {self.server.server_address[0]}\n".encode()  # type: ignore[index]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def serve(server: ThreadingHTTPServer) -> None:
    threading.Thread(target=server.serve_forever, daemon=True).start()


@pytest.fixture
def namespace() -> Iterator[str]:
    """A real network namespace with its loopback up: a stand-in for a lab's gateway."""
    pr_netns.create(NAMESPACE)
    try:
        with netns.inside(NAMESPACE), IPRoute() as inner:
            inner.link("set", index=inner.link_lookup(ifname="lo")[0], state="up")
        yield NAMESPACE
    finally:
        netns.remove_gateway(NAMESPACE)
    assert not netns.exists(NAMESPACE)


def test_forward_relays_a_host_port_to_a_port() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    serve(server)
    forward = relay.Forward(("127.0.0.1", 0), None, "127.0.0.1", server.server_address[1])
    threading.Thread(target=forward.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{forward.address[1]}/"
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.read() == b"hello from 127.0.0.1\n"
    finally:
        forward.close()
        server.shutdown()


@pytest.mark.integration
def test_forward_and_relay_reach_a_server_only_the_namespace_has(namespace: str) -> None:
    # The server listens on the namespace's own loopback: the host cannot reach it directly.
    with netns.inside(namespace):
        server = ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    serve(server)
    port = server.server_address[1]
    try:
        with socket.socket() as direct:
            direct.settimeout(2)
            assert direct.connect_ex(("127.0.0.1", port)) != 0  # not on the host
        forward = relay.Forward(("127.0.0.1", 0), namespace, "127.0.0.1", port)
        threading.Thread(target=forward.serve_forever, daemon=True).start()
        try:
            for _ in range(3):  # one connection after another, each relayed anew
                url = f"http://127.0.0.1:{forward.address[1]}/"
                with urllib.request.urlopen(url, timeout=10) as response:
                    assert response.read() == b"hello from 127.0.0.1\n"
        finally:
            forward.close()
        # ssh's ProxyCommand: standard input and output relayed to the port
        read_end, write_end = os.pipe()
        out_read, out_write = os.pipe()
        os.write(write_end, b"GET / HTTP/1.0\r\n\r\n")
        os.close(write_end)
        relay.pipe_stdio(relay.open_node(namespace, "127.0.0.1", port), read_end, out_write)
        os.close(out_write)
        answer = b""
        while chunk := os.read(out_read, 65536):
            answer += chunk
        os.close(read_end)
        os.close(out_read)
        assert answer.startswith(b"HTTP/1.0 200") and answer.endswith(b"hello from 127.0.0.1\n")
    finally:
        server.shutdown()
        server.server_close()


def test_an_isolated_labs_ssh_config_relays_through_labbuilder(tmp_path: Path) -> None:
    state = LabState("lbtest-cfg", tmp_path / "lbtest-cfg")
    state.directory.mkdir()
    record = {
        "user": "debian",
        "plan": {
            "nodes": [{"name": "controller", "nics": [{"address": "10.0.0.11"}]}],
            "gateway": {"namespace": "lbns-lbtest-cfg"},
        },
    }
    (state.directory / "lab.json").write_text(json.dumps(record))
    text = render_ssh_config(state)
    assert "  HostName 10.0.0.11" in text
    assert f"  ProxyCommand {sys.executable} -m labbuilder relay lbtest-cfg %h %p" in text
    del record["plan"]["gateway"]  # type: ignore[attr-defined]
    (state.directory / "lab.json").write_text(json.dumps(record))
    assert "ProxyCommand" not in render_ssh_config(state)


def test_relay_of_a_lab_that_is_not_up_is_refused(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "labbuilder", "relay", "lbtest-nosuchlab", "10.0.0.11", "22"],
        env={**os.environ, "LABBUILDER_STATE_DIR": str(tmp_path)},
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "lab lbtest-nosuchlab is not up on this host" in result.stderr
