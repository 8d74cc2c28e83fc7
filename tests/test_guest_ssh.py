"""SSH into lab nodes: host keys, timeouts and dropped connections.

The first part runs ``SSHSession``'s runner over local processes (``localssh.LocalSession``):
the shell that starts a script detached, follows its output and stops it is the real one. The
second part (``integration``) boots one small lab under the real libvirtd and checks the same
against a real Debian 12 guest: a wrong host key is refused, a step that times out (or whose
session is closed) leaves no process behind, a step survives its connection being cut (sshd
restarted and its sessions killed in the guest, or the host's side closed) with the engine's
JUnit/JSON report written, and a step whose node stays unreachable fails with the reason in
that report. The fast path's warm Python runs there too: a call survives the whole guest paused
and its clock stepped by an hour, and its server killed. One boot; the module takes about three
and a half minutes under TCG.
"""

from __future__ import annotations

import contextlib
import json
import random
import socket
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paramiko
import pytest
from localssh import LocalSession

from labbuilder.adapters.ssh import (
    _FOLLOW,
    _START,
    KILL_GRACE_STEPS,
    ConnectionLostError,
    HostKeyError,
    SSHSession,
    _whole,
)
from labbuilder.common.errors import (
    GuestAuthenticationError,
    GuestCommandError,
    GuestTransportError,
)
from labbuilder.install.engine import Engine, Status
from labbuilder.install.guest import WARM_PYTHON_SOURCE
from labbuilder.install.report import RunInfo, compare, write_reports
from labbuilder.lifecycle import readiness
from labbuilder.lifecycle.readiness import NodeTarget
from labbuilder.lifecycle.state import LabState, new_ed25519_key
from labbuilder.recipe.model import RenderedStage, RenderedStep

LAB = "lbtest-ssh"
POOL = "lbtest-ssh-pool"


def empty_soon(folder: Path) -> bool:
    """Whether ``folder`` is empty within a few seconds (runs are removed in the background)."""
    end = time.monotonic() + 5
    while any(folder.iterdir()):
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


def pids(pattern: str) -> list[str]:
    found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True, check=False)
    return found.stdout.split()


# --- the runner, over local processes ---------------------------------------------------------


def test_a_script_runs_detached_and_returns_its_output_and_exit_status(tmp_path: Path) -> None:
    session = LocalSession(tmp_path / "run")
    lines: list[str] = []
    result = session.run_script(
        "echo one\necho two >&2\nprintf 'no newline'\nexit 3\n", on_output=lines.append
    )
    assert (result.rc, result.stdout, result.stderr) == (3, "one\nno newline", "two\n")
    assert lines == ["one", "! two", "no newline"]
    assert "echo one" not in session.channels[0].command  # the script went on stdin
    assert empty_soon(tmp_path / "run")  # its private directory is gone
    assert session.run_script("cat; read -r x || echo stdin is empty\n").stdout == (
        "stdin is empty\n"
    )


def test_a_conversation_answers_line_by_line_on_one_channel(tmp_path: Path) -> None:
    """``converse``: many quick round trips on one channel (the clock step's), the command's
    end and silence named, and its exit status and errors once it is closed."""
    session = LocalSession(tmp_path / "run")
    echo = 'while read -r word rest; do [ "$word" = end ] && { echo bye >&2; exit 4; }; [ "$word" = mute ] && sleep 30; echo "got $word"; done'
    talk = session.converse("bash -c %s", echo)
    started = time.monotonic()
    assert [talk.ask(f"q{i} with words", 5) for i in range(20)] == [f"got q{i}" for i in range(20)]
    assert time.monotonic() - started < 5 and len(session.channels) == 1
    result = talk.close(5)
    assert (result.rc, result.stdout, result.stderr) == (0, "", "")

    talk = session.converse("bash -c %s", echo)
    with pytest.raises(
        GuestCommandError,
        match=r"the command ended \(exit code 4\) instead of answering 'end': bye",
    ):
        talk.ask("end", 5)
    talk = session.converse("bash -c %s", echo)
    started = time.monotonic()
    with pytest.raises(GuestCommandError, match="did not answer 'mute' within 1 s"):
        talk.ask("mute", 1)
    assert time.monotonic() - started < 3
    assert talk.close(0.5).rc == 124


def test_a_script_that_arrives_incomplete_does_not_run(tmp_path: Path) -> None:
    session = LocalSession(tmp_path / "run")
    script = b"touch " + str(tmp_path / "ran").encode() + b"\n"
    channel = session._channel(session._runner(_START + _FOLLOW, "cut", "bash", len(script) + 9))
    channel.sendall(script)  # the rest never comes: the connection dropped
    channel.shutdown_write()
    while not channel.exit_status_ready():
        time.sleep(0.05)
    assert channel.recv_exit_status() == 255
    assert b"the script arrived incomplete; it did not run" in channel.recv_stderr(4096)
    assert not (tmp_path / "ran").exists()


def test_a_shell_script_cut_short_on_the_way_runs_nothing(tmp_path: Path) -> None:
    session = LocalSession(tmp_path / "run")
    data, size = _whole(f"touch {tmp_path / 'ran'}\nexit 0\n", "bash")
    assert size == "-"
    channel = session._channel(session._runner(_START + _FOLLOW, "cut", "bash", size))
    channel.sendall(data[:-3])  # the connection dropped before the last bytes
    channel.shutdown_write()
    while not channel.exit_status_ready():
        time.sleep(0.05)
    assert channel.recv_exit_status() == 2  # bash: a syntax error, nothing run
    assert b"unexpected end of file" in channel.recv_stderr(4096)
    assert not (tmp_path / "ran").exists()


def test_a_dropped_connection_is_followed_again_from_where_it_stopped(tmp_path: Path) -> None:
    session = LocalSession(tmp_path / "run")
    lines: list[str] = []
    dropper = session.drop_after(1.0)
    result = session.run_script(
        "for i in $(seq 1 8); do echo line $i; echo err $i >&2; sleep 0.25; done\nexit 5\n",
        on_output=lines.append,
        timeout=60,
    )
    dropper.join()
    assert result.rc == 5
    assert result.stdout == "".join(f"line {i}\n" for i in range(1, 9))  # each line once
    assert result.stderr == "".join(f"err {i}\n" for i in range(1, 9))
    assert session.logins == 1
    assert any("the SSH connection dropped" in line for line in lines)


def test_only_the_newest_follower_collects_the_exit_status(tmp_path: Path) -> None:
    # A follower of the dropped connection that writes nothing more is not hung up: it sees
    # the script end too, and must leave the exit status to the new one.
    for _ in range(4):
        session = LocalSession(tmp_path / "run")
        session.drop_after(0.5)
        result = session.run_script("echo before\nsleep 1.5\nexit 4\n", timeout=60)
        assert (result.rc, result.stdout) == (4, "before\n"), result
        assert session.logins == 1


def test_a_timed_out_script_has_all_its_processes_stopped(tmp_path: Path) -> None:
    session = LocalSession(tmp_path / "run")
    script = (
        "sleep 977001 &\n"
        "bash -c \"trap '' TERM; sleep 977002\" &\n"  # ignores TERM: needs the KILL
        "sleep 977003\n"
    )
    started = time.monotonic()
    result = session.run_script(script, timeout=2)
    assert result.rc == 124
    assert "timed out after 2 s; its processes in the guest were stopped" in result.stderr
    assert time.monotonic() - started < 15
    assert pids("sleep 97700[123]") == []
    assert empty_soon(tmp_path / "run")


@pytest.mark.parametrize("after", [0.5, 0.0, 0.002, 0.01, 0.03, 0.1])
def test_closing_a_session_stops_the_scripts_it_runs(tmp_path: Path, after: float) -> None:
    # Also when the close comes while the script is still being started (an install
    # interrupted at once, or a loaded host): the script must not start after it.
    session = LocalSession(tmp_path / "run")
    results: list[object] = []

    def run() -> None:
        try:
            results.append(session.run_script("sleep 977005\n", timeout=60))
        except ConnectionLostError as err:
            results.append(err)

    worker = threading.Thread(target=run)
    try:
        worker.start()
        time.sleep(after)
        session.close()  # as an interrupted install does
        worker.join(20)
        assert not worker.is_alive() and len(results) == 1
        # The stop is under way when close() returns: it ends within its grace period. A
        # script that started after it would run on (for days), so it is not gone by then.
        end = time.monotonic() + KILL_GRACE_STEPS / 10 + 5
        while pids("sleep 977005") and time.monotonic() < end:
            time.sleep(0.05)
        assert pids("sleep 977005") == []
        time.sleep(0.3)  # a script that would start late has started by now
        assert pids("sleep 977005") == []
    finally:
        subprocess.run(["pkill", "-KILL", "-f", "sleep 977005"], check=False)


def test_a_connection_that_does_not_come_back_ends_in_connection_lost(tmp_path: Path) -> None:
    session = LocalSession(tmp_path / "run")
    session.refuse_logins = True
    session.drop_after(0.5)
    started = time.monotonic()
    try:
        with pytest.raises(ConnectionLostError, match="could not log in again: connection refused"):
            session.run_script("sleep 977004\n", timeout=4)
        assert time.monotonic() - started < 15  # within the step's time, not without end
    finally:
        subprocess.run(["pkill", "-f", "sleep 977004"], check=False)


def test_a_missing_known_hosts_is_refused_before_connecting(tmp_path: Path) -> None:
    with pytest.raises(HostKeyError) as caught:
        SSHSession("192.0.2.1", "debian", tmp_path / "id_ed25519", node="controller", timeout=1)
    error = caught.value
    assert error.message.startswith("SSH host key check failed for node controller (192.0.2.1)")
    assert str(tmp_path / "known_hosts") in error.message
    assert error.hint is not None and "older labbuilder" in error.hint


class RefusingServer(paramiko.ServerInterface):
    """An SSH server on port 22 of a loopback address that takes no key (a node whose
    cloud-init has not installed the lab's key yet), or with ``banner`` one that is no SSH
    server at all."""

    def __init__(self, address: str, host_key_file: Path, *, banner: bytes | None = None) -> None:
        self.host_key = paramiko.Ed25519Key.from_private_key_file(str(host_key_file))
        self.banner = banner
        self.server = socket.create_server((address, 22))
        self.transports: list[paramiko.Transport] = []
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if self.banner is not None:
                client.sendall(self.banner)
                client.close()
                continue
            transport = paramiko.Transport(client)
            transport.add_server_key(self.host_key)
            self.transports.append(transport)
            transport.start_server(server=self)

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        return paramiko.AUTH_FAILED

    def close(self) -> None:
        self.server.close()
        for transport in self.transports:
            transport.close()


@pytest.fixture
def refusing_node(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(address, key) of a lab node whose host key is known, and the lab's key file."""
    address = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(2, 254)}"
    host_private, host_public = new_ed25519_key()
    (tmp_path / "host_key").write_bytes(host_private)
    (tmp_path / "known_hosts").write_text(f"{address} {host_public.decode()}\n")
    lab_private, _ = new_ed25519_key()
    (tmp_path / "id_ed25519").write_bytes(lab_private)
    (tmp_path / "id_ed25519").chmod(0o600)
    yield address, tmp_path


def test_a_refused_key_is_an_authentication_error(refusing_node: tuple[str, Path]) -> None:
    address, folder = refusing_node
    server = RefusingServer(address, folder / "host_key")
    try:
        with pytest.raises(GuestAuthenticationError):
            SSHSession(address, "debian", folder / "id_ed25519", node="controller", timeout=5)
        target = NodeTarget("controller", address, "52:54:00:00:00:01", "debian",
                            folder / "id_ed25519", folder / "console.log")  # fmt: skip
        assert readiness._login(target) == "the lab key is not accepted for user debian yet"
    finally:
        server.close()


def test_a_server_that_is_not_ssh_is_a_transport_error(refusing_node: tuple[str, Path]) -> None:
    address, folder = refusing_node
    server = RefusingServer(address, folder / "host_key", banner=b"220 mail server here\r\n")
    try:
        with pytest.raises(GuestTransportError) as failed:
            SSHSession(address, "debian", folder / "id_ed25519", node="controller", timeout=5)
        assert not isinstance(failed.value, GuestAuthenticationError)
        assert failed.value.message.startswith("Error reading SSH protocol banner")
        target = NodeTarget("controller", address, "52:54:00:00:00:01", "debian",
                            folder / "id_ed25519", folder / "console.log")  # fmt: skip
        # paramiko's own words, with or without the socket's (a reset races the close)
        assert (readiness._login(target) or "").startswith("ssh: Error reading SSH protocol banner")
    finally:
        server.close()


# --- against a real guest ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One small lab (the controller alone), up for this module; removed at the end."""
    from lablib import lab_environment, one_node_lab, remove_labs, run_labbuilder

    env = lab_environment(tmp_path_factory.mktemp("ssh-state"), POOL)
    lab_file = tmp_path_factory.mktemp("ssh-lab") / "lab.toml"
    lab_file.write_text(one_node_lab(LAB))
    try:
        started = time.monotonic()
        up = run_labbuilder("up", str(lab_file), env=env)
        assert up.returncode == 0, up.stdout + up.stderr
        state = LabState(LAB, Path(env["LABBUILDER_STATE_DIR"]) / "labs" / LAB)
        record = json.loads((state.directory / "lab.json").read_text())
        node = record["plan"]["nodes"][0]
        yield {
            "state": state,
            "record": record,
            "address": node["nics"][0]["address"],
            "user": record["user"],
            "up_seconds": time.monotonic() - started,
        }
    finally:
        remove_labs([LAB], env)


def connect(guest: dict[str, Any], **kwargs: Any) -> SSHSession:
    state = guest["state"]
    return SSHSession(guest["address"], guest["user"], state.key_path, node="controller", **kwargs)


@pytest.mark.integration
def test_a_wrong_host_key_is_refused_and_the_right_one_works(
    guest: dict[str, Any], tmp_path: Path
) -> None:
    from labbuilder.api.install import _connect
    from labbuilder.lab.view import plan_from_dict

    state = guest["state"]
    with connect(guest) as session:
        assert session.run("hostname").stdout.strip() == "controller"

    known = state.known_hosts_path.read_text()
    kind, blob = known.split()[1:3]
    other = new_ed25519_key()[1].decode().split()[1]
    wrong = tmp_path / "known_hosts"
    wrong.write_text(known.replace(blob, other))
    with pytest.raises(HostKeyError) as caught:
        connect(guest, known_hosts=wrong)
    message = caught.value.message
    assert f"node controller ({guest['address']})" in message and str(wrong) in message
    assert "refusing to connect" in message and "\n" not in message
    assert caught.value.hint is not None

    unknown = tmp_path / "unknown_hosts"
    unknown.write_text(f"elsewhere,192.0.2.9 {kind} {blob}\n")
    with pytest.raises(HostKeyError, match="holds no key for it"):
        connect(guest, known_hosts=unknown)

    # The install's sessions check the lab's own known_hosts the same way.
    copy = LabState(LAB, tmp_path / "state")
    copy.directory.mkdir()
    copy.key_path.write_bytes(state.key_path.read_bytes())
    copy.key_path.chmod(0o600)
    copy.known_hosts_path.write_text(wrong.read_text())
    plan = plan_from_dict(guest["record"]["plan"])
    with pytest.raises(HostKeyError, match="refusing to connect"):
        _connect(plan, guest["record"], copy)
    copy.known_hosts_path.write_text(known)
    for session in _connect(plan, guest["record"], copy).values():
        session.close()


@pytest.mark.integration
def test_a_step_that_times_out_leaves_no_process_in_the_guest(guest: dict[str, Any]) -> None:
    script = (
        "sleep 988001 &\n"
        "bash -c \"trap '' TERM; sleep 988002\" &\n"  # a child that ignores TERM
        "sleep 988003\n"
    )
    with connect(guest) as session:
        result = session.run_script(script, timeout=5)
    assert result.rc == 124, result
    assert "its processes in the guest were stopped" in result.stderr
    with connect(guest) as fresh:
        left = fresh.run("pgrep -af 'sleep 98800[123]' || true")
        assert left.stdout.strip() == "", left.stdout
        runs = fresh.run("sudo ls -A /run/labbuilder")
        assert runs.stdout.strip() == "", runs.stdout  # no run directory left behind

    # A session closed while its script runs (an interrupted install) stops it too.
    session = connect(guest)

    def run() -> None:
        with contextlib.suppress(ConnectionLostError):  # the session closed under it
            session.run_script("sleep 988004\n")

    worker = threading.Thread(target=run)
    worker.start()
    time.sleep(3)
    session.close()
    worker.join(60)
    with connect(guest) as fresh:
        end = time.monotonic() + 30
        while fresh.run("pgrep -f 'sleep 988004'").rc == 0:
            assert time.monotonic() < end, "the script of a closed session still runs"
            time.sleep(1)


STEP_SCRIPT = (
    "#!/bin/bash\nset -euo pipefail\n"
    "for i in $(seq 1 20); do echo line $i; echo err $i >&2; sleep 0.5; done\n"
)
# sshd restarted and every SSH session's processes killed in the guest, from outside them.
CUT_IN_GUEST = (
    "systemd-run --quiet --on-active=3 --timer-property=AccuracySec=100ms "
    "sh -c 'systemctl restart ssh; pkill -f \"^sshd: .*@notty\"'"
)


def _step(name: str, script: str, timeout: float = 300) -> RenderedStep:
    return RenderedStep(
        stage="cut",
        step=name,
        node="controller",
        title=f"a step whose connection is cut ({name})",
        guide="",
        script=script,
        checks=(),
        after=(),
        digest=f"{name}-{time.time()}",  # runs every time
        timeout=timeout,
        retries=0,
    )


@pytest.mark.integration
def test_a_step_survives_its_connection_being_cut_and_its_report_is_written(
    guest: dict[str, Any], tmp_path: Path
) -> None:
    with connect(guest) as session:
        # The guest's side: sshd restarted and the sessions' processes killed mid-step.
        session.run(CUT_IN_GUEST, sudo=True).check("controller")
        before = session._generation
        lines: list[str] = []
        result = session.run_script(STEP_SCRIPT + "exit 3\n", timeout=300, on_output=lines.append)
        assert result.rc == 3, result
        assert result.stdout == "".join(f"line {i}\n" for i in range(1, 21))
        assert result.stderr == "".join(f"err {i}\n" for i in range(1, 21))
        assert session._generation > before, "the cut did not drop the connection"

        # The host's side: the transport closed mid-step, inside an engine run with reports.
        def cut_host_side() -> None:
            time.sleep(4)
            session._client.close()

        cutter = threading.Thread(target=cut_host_side)
        cutter.start()
        stage = RenderedStage("cut", "cut connections", "", (_step("host-side", STEP_SCRIPT),))
        engine = Engine({"controller": session}, log_dir=tmp_path / "logs")
        outcomes = engine.run([stage])
        cutter.join()
    step = outcomes[0].steps[0]
    assert step.status == Status.OK, step
    log = (tmp_path / "logs" / "cut" / "controller.log").read_text()
    assert "the SSH connection dropped" in log
    assert all(f"   line {i}\n" in log for i in range(1, 21))
    info = RunInfo(LAB, "test", "digest", "fast", time.time(), 1.0, {}, "labbuilder install")
    junit, report = write_reports(tmp_path / "reports", outcomes, info, compare(outcomes, {}))
    case = ET.parse(junit).getroot().find("testsuite/testcase")
    assert case is not None and case.find("failure") is None
    assert json.loads(report.read_text())["result"] == "passed"


@pytest.mark.integration
def test_a_step_whose_node_stays_unreachable_fails_with_its_report(
    guest: dict[str, Any], tmp_path: Path
) -> None:
    # sshd stopped and the sessions killed a second into the step; sshd back only after the
    # step's time is up: the step fails with the reason, in the reports.
    later = "systemd-run --quiet --timer-property=AccuracySec=100ms"
    script = (
        "#!/bin/bash\nset -euo pipefail\n"
        f"{later} --on-active=1 sh -c 'systemctl stop ssh; pkill -f \"^sshd: .*@notty\"'\n"
        f"{later} --on-active=40 systemctl start ssh\n"
        "sleep 10\necho finished\n"
    )
    stage = RenderedStage("cut", "cut connections", "", (_step("unreachable", script, 20),))
    started = time.monotonic()
    with connect(guest) as session:
        outcomes = Engine({"controller": session}, log_dir=tmp_path / "logs").run([stage])
    assert time.monotonic() - started < 60  # within the step's time, not without end
    step = outcomes[0].steps[0]
    assert step.status == Status.FAILED and step.rc is None, step
    assert step.reason.startswith("lost the SSH connection to node controller"), step.reason
    info = RunInfo(LAB, "test", "digest", "fast", time.time(), 1.0, {}, "labbuilder install")
    junit, report = write_reports(tmp_path / "reports", outcomes, info, compare(outcomes, {}))
    failure = ET.parse(junit).getroot().find("testsuite/testcase/failure")
    assert failure is not None and "lost the SSH connection" in failure.get("message", "")
    assert json.loads(report.read_text())["result"] == "failed"

    end = time.monotonic() + 120  # sshd comes back for whatever runs next
    while True:
        try:
            connect(guest).close()
            break
        except (OSError, ConnectionLostError, GuestTransportError):
            assert time.monotonic() < end, "sshd did not come back"
            time.sleep(2)


# --- the fast path's warm Python in a real guest: paused, clock stepped, server killed ----------

WARM_DIR = "/run/lbtestwarm"
WARM = "/usr/local/lib/lbtestwarm/warmpython.py"
WARM_ENV = f"WARMPYTHON_DIR={WARM_DIR} WARMPYTHON_PRELOAD=xml.dom.minidom WARMPYTHON_IDLE=2"


def warm_call(session: SSHSession, code: str, results: list[Any]) -> threading.Thread:
    """Run ``code`` through the guest's warm Python, in the background, as a step does."""

    def run() -> None:
        try:
            results.append(
                session.run_script(
                    f"export {WARM_ENV}\nexec python3 {WARM} - <<'CODE'\n{code}\nCODE\n",
                    timeout=600,
                )
            )
        except Exception as err:  # noqa: BLE001 - the test reports it
            results.append(err)

    worker = threading.Thread(target=run)
    worker.start()
    return worker


def wait_in_guest(session: SSHSession, command: str, seconds: float) -> None:
    end = time.monotonic() + seconds
    while session.run(command, sudo=True).rc != 0:
        assert time.monotonic() < end, f"not within {seconds} s in the guest: {command}"
        time.sleep(1)


@pytest.mark.integration
def test_the_warm_python_keeps_its_calls_through_a_pause_a_clock_step_and_a_killed_server(
    guest: dict[str, Any],
) -> None:
    from labbuilder.adapters import libvirt as lv

    source = WARM_PYTHON_SOURCE.read_text()
    domain_name = guest["record"]["plan"]["nodes"][0]["domain"]
    conn = lv.connect("qemu:///system")
    with connect(guest) as session:
        try:
            session.run_script(
                f"install -d -m 0700 {WARM_DIR} $(dirname {WARM})\n"
                f"cat > {WARM} <<'SOURCE'\n{source}\nSOURCE\n"
            ).check("controller")
            # 1. A call that outlives the idle time, across a pause of the whole guest and a
            # step of its clock by an hour (what a snapshot's restore and sync_clocks do).
            gate = f"{WARM_DIR}/gate-1"
            code = (
                "import os, pathlib, sys, time\n"
                f"while not pathlib.Path({gate!r}).exists(): time.sleep(0.2)\n"
                "print('done', os.getppid()); sys.exit(6)"
            )
            results: list[Any] = []
            worker = warm_call(session, code, results)
            wait_in_guest(session, f"grep -q 'call .* started' {WARM_DIR}/warmpython.log", 120)
            domain = lv.find_domain(conn, domain_name)
            lv.suspend_domain(domain)
            time.sleep(7)  # three idle times of the server, on the host's clock
            lv.resume_domain(domain)
            with connect(guest) as other:
                other.run("date -u -s @$(( $(date +%s) + 3600 )) >/dev/null", sudo=True)
                other.run(f"touch {gate}", sudo=True).check("controller")
            worker.join(300)
            assert results and not isinstance(results[0], Exception), results
            first = results[0]
            assert first.rc == 6, first
            server = session.run(f"cat {WARM_DIR}/warmpython.lock", sudo=True).stdout.strip()
            assert first.stdout.split() == ["done", server]  # run by the server's child

            # 2. The server killed during a call: the call ends with its own status.
            results.clear()
            gate = f"{WARM_DIR}/gate-2"
            worker = warm_call(session, code.replace("gate-1", "gate-2"), results)
            wait_in_guest(
                session, f"test $(grep -c 'call .* started' {WARM_DIR}/warmpython.log) = 2", 120
            )
            # (the first server left when idle: this call started a new one)
            server = session.run(f"cat {WARM_DIR}/warmpython.lock", sudo=True).stdout.strip()
            session.run(f"kill -KILL {server}", sudo=True).check("controller")
            session.run(f"touch {gate}", sudo=True).check("controller")
            worker.join(300)
            assert results and not isinstance(results[0], Exception), results
            assert results[0].rc == 6, results[0]

            # Nothing stays running: the killed server's child ended, no new server started.
            # (the pattern's [w] keeps pgrep from finding the shell that runs it)
            wait_in_guest(session, f"! pgrep -f {WARM.replace('warmpython', '[w]armpython')}", 60)
        finally:
            session.run("date -u -s @%s >/dev/null", f"{time.time():.3f}", sudo=True)
            session.run(f"pkill -KILL -f {WARM}; rm -rf {WARM_DIR} $(dirname {WARM})", sudo=True)
            conn.close()
