"""Every failure leaves a report: ``install`` stopped by an error (its nodes refuse SSH, or
never answer) or by Ctrl-C, and ``up`` (and ``run``) failing half-way, write their JUnit and
JSON reports, print one ``error:`` line and a hint, and exit 1 (130 for Ctrl-C).

The installs run against a lab whose state says it is up (written as ``up`` writes it, with its
real keys) while its node's address is a loopback address of this host: nothing listens there,
or a socket that accepts and never speaks. No guest is booted.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest

from labbuilder.api import facade as api
from labbuilder.lab.view import plan_as_dict
from labbuilder.lifecycle.state import (
    ensure_host_keys,
    ensure_ssh_key,
    lab_state,
    write_secret_file,
)

RECIPE = {
    "recipe.toml": 'name = "lbtest-cli-tiny"\ndescription = "two tiny stages"\nguide = "none"\n',
    "stages/10-hello.toml": """
name = "hello"
[[steps]]
name = "greet"
roles = ["controller"]
run = "echo hello"
""",
    "stages/20-wait.toml": """
name = "wait"
[[steps]]
name = "nap"
roles = ["controller"]
run = "sleep 1"
""",
}


def lab_text(name: str) -> str:
    return f"""
name = "{name}"
[networks.management]
cidr = "10.249.240.0/24"
gateway = "10.249.240.1"
[networks.external]
cidr = "10.249.241.0/24"
gateway = "10.249.241.1"
floating_range = "10.249.241.101-10.249.241.200"
[networks.tunnel]
cidr = "10.249.242.0/24"
[nodes.controller]
[nodes.network]
count = 0
[nodes.compute]
count = 0
[options]
isolated = false  # its node is an SSH server on this host's own address
egress = "none"
role_images = false
"""


class Lab:
    def __init__(self, root: Path, address: str) -> None:
        self.name = f"lbtest-cli-{secrets.token_hex(3)}"
        self.root = root
        self.address = address
        self.env = {**os.environ, "LABBUILDER_STATE_DIR": str(root / "state"), "COLUMNS": "120"}
        self.file = root / "lab.toml"
        self.file.write_text(lab_text(self.name))
        self.recipe = root / "recipe"
        for name, text in RECIPE.items():
            (self.recipe / name).parent.mkdir(parents=True, exist_ok=True)
            (self.recipe / name).write_text(text)

    def write_up_state(self) -> None:
        """The lab's state as ``up`` leaves it, but its node at ``self.address``."""
        os.environ["LABBUILDER_STATE_DIR"] = self.env["LABBUILDER_STATE_DIR"]
        try:
            lab = api.load_lab(self.file)
            state = lab_state(lab.name)
            plan = plan_as_dict(api.plan_lab(lab, host_check=False).plan)
        finally:
            del os.environ["LABBUILDER_STATE_DIR"]
        for nic in plan["nodes"][0]["nics"]:
            if nic["address"] is not None:
                nic["address"] = self.address
                break
        ensure_ssh_key(state)
        ensure_host_keys(state, {"controller": self.address})
        record = {
            "lab": lab.name,
            "source": str(self.file),
            "plan": plan,
            "acceleration": "tcg",
            "virt_type": "qemu",
            "user": "debian",
            "image": {"name": "debian-12", "digest": "0" * 64},
            "images": {},
        }
        write_secret_file(state.directory / "lab.json", json.dumps(record).encode())

    def install(self) -> list[str]:
        return [sys.executable, "-m", "labbuilder", "install", "--file", str(self.file),
                "--recipe", str(self.recipe), "--no-snapshots"]  # fmt: skip

    def reports(self) -> Path:
        return self.root / "state" / "labs" / self.name / "reports"


def free_loopback() -> str:
    """A loopback address of this host where nothing listens on port 22."""
    for _ in range(50):
        address = f"127.{secrets.randbelow(200) + 20}.{secrets.randbelow(250) + 1}.{secrets.randbelow(250) + 2}"
        with socket.socket() as probe:
            probe.settimeout(1)
            if probe.connect_ex((address, 22)) != 0:
                return address
    raise RuntimeError("no free loopback address")


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    made = Lab(tmp_path, free_loopback())
    made.write_up_state()
    yield made


def one_error_line(stderr: str) -> tuple[str, str]:
    lines = [line for line in stderr.splitlines() if line.startswith(("error:", "hint:"))]
    assert "Traceback" not in stderr
    assert len(lines) == 2, stderr
    assert lines[0].startswith("error: ") and lines[1].startswith("hint: "), stderr
    return lines[0], lines[1]


def read_reports(folder: Path) -> tuple[dict[str, object], ET.Element]:
    report = json.loads((folder / "latest.json").read_text())
    junit = ET.parse(folder / "latest.xml").getroot()
    return report, junit


def test_an_install_whose_node_refuses_ssh_writes_its_reports_and_exits_1(lab: Lab) -> None:
    started = time.monotonic()
    result = subprocess.run(lab.install(), env=lab.env, capture_output=True, text=True,
                            timeout=120, check=False)  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    error, hint = one_error_line(result.stderr)
    assert "cannot log in to the lab's nodes over SSH" in error and "controller" in error
    assert "reports:" in hint and str(lab.reports()) in hint
    report, junit = read_reports(lab.reports())
    assert report["result"] == "failed"
    assert report["error"]["where"] == "connecting to the lab's nodes over SSH"  # type: ignore[index]
    assert report["error"]["type"] == "InstallError"  # type: ignore[index]
    stages = report["stages"]
    assert [s["name"] for s in stages] == ["hello", "wait"]  # type: ignore[attr-defined]
    assert {step["status"] for s in stages for step in s["steps"]} == {"not-run"}  # type: ignore[attr-defined]
    errors = [e for e in junit.iter("error") if e.get("type") == "InstallError"]
    assert len(errors) == 1 and "Connection refused" in (errors[0].get("message") or "")
    assert len(list(junit.iter("skipped"))) == 2  # the two steps, not run
    assert (lab.reports() / "latest.json").resolve().stat().st_mode & 0o777 == 0o600
    as_json = subprocess.run([*lab.install(), "--json"], env=lab.env, capture_output=True,
                             text=True, timeout=120, check=False)  # fmt: skip
    assert as_json.returncode == 1
    assert json.loads(as_json.stdout)["error"]["type"] == "InstallError"  # the report, on stdout
    assert time.monotonic() - started < 60


class SilentListener:
    """A TCP port 22 that accepts connections and never says a word (an SSH server that hangs
    before its banner)."""

    def __init__(self, address: str) -> None:
        self.server = socket.create_server((address, 22))
        self.accepted = threading.Event()
        self.clients: list[socket.socket] = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            self.clients.append(client)
            self.accepted.set()

    def close(self) -> None:
        self.server.close()
        for client in self.clients:
            client.close()


def interrupt_install(lab: Lab, ready: threading.Event, what: str, wait: float) -> str:
    """Start ``labbuilder install``, press Ctrl-C half a second after ``ready`` is set, and
    return its stderr once it has exited 130 at once (not after a connection's timeout)."""
    process = subprocess.Popen(lab.install(), env=lab.env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert ready.wait(wait), what
        time.sleep(0.5)
        interrupted = time.monotonic()
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, out + err
    assert time.monotonic() - interrupted < 10
    return err


def test_ctrl_c_during_an_install_exits_130_with_its_reports(lab: Lab) -> None:
    listener = SilentListener(lab.address)
    try:
        # Ctrl-C in the middle of the SSH handshake, waiting for the banner.
        err = interrupt_install(lab, listener.accepted, "the install never tried to log in", 30)
    finally:
        listener.close()
    error, hint = one_error_line(err)
    assert error == "error: interrupted"
    assert "reports:" in hint
    report, junit = read_reports(lab.reports())
    assert report["result"] == "interrupted"
    assert report["error"] == {  # type: ignore[comparison-overlap]
        "type": "interrupted",
        "where": "connecting to the lab's nodes over SSH",
        "message": "interrupted (Ctrl-C)",
        "hint": None,
    }
    assert [e.get("type") for e in junit.iter("error")] == ["interrupted"]


class DroppingGuest(paramiko.ServerInterface):
    """An SSH server standing in for a node: it accepts the lab's key and presents the node's
    host key, ends every command with exit status 0 and no output (a node with no run-once
    markers), but drops the whole connection in the middle of the script that holds
    ``DROP_MARK``, and takes no login after that."""

    def __init__(self, lab: Lab, *, hang: bool = False) -> None:
        self.hang = hang  # instead of dropping the connection, keep it (the script runs on)
        self.hanging = threading.Event()
        state = lab.root / "state" / "labs" / lab.name
        self.host_key = paramiko.Ed25519Key.from_private_key_file(
            str(state / "host-keys" / "controller")
        )
        self.client_key = (state / "id_ed25519.pub").read_text().split()[1]
        self.server = socket.create_server((lab.address, 22))
        self.dropped = threading.Event()
        self.transports: list[paramiko.Transport] = []
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while not self.dropped.is_set():
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if self.dropped.is_set():
                client.close()
                return
            transport = paramiko.Transport(client)
            transport.add_server_key(self.host_key)
            self.transports.append(transport)
            transport.start_server(server=self)
            threading.Thread(target=self.channels, args=(transport,), daemon=True).start()

    def channels(self, transport: paramiko.Transport) -> None:
        opened = []  # kept: a channel object that is collected closes its channel
        while transport.is_active():
            opened.append(transport.accept(1))

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        ok = key.get_base64() == self.client_key
        return paramiko.AUTH_SUCCESSFUL if ok else paramiko.AUTH_FAILED

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind == "session":
            return paramiko.OPEN_SUCCEEDED
        return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        threading.Thread(target=self.run, args=(channel,), daemon=True).start()
        return True

    def run(self, channel: paramiko.Channel) -> None:
        script = b""
        while chunk := channel.recv(65536):
            script += chunk
        if DROP_MARK.encode() in script and self.hang:
            self.hanging.set()
            return
        if DROP_MARK.encode() in script:
            time.sleep(0.5)  # the script runs; then the connection is gone for good
            self.close()
            return
        channel.send_exit_status(0)
        channel.close()

    def close(self) -> None:
        self.dropped.set()
        self.server.close()
        for transport in self.transports:
            transport.close()


DROP_MARK = "lbtest-cli-the-connection-drops-here"


def test_a_connection_lost_in_the_middle_of_a_step_is_reported(lab: Lab) -> None:
    """The node's SSH connection drops during a step and no new login succeeds before the
    step's time is up: that step fails with the lost connection as its output, the next stage
    is not run, the reports say so, and the install exits 1 with its failure report."""
    stage = lab.recipe / "stages" / "10-hello.toml"
    stage.write_text(
        stage.read_text().replace('run = "echo hello"', f'run = "echo {DROP_MARK}"\ntimeout = 6')
    )
    guest = DroppingGuest(lab)
    try:
        result = subprocess.run(lab.install(), env=lab.env, capture_output=True, text=True,
                                timeout=120, check=False)  # fmt: skip
    finally:
        guest.close()
    assert guest.dropped.is_set(), result.stderr
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert "install failed: stage hello, step greet, node controller" in result.stdout
    report, junit = read_reports(lab.reports())
    assert report["result"] == "failed"
    assert report["failure"] == {"stage": "hello", "step": "greet", "node": "controller"}
    hello, wait = report["stages"]  # type: ignore[misc]
    assert [(s["step"], s["status"]) for s in hello["steps"]] == [("greet", "failed")]
    assert "lost the SSH connection to node controller" in hello["steps"][0]["output_tail"]
    assert [(s["step"], s["status"]) for s in wait["steps"]] == [("nap", "not-run")]
    failed = [
        case.get("name") for case in junit.iter("testcase") if case.find("failure") is not None
    ]
    assert failed == ["greet: greet"]


def test_ctrl_c_in_the_middle_of_a_step_exits_130_at_once_with_its_reports(lab: Lab) -> None:
    """Ctrl-C while a step runs (the node keeps it running and says nothing): the install
    leaves at once with exit 130, and its reports have the step as failed (interrupted)."""
    stage = lab.recipe / "stages" / "10-hello.toml"
    stage.write_text(stage.read_text().replace('run = "echo hello"', f'run = "echo {DROP_MARK}"'))
    guest = DroppingGuest(lab, hang=True)
    try:
        err = interrupt_install(lab, guest.hanging, "the step never started", 60)
    finally:
        guest.close()
    error, hint = one_error_line(err)
    assert error == "error: interrupted" and "reports:" in hint
    report, junit = read_reports(lab.reports())
    assert report["result"] == "interrupted"
    assert report["error"]["where"] == "stage hello"  # type: ignore[index]
    hello, wait = report["stages"]  # type: ignore[misc]
    assert [(s["step"], s["status"]) for s in hello["steps"]] == [("greet", "failed")]
    assert hello["steps"][0]["output_tail"] == "interrupted (Ctrl-C)"
    assert [(s["step"], s["status"]) for s in wait["steps"]] == [("nap", "not-run")]
    assert [f.get("type") for f in junit.iter("failure")] == ["RunStopped"]


@pytest.mark.integration
def test_an_up_that_fails_half_way_leaves_its_report_and_run_copies_it(tmp_path: Path) -> None:
    """`up` fails after it made the lab's networks (its storage pool's folder cannot be made):
    it removes what it made, writes reports/<lab>/up-latest.json and .xml, exits 1; `run`
    copies that report to --report-dir."""
    import libvirt
    from lablib import TEST_CACHE, free_subnets

    from labbuilder.adapters import libvirt as lv

    lab = Lab(tmp_path, "127.0.0.1")
    management, external, tunnel = free_subnets(3)
    text = lab_text(lab.name)
    for old, new in (("10.249.240", management), ("10.249.241", external), ("10.249.242", tunnel)):
        text = text.replace(old, new.rsplit(".", 1)[0])
    lab.file.write_text(text)
    (tmp_path / "afile").write_text("")
    pool = f"lbtest-cli-pool-{secrets.token_hex(3)}"
    env = {**lab.env, "LABBUILDER_CACHE_DIR": str(TEST_CACHE), "LABBUILDER_POOL": pool,
           "LABBUILDER_POOL_DIR": str(tmp_path / "afile" / "pool")}  # fmt: skip
    pool_left = True
    try:
        result = subprocess.run(
            [sys.executable, "-m", "labbuilder", "run", str(lab.file), "--recipe",
             str(lab.recipe), "--report-dir", str(tmp_path / "out")],
            env=env, capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
    finally:
        down = subprocess.run([sys.executable, "-m", "labbuilder", "down", str(lab.file)],
                              env=env, capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
        conn = lv.connect("qemu:///system")
        try:
            try:  # a pool that never started is not kept: nothing half-made
                conn.storagePoolLookupByName(pool).undefine()
            except libvirt.libvirtError:
                pool_left = False
        finally:
            conn.close()
    assert result.returncode == 1, result.stdout + result.stderr
    assert not pool_left
    assert down.returncode == 0, down.stderr
    assert not (Path("/var/lib/labbuilder/registry") / f"{lab.name}.json").exists()
    error, hint = one_error_line(result.stderr)
    assert "afile" in error
    up_dir = tmp_path / "state" / "reports" / lab.name
    assert f"report: {up_dir}" in hint and f"reports in {tmp_path / 'out'}" in hint
    for folder in (up_dir, tmp_path / "out"):
        report = json.loads((folder / "up-latest.json").read_text())
        assert report["command"] == "up" and report["result"] == "failed"
        assert "afile" in report["error"]["message"]
        assert any("network" in entry["message"] for entry in report["log"])
        junit = ET.parse(folder / "up-latest.xml").getroot()
        assert [case.get("name") for case in junit.iter("testcase")][0] == "bring-up"
        assert len(list(junit.iter("error"))) == 1
    assert "0 of 1 runs passed" in result.stdout
