"""Setting a lab's clocks after a restore (``snapshots.sync_clocks``), over sessions that answer
as guests with their clocks off would: each clock is stepped by the offset measured around the
quickest round trip, a node that does not answer yet is logged in to again, and chrony forgets
its old samples only once every node is stepped."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from labbuilder.adapters.ssh import CommandResult
from labbuilder.common.errors import HypervisorError
from labbuilder.lifecycle import snapshots

OFFSETS = {"controller": -3600.0, "network": 2.5, "compute1": -0.75}  # guest less host


FAKE_DATE = """#!/usr/bin/env python3
import sys, time
from pathlib import Path
clock = Path(__file__).with_name("offset")
offset = float(clock.read_text())
if sys.argv[1:2] == ["+%s.%N"]:
    print(f"{time.time() + offset:.9f}")
elif sys.argv[1:3] == ["-u", "-s"] and sys.argv[3].startswith("@"):
    clock.write_text(repr(float(sys.argv[3][1:]) - time.time()))
else:
    sys.exit(f"date: unexpected {sys.argv[1:]}")
"""
FAKE_CHRONYC = """#!/bin/sh
echo "$*" >> "$(dirname "$0")/chronyc.log"
"""


class Dialog:
    """``CLOCK_DIALOG`` for real, in a local bash: its clock is a fake ``date`` with the node's
    offset (bash's EPOCHREALTIME unset, so the script asks ``date``), with a fake ``chronyc``."""

    def __init__(self, guests: Guests, node: str, folder: Path, command: str) -> None:
        self.guests, self.node, self.folder = guests, node, folder
        self.process = subprocess.Popen(
            ["bash", "-c", "unset EPOCHREALTIME\n" + command],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={"PATH": f"{folder}:/usr/bin:/bin"},
        )  # fmt: skip

    def ask(self, line: str, timeout: float) -> str:
        with self.guests.lock:
            self.guests.ran.append((self.node, line))
        time.sleep(self.guests.delay)
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline().rstrip("\n")
        time.sleep(self.guests.delay)
        return answer

    def close(self, timeout: float) -> CommandResult:
        out, err = self.process.communicate(timeout=timeout)
        return CommandResult("dialog", self.process.returncode, out, err)


class Guests:
    """The lab's nodes: each session logs what it was asked, in order, across the nodes."""

    def __init__(self, folder: Path, refuse_first: set[str], delay: float = 0.0) -> None:
        self.folder = folder
        self.refuse_first = set(refuse_first)
        self.delay = delay  # one way, per question
        self.logins: dict[str, int] = {}
        self.ran: list[tuple[str, str]] = []
        self.closed: list[str] = []
        self.lock = threading.Lock()
        for node, offset in OFFSETS.items():
            bin_dir = folder / node
            bin_dir.mkdir()
            (bin_dir / "offset").write_text(repr(offset))
            for name, text in (("date", FAKE_DATE), ("chronyc", FAKE_CHRONYC)):
                (bin_dir / name).write_text(text)
                (bin_dir / name).chmod(0o755)

    def clock(self, node: str) -> float:
        return float((self.folder / node / "offset").read_text())

    def chronyc(self, node: str) -> list[str]:
        log = self.folder / node / "chronyc.log"
        return log.read_text().splitlines() if log.exists() else []

    def session(self, address: str, user: str, key: Path, **kwargs: Any) -> Any:
        node = str(kwargs["node"])
        with self.lock:
            self.logins[node] = self.logins.get(node, 0) + 1
            if node in self.refuse_first:
                self.refuse_first.discard(node)
                raise TimeoutError("timed out")  # what a node just resumed answers
        guests = self

        class Session:
            def converse(self, template: str, *args: object, sudo: bool = False) -> Dialog:
                assert sudo and template == "bash -c %s"
                return Dialog(guests, node, guests.folder / node, str(args[0]))

            def close(self) -> None:
                with guests.lock:
                    guests.closed.append(node)

        return Session()


@pytest.fixture
def lab(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> SimpleNamespace:
    record = {
        "user": "debian",
        "plan": {
            "nodes": [
                {"name": name, "nics": [{"address": f"10.0.0.{11 + 10 * i}"}]}
                for i, name in enumerate(OFFSETS)
            ]
        },
    }
    monkeypatch.setattr(snapshots, "load_state_record", lambda _state: record)
    monkeypatch.setattr(snapshots, "gateway_namespace", lambda _record: None)
    state = SimpleNamespace(key_path=tmp_path / "id", known_hosts_path=tmp_path / "known_hosts")
    return state


def test_each_clock_is_stepped_by_its_offset_then_chrony_measures_again(
    monkeypatch: pytest.MonkeyPatch, lab: Any, tmp_path: Path
) -> None:
    guests = Guests(tmp_path, refuse_first={"network"}, delay=0.05)
    monkeypatch.setattr(snapshots, "SSHSession", guests.session)
    added: list[str] = []
    moved = snapshots.sync_clocks(lab, timeout=10, also=lambda node, _s: added.append(node))

    # Moved by the offset (within the measuring round trip and the fake clock's own start-up),
    # whatever the latency: a time sent from the host would have arrived 50 ms late.
    for node, offset in OFFSETS.items():
        assert moved[node] == pytest.approx(-offset, abs=0.04), (node, moved)
        # the guest's clock then reads the host's time, within what starting the fake `date`
        # (a Python process) costs before it sets the clock: tenths of a second on a loaded
        # host (CI runs this beside emulated guests); the real `date` costs a millisecond, and
        # the restore's test on a real guest allows half a second
        assert guests.clock(node) == pytest.approx(0.0, abs=0.5), (node, guests.clock(node))
    assert guests.logins == {"controller": 1, "network": 2, "compute1": 1}
    # three round trips each, then the step; chrony forgets what it measured only once every
    # clock is stepped, then measures again
    asked = [line.split()[0] for node, line in guests.ran if node == "compute1"]
    assert asked == ["now", "now", "now", "step", "settle"]
    steps = [i for i, (_, line) in enumerate(guests.ran) if line.startswith("step ")]
    settles = [i for i, (_, line) in enumerate(guests.ran) if line == "settle"]
    assert len(steps) == len(settles) == 3 and max(steps) < min(settles)
    assert all(guests.chronyc(node) == ["reset sources", "burst 4/4"] for node in OFFSETS)
    assert sorted(added) == sorted(OFFSETS)  # in the same sessions
    assert sorted(guests.closed) == sorted(OFFSETS)


def test_a_node_that_never_answers_is_named(
    monkeypatch: pytest.MonkeyPatch, lab: Any, tmp_path: Path
) -> None:
    guests = Guests(tmp_path, refuse_first=set())

    def never(address: str, user: str, key: Path, **kwargs: Any) -> Any:
        if kwargs["node"] == "compute1":
            raise TimeoutError("timed out")
        return guests.session(address, user, key, **kwargs)

    monkeypatch.setattr(snapshots, "SSHSession", never)
    with pytest.raises(HypervisorError, match="cannot set the clock of node compute1"):
        snapshots.sync_clocks(lab, timeout=1.5)
    assert sorted(guests.closed) == ["controller", "network"]  # the others' sessions closed
