"""`labbuilder up` as a CI log gets it (its output captured, not a terminal): only timestamped
phase lines, among them heartbeats while the node boots; no external tool's raw output; the
final sentence on a line of its own; the detail in the lab's up.log.

A one-node lab on the real libvirtd (qemu:///system, TCG), with its own state directory, its
own storage pool and names starting with ``lbtest-qt``; everything is removed even when the
test fails.
"""

from __future__ import annotations

import re
import stat
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from lablib import lab_environment, lab_leftovers, one_node_lab, remove_labs
from lablib import run_labbuilder as labbuilder

from labbuilder.progress import HEARTBEAT_ENV

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LAB = "lbtest-qt"
POOL = "lbtest-qt-pool"
HEARTBEAT = 3  # seconds: several heartbeats while the node boots under emulation
STAMPED = re.compile(r"^(\d\d:\d\d:\d\d) (.+)$")
# The raw output of mmdebstrap, apt, dpkg and of labbuilder's own host commands.
RAW = re.compile(
    r"^(\$ |Get:|Hit:|Ign:|Fetched |Unpacking |Setting up |Selecting previously |"
    r"Preparing to unpack |Processing triggers |Reading package lists|[IWE]: )"
)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str]]]:
    """The lab's file and environment; the lab and its pool are removed afterwards."""
    environment = lab_environment(tmp_path_factory.mktemp("state"), pool=POOL)
    environment[HEARTBEAT_ENV] = str(HEARTBEAT)
    lab_file = tmp_path_factory.mktemp("lab") / "lab.toml"
    lab_file.write_text(one_node_lab(LAB))
    yield lab_file, environment
    try:
        labbuilder("down", "--file", str(lab_file), env=environment, timeout=600)
    finally:
        remove_labs([LAB], environment)  # also removes the pool
    assert lab_leftovers(LAB, POOL) == {"domains": [], "networks": [], "volumes": []}


def test_up_in_a_ci_log_shows_phases_and_heartbeats_and_logs_the_detail(
    lab: tuple[Path, dict[str, str]],
) -> None:
    lab_file, env = lab
    result = labbuilder("up", "--file", str(lab_file), env=env, timeout=1800)
    assert result.returncode == 0, result.stdout + result.stderr

    # stdout: the final sentence, a line of its own.
    assert re.fullmatch(
        rf"lab {LAB} is up in \d+ s \(\w+\); try `labbuilder ssh controller hostname`\n",
        result.stdout,
    ), result.stdout

    # stderr: plain timestamped phase lines only: no display, no table, no tool's output.
    lines = result.stderr.splitlines()
    assert lines, "up printed no progress"
    assert "\x1b" not in result.stderr and "┘" not in result.stderr, result.stderr
    stamped = [STAMPED.match(line) for line in lines]
    assert all(stamped), [line for line, match in zip(lines, stamped, strict=True) if not match]
    texts = [match.group(2) for match in stamped if match]
    assert not [text for text in texts if RAW.match(text)], result.stderr
    assert not [line for line in result.stdout.splitlines() if RAW.match(line)], result.stdout
    assert any(text.startswith("network lbtest-qt-") for text in texts), result.stderr
    assert "probing the host" in texts, result.stderr

    # While the node boots (between its first rung and ready), the heartbeat keeps coming.
    first = next(i for i, t in enumerate(texts) if t.startswith("node controller: domain running"))
    ready = next(i for i, t in enumerate(texts) if "cloud-init finished: ready" in t)
    beats = [
        text
        for text in texts[first:ready]
        if re.fullmatch(r"still running: node controller: waiting for [\w -]+ \(\d+ s\)", text)
    ]
    assert len(beats) >= 2, result.stderr
    times = [datetime.strptime(m.group(1), "%H:%M:%S") for m in stamped[first : ready + 1] if m]
    gaps = [(b - a).total_seconds() % 86400 for a, b in zip(times, times[1:], strict=False)]
    assert max(gaps) <= HEARTBEAT + 2, (gaps, result.stderr)  # never silent for long

    # The detail is in the lab's up.log: every phase line, and the host commands run.
    log = Path(env["LABBUILDER_STATE_DIR"]) / "reports" / LAB / "up.log"
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    detail = log.read_text()
    runs = [line for line in detail.splitlines() if line.startswith("==== ")]
    assert runs and f"labbuilder up --file {lab_file}" in runs[-1]
    logged = detail.split(runs[-1])[-1]
    for text in texts:
        if not text.startswith("still running: "):
            assert text in logged, text
    assert re.search(r"^\d\d:\d\d:\d\d \$ ip6?tables", logged, re.MULTILINE), logged
