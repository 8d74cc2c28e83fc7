"""The trainer's board's web layer: the Flask app served by waitress on a real port, read by
Debian's chromium (headless, through chromium-driver) and by HTTP. The board's data comes from
a source that the test changes as a round of checks would; the board over real labs (checks,
a stopped service turning red) is tested in test_install_e2e.py's class test.

Also the cells' rule: a stage's status from its steps as the engine's check found them."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from browser import artifacts, board_cells, chromium, wait_for
from selenium.webdriver.common.by import By

from labbuilder.adapters.web import WebServer
from labbuilder.api.board import stage_status
from labbuilder.classroom.board import make_app
from labbuilder.install.engine import StageOutcome, Status, StepOutcome
from labbuilder.model.classroom import (
    FAILED,
    NOT_DONE,
    PARTIAL,
    PASSED,
    UNKNOWN,
    BoardCell,
    BoardRow,
    BoardView,
)

STAGES = (("environment", "Basic environment"), ("identity", "Identity"), ("image", "Image"))
TOKEN = "the-boards-token"


def step(name: str, status: Status, reason: str = "") -> StepOutcome:
    return StepOutcome("image", name, "controller", name, "L1", status, reason=reason)


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [
        ((Status.DONE_BEFORE, Status.SKIPPED), PASSED),
        ((Status.SKIPPED,), PASSED),
        ((Status.DONE_BEFORE, Status.NOT_RUN), PARTIAL),
        ((Status.NOT_RUN, Status.NOT_RUN), NOT_DONE),
        ((Status.SKIPPED, Status.NOT_RUN), NOT_DONE),
        ((Status.DONE_BEFORE, Status.FAILED, Status.NOT_RUN), FAILED),
    ],
)
def test_a_stages_cell_follows_its_steps(statuses: tuple[Status, ...], expected: str) -> None:
    outcome = StageOutcome(
        "image", "Image", "L1", 1.0, [step(f"s{i}", s, "why") for i, s in enumerate(statuses)]
    )
    status, detail = stage_status(outcome)
    assert status == expected
    first = statuses.index(Status.FAILED) if Status.FAILED in statuses else None
    assert detail == ("" if first is None else f"controller s{first}: why")


def row(student: str, statuses: tuple[str, ...], since: float) -> BoardRow:
    return BoardRow(
        student=student,
        lab=f"os101-{student}",
        nodes=(("controller", "running"), ("network", "running"), ("compute1", "running")),
        cells=tuple(
            BoardCell(
                name, status, since, "controller image.upload: check failed" * (status == FAILED)
            )
            for (name, _), status in zip(STAGES, statuses, strict=True)
        ),
        checked=since,
    )


class Source:
    """What ``ClassBoard`` gives the app, changed by the test as rounds of checks would."""

    def __init__(self) -> None:
        now = time.time()
        self.board = BoardView(
            class_name="os101",
            stages=STAGES,
            reset_stage="image",
            rows=(row("alice", (PASSED,) * 3, now), row("bob", (PASSED, PASSED, UNKNOWN), now)),
            check_every=30,
            round_seconds=12.5,
            rounds=1,
            updated=now,
        )
        self.resets: list[str] = []

    def view(self) -> BoardView:
        return self.board

    def reset(self, student: str) -> None:
        self.resets.append(student)


@pytest.fixture
def board() -> Iterator[tuple[Source, str]]:
    source = Source()
    server = WebServer(make_app(source, TOKEN), "127.0.0.1", 0)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        yield source, server.url
    finally:
        server.close()
        thread.join(timeout=10)
    assert not thread.is_alive()


def test_the_board_in_a_browser_shows_the_class_follows_its_rounds_and_resets(
    board: tuple[Source, str],
) -> None:
    source, url = board
    with chromium() as driver:
        driver.get(url)
        assert driver.title == "class os101 — labbuilder board"
        shown = board_cells(driver)
        assert shown[("alice", "image")] == PASSED and shown[("bob", "image")] == UNKNOWN
        assert [h.text for h in driver.find_elements(By.CSS_SELECTOR, "th.stage")] == [
            "environment", "identity", "image",
        ]  # fmt: skip
        assert (
            "controller running"
            in driver.find_element(By.CSS_SELECTOR, "tr[data-student=bob]").text
        )

        # A round finds alice's image stage failing: the page shows it by itself (it reloads).
        later = time.time()
        source.board = replace(
            source.board,
            rows=(row("alice", (PASSED, PASSED, FAILED), later), source.board.rows[1]),
            rounds=2,
        )
        wait_for(
            "alice's image cell red", lambda: board_cells(driver)[("alice", "image")] == FAILED, 15
        )
        failed = driver.find_element(By.CSS_SELECTOR, "tr[data-student=alice] td[data-stage=image]")
        assert "failed" in failed.get_attribute("class").split()
        assert failed.value_of_css_property("background-color") == "rgba(244, 180, 180, 1)"
        assert "image.upload" in failed.get_attribute("title")
        driver.save_screenshot(str(artifacts() / "board-web.png"))

        # The reset button asks, then posts with the board's token.
        driver.find_element(By.CSS_SELECTOR, "tr[data-student=alice] button").click()
        driver.switch_to.alert.accept()
        wait_for("the reset", lambda: source.resets == ["alice"], 10)
        assert driver.current_url == url

    data = json.loads(urllib.request.urlopen(url + "board.json", timeout=10).read())
    assert data["class"] == "os101" and data["reset_stage"] == "image" and data["rounds"] == 2
    assert [s["student"] for s in data["students"]] == ["alice", "bob"]
    assert data["students"][0]["stages"]["image"]["status"] == FAILED
    assert data["students"][0]["last_change"] == pytest.approx(later)


def test_a_reset_without_the_boards_token_or_of_no_student_is_refused(
    board: tuple[Source, str],
) -> None:
    source, url = board
    for student, token, code in (("alice", "guess", 403), ("mallory", TOKEN, 404)):
        form = urllib.parse.urlencode({"token": token}).encode()
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{url}students/{student}/reset", data=form, timeout=10)
        assert refused.value.code == code
    assert source.resets == []


def test_class_board_serves_until_ctrl_c_and_exits_130(tmp_path: Path) -> None:
    """`labbuilder class board` as a trainer starts it, for a class whose labs are not up: it
    says where it listens, serves the board (each student "not up"), and Ctrl-C stops it with
    exit 130, the port free again."""
    (tmp_path / "lab.toml").write_text('name = "lbtest-board"\n')
    class_file = tmp_path / "class.toml"
    class_file.write_text(
        'name = "lbtestboard"\nlab = "lab.toml"\nstage = "image"\n'
        '[[students]]\nname = "ann"\n[[students]]\nname = "ben"\n'
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    board = subprocess.Popen(
        [sys.executable, "-m", "labbuilder", "class", "board", str(class_file), "--port", str(port)],
        env={**os.environ, "LABBUILDER_STATE_DIR": str(tmp_path / "state")},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    try:
        assert board.stdout is not None
        line = board.stdout.readline()
        assert f"the board is on {url}" in line, line

        def students() -> list[dict[str, object]] | None:
            data = json.loads(urllib.request.urlopen(url + "board.json", timeout=10).read())
            return data["students"] if data["rounds"] else None

        rows = wait_for("a round of checks", students, 60)
        assert [(r["student"], r["error"]) for r in rows] == [("ann", "not up"), ("ben", "not up")]
        assert all(s["status"] == UNKNOWN for r in rows for s in r["stages"].values())  # type: ignore[attr-defined]
    finally:
        board.send_signal(signal.SIGINT)
        output = board.communicate(timeout=30)[0]
    assert board.returncode == 130, output
    with socket.socket() as again:
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port))  # nobody listens there any more
