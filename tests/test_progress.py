"""The terminal's progress (labbuilder.cli.progress), the lab's log files (labbuilder.lifecycle.logs) and
the commands' views of `up` and `install` (labbuilder.cli.watch): plain timestamped lines
and heartbeats off a terminal, a live display that leaves no trace on one, estimates from the
last reports, tools' output in the log file only, and the log's last lines on failure."""

from __future__ import annotations

import io
import json
import logging
import re
import stat
import threading
import time
from pathlib import Path

import pytest

from labbuilder.cli.main import main
from labbuilder.cli.progress import HEARTBEAT_ENV, Progress, heartbeat_interval, with_estimate
from labbuilder.cli.upwatch import copy_logs
from labbuilder.cli.watch import (
    InstallWatch,
    UpWatch,
    install_estimates,
    show_tail,
    watching,
)
from labbuilder.common.errors import HostError, UsageError
from labbuilder.install.engine import EngineEvent
from labbuilder.install.report import UpRecord, write_up_reports
from labbuilder.lifecycle.logs import TOOLS_LOGGER, lab_log, tail
from labbuilder.lifecycle.readiness import RUNGS

STAMPED = re.compile(r"^\d\d:\d\d:\d\d \S")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def plain_lines(out: io.StringIO) -> list[str]:
    return out.getvalue().splitlines()


def test_off_a_terminal_every_line_is_plain_and_timestamped() -> None:
    out = io.StringIO()
    with Progress(out, heartbeat=30) as progress:
        assert not progress.tty
        progress.line("network lbtest-qt-management (nat, 10.0.0.0/24)")
        progress.start("node controller", "node controller: waiting for port 22", 38.0)
        progress.finish("node controller", "node controller: port 22 open after 41 s")
    lines = plain_lines(out)
    assert [line[9:] for line in lines] == [
        "network lbtest-qt-management (nat, 10.0.0.0/24)",
        "node controller: port 22 open after 41 s",
    ]
    assert all(STAMPED.match(line) for line in lines), lines
    assert "\x1b" not in out.getvalue()


def test_the_heartbeat_names_the_running_phases_while_nothing_else_is_printed() -> None:
    out = io.StringIO()
    with Progress(out, heartbeat=0.2) as progress:
        progress.start("node controller", "node controller: waiting for ssh login")
        progress.start("node network", "node network: waiting for port 22")
        time.sleep(0.75)
        progress.finish("node controller")
        progress.finish("node network")
        time.sleep(0.5)  # no phase runs: no heartbeat
    lines = plain_lines(out)
    assert len(lines) >= 2, lines
    for line in lines:
        assert STAMPED.match(line), line
        assert re.search(
            r"still running: node controller: waiting for ssh login \(\d+ s\); "
            r"node network: waiting for port 22 \(\d+ s\)$",
            line,
        ), line


def test_a_heartbeat_comes_only_after_an_interval_without_lines() -> None:
    out = io.StringIO()
    with Progress(out, heartbeat=0.6) as progress:
        progress.start("stage", "stage identity")
        for number in range(6):
            progress.line(f"step {number}")
            time.sleep(0.15)
    assert "still running" not in out.getvalue()


def test_on_a_terminal_the_live_display_leaves_no_trace_and_no_heartbeat() -> None:
    out = io.StringIO()
    with Progress(out, tty=True, heartbeat=0.1) as progress:
        assert progress.tty
        progress.start("node controller", "node controller: waiting for cloud-init", 60.0)
        time.sleep(0.6)
        progress.line("node controller: SSH login works after 41 s")
        time.sleep(0.3)
    out.write("lab lbtest-qt is up in 95 s\n")
    text = out.getvalue()
    assert "still running" not in text
    assert "node controller: SSH login works after 41 s" in ANSI.sub("", text)
    assert "waiting for cloud-init" in text  # the display was shown
    # The final sentence is a line of its own: nothing of the display before it on its line.
    last = ANSI.sub("", text.rstrip("\n").split("\n")[-1])
    assert last.split("\r")[-1] == "lab lbtest-qt is up in 95 s", repr(last)


def test_the_heartbeat_interval_comes_from_the_environment() -> None:
    assert heartbeat_interval({}) == 20.0
    assert heartbeat_interval({HEARTBEAT_ENV: "2.5"}) == 2.5
    for bad in ("0", "-1", "31", "nan", "inf", "soon"):
        with pytest.raises(UsageError) as caught:
            heartbeat_interval({HEARTBEAT_ENV: bad})
        assert HEARTBEAT_ENV in caught.value.message
        assert caught.value.exit_code == 2


def test_up_lines_carry_each_rung_and_the_last_up_s_times(tmp_path: Path) -> None:
    record = UpRecord("lbtest-qt")
    for rung, at in zip((*RUNGS, "ready"), (0.0, 2.0, 3.0, 40.0, 44.0, 90.0), strict=True):
        record.on_rung("controller", rung, at)
    write_up_reports(tmp_path, record, RUNGS)
    out = io.StringIO()
    with Progress(out, heartbeat=30) as progress:
        watch = UpWatch(progress, tmp_path / "up-latest.json")
        watch.on_log("image debian-12-controller: building (mmdebstrap, 612 packages)")
        assert progress.tracks() == ["image debian-12-controller"]
        watch.on_log("image debian-12-controller: built in 95 s")
        assert progress.tracks() == []
        watch.on_log("probing the host")
        for rung, at in zip((*RUNGS, "ready"), (0.0, 1.0, 2.5, 38.0, 45.0, 80.0), strict=True):
            watch.on_rung("controller", rung, at)
            if rung == "port 22":
                assert progress.running()[0][0] == "node controller: waiting for port 22"
                assert progress.phases["node controller"].estimate == pytest.approx(37.0)
        assert progress.tracks() == []
    lines = [line[9:] for line in plain_lines(out)]
    assert lines == [
        "image debian-12-controller: building (mmdebstrap, 612 packages)",
        "image debian-12-controller: built in 95 s",
        "probing the host",
        "node controller: domain running after 1 s (last time 2 s)",
        "node controller: NIC link up after 2 s (last time 3 s)",
        "node controller: port 22 open after 38 s (last time 40 s)",
        "node controller: SSH login works after 45 s (last time 44 s)",
        "node controller: configured by cloud-init: ready after 80 s (last time 90 s)",
    ]


def test_an_image_built_beside_the_nodes_stays_a_phase_until_it_is_built(tmp_path: Path) -> None:
    """``up`` boots a node whose image is there while another node's image builds: between the
    ready node and the last image, the heartbeat still names the build."""
    out = io.StringIO()
    now = [1000.0]
    with Progress(out, heartbeat=5, clock=lambda: now[0]) as progress:
        watch = UpWatch(progress, tmp_path / "up-latest.json")
        watch.on_log("image debian-12-controller: building (17 role packages over its base)")
        watch.on_log("network lbtest-management (nat, 10.0.0.0/24)")
        assert progress.tracks() == ["image debian-12-controller", "up"]
        # What the probe found is a line, not a phase that runs on: it ends the networks'.
        watch.on_log("guests run under tcg; compute nodes use virt_type qemu")
        assert progress.tracks() == ["image debian-12-controller"]
        assert "guests run under tcg" in out.getvalue()
        watch.on_log("node network: disks, seed and domain")
        for rung in (*RUNGS, "ready"):
            watch.on_rung("network", rung, 1.0)
        assert progress.tracks() == ["image debian-12-controller"]
        now[0] += 6  # nothing printed for longer than the heartbeat's interval
        deadline = time.monotonic() + 10
        while "still running: image" not in out.getvalue() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "still running: image debian-12-controller: building" in out.getvalue()
        watch.on_log("image debian-12-controller: built in 95 s")
        assert progress.tracks() == []


def test_install_lines_carry_stage_and_step_times_and_last_time_s(tmp_path: Path) -> None:
    history = tmp_path / "history.json"
    history.write_text(json.dumps({"stages": {"identity": 332.0}}))
    report = tmp_path / "latest.json"
    step = {"stage": "identity", "node": "controller", "step": "keystone-db", "status": "ok"}
    report.write_text(
        json.dumps(
            {"stages": [{"name": "identity", "seconds": 300, "steps": [{**step, "seconds": 45}]}]}
        )
    )
    stages, steps = install_estimates(history, report)
    assert stages == {"identity": 332.0}
    assert steps == {("identity", "controller", "keystone-db"): 45.0}
    out = io.StringIO()
    with Progress(out, heartbeat=30) as progress:
        watch = InstallWatch(progress, stages, steps)
        assert progress.running()[0][0] == "connecting to the nodes and preparing them"
        for event in (
            EngineEvent("stage-start", "identity"),
            EngineEvent("step-start", "identity", "controller", "keystone-db"),
            EngineEvent("step-end", "identity", "controller", "keystone-db", "ok", 41.2),
            EngineEvent("step-end", "identity", "controller", "apache", "done-before"),
            EngineEvent("step-start", "identity", "controller", "endpoints"),
            EngineEvent("step-end", "identity", "controller", "endpoints", "failed", 3.0),
            EngineEvent("stage-end", "identity", status="failed", elapsed=50.0),
        ):
            watch.on_event(event)
        assert progress.tracks() == []
    assert watch.failed == ("identity", "controller")
    assert [line[9:] for line in plain_lines(out)] == [
        "stage identity: started (last time 332 s)",
        "identity: keystone-db on controller: ok in 41 s (last time 45 s)",
        "identity: endpoints on controller: failed in 3 s",
        "stage identity: failed in 50 s (last time 332 s)",
    ]


def test_tools_output_goes_to_the_log_file_only_and_a_failure_shows_its_last_lines(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "reports" / "lbtest-qt" / "up.log"
    labbuilder_logger = logging.getLogger("labbuilder")
    handlers, level = list(labbuilder_logger.handlers), labbuilder_logger.level
    out = io.StringIO()
    with pytest.raises(HostError), watching(log, "labbuilder up --lab lbtest-qt", out) as progress:
        progress.line("image debian-12: building (mmdebstrap, 300 packages)")
        for number in range(30):
            logging.getLogger(TOOLS_LOGGER).debug("Get:%d http://deb.debian.org bookworm", number)
        logging.getLogger("labbuilder.adapters.firewall").info("$ nft -f -")
        raise HostError("mmdebstrap failed", "see the log")
    assert labbuilder_logger.handlers == handlers and labbuilder_logger.level == level
    shown = out.getvalue()
    assert "Get:" not in shown.split("last lines of the log")[0]
    assert f"last lines of the log {log}:" in shown
    tail_shown = shown.split(f"last lines of the log {log}:\n")[1].splitlines()
    assert len(tail_shown) == 20
    assert tail_shown[-1].endswith("$ nft -f -") and tail_shown[-2].endswith(
        "Get:29 http://deb.debian.org bookworm"
    )
    captured = capfd.readouterr()
    assert "Get:" not in captured.out + captured.err  # nothing reached the real terminal
    text = log.read_text()
    assert text.startswith("==== ") and "labbuilder up --lab lbtest-qt" in text.splitlines()[0]
    assert "image debian-12: building" in text and "Get:0 http" in text and "Get:29" in text
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    assert stat.S_IMODE(log.parent.stat().st_mode) == 0o700
    assert tail(log, 3)[-1].endswith("$ nft -f -")


def test_bad_input_shows_no_log_and_creates_none(tmp_path: Path) -> None:
    log = tmp_path / "up.log"
    out = io.StringIO()
    with pytest.raises(UsageError), watching(log, "labbuilder up", out):
        raise UsageError("lab.toml: name = 'X' is not a lab name", "use lower-case letters")
    assert not log.exists()
    assert out.getvalue() == ""


def test_a_link_at_the_log_s_place_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("")
    log = tmp_path / "install.log"
    log.symlink_to(target)
    with pytest.raises(UsageError) as caught, lab_log(log, "labbuilder install"):
        pass
    assert "symbolic link" in caught.value.message
    assert target.read_text() == ""


def test_show_tail_names_the_log_and_shows_its_last_lines(tmp_path: Path) -> None:
    log = tmp_path / "controller.log"
    log.write_text("".join(f"line {n}\x1b[31m\n" for n in range(50)))
    out = io.StringIO()
    show_tail(out, log, "step's log")
    lines = out.getvalue().splitlines()
    assert lines[0] == f"last lines of the step's log {log}:"
    assert lines[1:] == [f"  | line {n} [31m" for n in range(30, 50)]
    out = io.StringIO()
    show_tail(out, tmp_path / "missing.log")
    assert out.getvalue() == ""


def test_the_heartbeat_thread_ends_with_the_progress() -> None:
    out = io.StringIO()
    progress = Progress(out, heartbeat=0.1)
    progress.open()
    progress.start("x", "x")
    progress.close()
    progress.close()
    size = len(out.getvalue())
    time.sleep(0.3)
    assert len(out.getvalue()) == size
    assert all(thread.name != "progress-heartbeat" for thread in threading.enumerate())


def test_up_refuses_a_bad_heartbeat_with_exit_2_before_anything_is_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    lab_file = tmp_path / "lab.toml"
    lab_file.write_text('name = "lbtest-qt-cli"\n')
    monkeypatch.setenv("LABBUILDER_STATE_DIR", str(state))
    monkeypatch.setenv(HEARTBEAT_ENV, "soon")
    code = main(["up", "--file", str(lab_file), "--allow-small"])
    err = capsys.readouterr().err.splitlines()
    assert code == 2
    assert err[0] == f"error: {HEARTBEAT_ENV}='soon' is not a number of seconds from 0.1 to 30"
    assert err[1].startswith(f"hint: unset {HEARTBEAT_ENV}")
    assert list(state.iterdir()) == []


def test_run_copies_what_each_log_received_during_the_run(tmp_path: Path) -> None:
    up_log, install_log = tmp_path / "up.log", tmp_path / "install.log"
    up_log.write_text("==== an earlier up\n10:00:00 probing the host\n")
    marks = {up_log: up_log.stat().st_size, install_log: 0}
    with up_log.open("a") as log:
        log.write("==== this run's up\n10:05:00 probing the host\n")
    install_log.write_text("==== this run's install\n")
    target = tmp_path / "report"
    target.mkdir()
    copy_logs(marks, target)
    assert (target / "up.log").read_text() == "==== this run's up\n10:05:00 probing the host\n"
    assert (target / "install.log").read_text() == "==== this run's install\n"
    assert stat.S_IMODE((target / "up.log").stat().st_mode) == 0o600


def test_a_last_time_that_did_nothing_is_no_estimate() -> None:
    assert with_estimate("stage identity: ok in 354 s", 0.0) == "stage identity: ok in 354 s"
    assert with_estimate("stage identity: ok in 354 s", None) == "stage identity: ok in 354 s"
    assert with_estimate("stage identity: ok in 354 s", 182.0) == (
        "stage identity: ok in 354 s (last time 182 s)"
    )
