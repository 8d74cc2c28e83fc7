"""Setting a lab's clocks after a restore (``snapshots.sync_clocks``), over sessions that answer
as guests with their clocks off would: each clock is stepped by the offset measured around the
quickest round trip, a node that does not answer yet is logged in to again, and chrony forgets
its old samples only once every node is stepped."""

from __future__ import annotations

import re
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


class Guests:
    """The lab's nodes: each session logs what it ran, in order, across the nodes."""

    def __init__(self, refuse_first: set[str], delay: float = 0.0) -> None:
        self.refuse_first = set(refuse_first)
        self.delay = delay  # one way, per command
        self.logins: dict[str, int] = {}
        self.ran: list[tuple[str, str]] = []
        self.closed: list[str] = []
        self.clocks = dict(OFFSETS)
        self.lock = threading.Lock()

    def session(self, address: str, user: str, key: Path, **kwargs: Any) -> Any:
        node = str(kwargs["node"])
        with self.lock:
            self.logins[node] = self.logins.get(node, 0) + 1
            if node in self.refuse_first:
                self.refuse_first.discard(node)
                raise TimeoutError("timed out")  # what a node just resumed answers
        guests = self

        class Session:
            def run(self, template: str, *args: object, **_: Any) -> CommandResult:
                command = template % args if args else template
                with guests.lock:
                    guests.ran.append((node, command))
                time.sleep(guests.delay)
                now = time.time() + guests.clocks[node]
                time.sleep(guests.delay)
                if command == "date +%s.%N":
                    return CommandResult(command, 0, f"{now:.9f}\n", "")
                stepped = re.search(r"awk -v o=(\S+) ", command)
                if stepped:
                    with guests.lock:
                        guests.clocks[node] -= float(stepped.group(1).strip("'"))
                return CommandResult(command, 0, "", "")

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
    monkeypatch: pytest.MonkeyPatch, lab: Any
) -> None:
    guests = Guests(refuse_first={"network"}, delay=0.05)
    monkeypatch.setattr(snapshots, "SSHSession", guests.session)
    added: list[str] = []
    moved = snapshots.sync_clocks(lab, timeout=10, also=lambda node, _s: added.append(node))

    # Moved by the offset (within the measuring round trip), whatever the latency: a time
    # sent from the host would have arrived 50 ms late.
    for node, offset in OFFSETS.items():
        assert moved[node] == pytest.approx(-offset, abs=0.03), (node, moved)
        assert guests.clocks[node] == pytest.approx(0.0, abs=0.03), (node, guests.clocks)
    assert guests.logins == {"controller": 1, "network": 2, "compute1": 1}
    # chrony forgets what it measured only once every clock is stepped, then measures again
    steps = [i for i, (_, command) in enumerate(guests.ran) if "date -u -s" in command]
    resets = [i for i, (_, command) in enumerate(guests.ran) if "chronyc reset sources" in command]
    assert len(steps) == len(resets) == 3 and max(steps) < min(resets)
    assert all("chronyc burst 4/4" in guests.ran[i][1] for i in resets)
    assert sorted(added) == sorted(OFFSETS)  # in the same sessions
    assert sorted(guests.closed) == sorted(OFFSETS)


def test_a_node_that_never_answers_is_named(monkeypatch: pytest.MonkeyPatch, lab: Any) -> None:
    guests = Guests(refuse_first=set())

    def never(address: str, user: str, key: Path, **kwargs: Any) -> Any:
        if kwargs["node"] == "compute1":
            raise TimeoutError("timed out")
        return guests.session(address, user, key, **kwargs)

    monkeypatch.setattr(snapshots, "SSHSession", never)
    with pytest.raises(HypervisorError, match="cannot set the clock of node compute1"):
        snapshots.sync_clocks(lab, timeout=1.5)
    assert sorted(guests.closed) == ["controller", "network"]  # the others' sessions closed
