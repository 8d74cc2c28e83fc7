"""The progress of ``up``, ``install`` and ``run`` on the terminal (``labbuilder.cli.progress``),
their log files (``labbuilder.lifecycle.logs``), and the estimates from their last reports.

- ``up``: one line per library sentence (``network ...``, ``image NAME: building ...``) and per
  rung each node reaches, with the rung's time from the node's start and the time of the last
  ``up`` of the lab (its ``up-latest.json``).
- ``install``: a line when a stage starts and ends, and when a step ends on a node, each with
  the time it took and what it took last time (the recipe's history file for stages, the lab's
  last install report for steps).
- On failure, the last lines of the command's log (or of the failed step's log) and its path,
  before the error.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from labbuilder.cli.progress import Progress, heartbeat_interval, seconds, with_estimate
from labbuilder.common.errors import LabbuilderError
from labbuilder.install.engine import EngineEvent
from labbuilder.lifecycle.logs import lab_log, tail
from labbuilder.lifecycle.readiness import RUNGS

RUNG_REACHED = {
    "running": "domain running",
    "link": "NIC link up",
    "port 22": "port 22 open",
    "ssh login": "SSH login works",
    "cloud-init": "configured by cloud-init: ready",
}
IMAGE_SENTENCE = re.compile(r"^(?:role )?image (\S+?):? ")
# Sentences of ``up`` that state what it found rather than start a phase: a line, and the
# end of the phase before them.
FACTS = ("guests run under ",)
IMAGE_DONE = ("built", "cache", "reused", "ready", "found", "failed")  # "cache hit ..."
REPORTED_STEP = ("ok", "guarded", "failed")  # step ends worth a line: work was done


def read_report(path: Path) -> dict[str, Any]:
    """A JSON report, or {} when it is missing or unreadable (an estimate is only a hint)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def up_estimates(report: Path) -> dict[str, dict[str, float]]:
    """From an ``up`` report: per node, the seconds from the node's start at which it reached
    each rung."""
    data = read_report(report)
    rungs: dict[str, dict[str, float]] = {}
    for node, entry in (data.get("nodes") or {}).items():
        if isinstance(entry, dict) and isinstance(entry.get("rungs"), dict):
            rungs[str(node)] = {
                str(rung): float(at)
                for rung, at in entry["rungs"].items()
                if isinstance(at, int | float)
            }
    return rungs


def install_estimates(
    history: Path, report: Path
) -> tuple[dict[str, float], dict[tuple[str, str, str], float]]:
    """Seconds per stage (the recipe's history file, else the lab's last report) and per
    (stage, node, step) that did work in the lab's last install report."""
    stages: dict[str, float] = {}
    steps: dict[tuple[str, str, str], float] = {}
    data = read_report(report)
    for stage in data.get("stages") or []:
        if not isinstance(stage, dict):
            continue
        if isinstance(stage.get("seconds"), int | float) and not stage.get("failed"):
            stages[str(stage.get("name"))] = float(stage["seconds"])
        for step in stage.get("steps") or []:
            if isinstance(step, dict) and step.get("status") in ("ok", "guarded"):
                key = (str(step.get("stage")), str(step.get("node")), str(step.get("step")))
                steps[key] = float(step.get("seconds") or 0.0)
    for name, value in read_report(history).get("stages", {}).items():
        if isinstance(value, int | float):
            stages[str(name)] = float(value)
    return stages, steps


class UpWatch:
    """``up``'s callbacks (``log``, ``on_rung``) as progress lines; ``report`` is the lab's
    last ``up`` report, for estimates. (``images build`` uses its ``on_log``.)"""

    def __init__(self, progress: Progress, report: Path | None = None) -> None:
        self.progress = progress
        self.previous = up_estimates(report) if report is not None else {}
        self.current: dict[str, str] = {}  # node -> the rung it waits for

    def on_log(self, message: str) -> None:
        """A sentence of ``up``: a line, and the phase running until the next one. An image's
        sentences are the phases of that image until its last one (built, cache hit, failed):
        images are built beside the rest of ``up`` (networks, the nodes whose images are
        there)."""
        image = IMAGE_SENTENCE.match(message)
        track = f"image {image.group(1)}" if image else "up"
        if image and message[image.end() :].startswith(IMAGE_DONE):
            self.progress.finish(track, message)
            return
        self.progress.line(message)
        if message.startswith(FACTS):
            self.progress.finish(track)
            return
        self.progress.start(track, message)

    def on_rung(self, node: str, rung: str, at: float) -> None:
        """Node ``node`` waits for ``rung`` (or is ``ready``) ``at`` seconds after it started."""
        self.progress.finish("up")  # the lab is made: the nodes' rungs are the phases now
        before = self.current.get(node)
        self.current[node] = rung
        previous = self.previous.get(node, {})
        if before is not None:
            reached = f"node {node}: {RUNG_REACHED.get(before, before)} after {seconds(at)}"
            line = with_estimate(reached, previous.get(before))
            if rung == "ready":
                self.progress.finish(f"node {node}", line)
                return
            self.progress.line(line)
        if rung == "ready":
            self.progress.finish(f"node {node}")
            return
        index = RUNGS.index(rung) if rung in RUNGS else -1
        started = previous.get(RUNGS[index - 1], 0.0) if index > 0 else 0.0
        estimate = previous[rung] - started if rung in previous else None
        self.progress.start(f"node {node}", f"node {node}: waiting for {rung}", estimate)


class InstallWatch:
    """The install engine's events as progress lines; it remembers the last failed step."""

    def __init__(
        self,
        progress: Progress,
        stages: Mapping[str, float],
        steps: Mapping[tuple[str, str, str], float],
    ) -> None:
        self.progress = progress
        self.stages = stages
        self.steps = steps
        self.failed: tuple[str, str] | None = None  # (stage, node) of the last failed step
        progress.start("stage", "connecting to the nodes and preparing them")

    def on_event(self, event: EngineEvent) -> None:
        progress, stage = self.progress, event.stage
        if event.kind == "stage-start":
            estimate = self.stages.get(stage)
            progress.line(with_estimate(f"stage {stage}: started", estimate))
            progress.start("stage", f"stage {stage}", estimate)
        elif event.kind == "step-start":
            estimate = self.steps.get((stage, event.node, event.step))
            progress.start(f"node {event.node}", f"{stage}: {event.step} on {event.node}", estimate)
        elif event.kind == "step-end":
            if event.status == "failed":
                self.failed = (stage, event.node)
            text = None
            if event.status in REPORTED_STEP:
                ended = f"{stage}: {event.step} on {event.node}: {event.status} in "
                estimate = self.steps.get((stage, event.node, event.step))
                text = with_estimate(ended + seconds(event.elapsed), estimate)
            progress.finish(f"node {event.node}", text)
        elif event.kind == "stage-end":
            for track in progress.tracks("node "):
                progress.finish(track)
            ended = f"stage {stage}: {event.status} in {seconds(event.elapsed)}"
            progress.finish("stage", with_estimate(ended, self.stages.get(stage)))
        elif event.kind == "snapshot":
            progress.start("stage", f"stage {stage}: snapshot of the lab")
        elif event.kind == "snapshot-end":
            progress.finish("stage", f"stage {stage}: {event.status}" if event.status else None)


def shows_log(err: BaseException) -> bool:
    """Whether an error deserves the log's last lines: not bad input (exit 2, refused before
    anything was done) and not Ctrl-C."""
    if isinstance(err, KeyboardInterrupt):
        return False
    return not (isinstance(err, LabbuilderError) and err.exit_code == 2)


def show_tail(stream: IO[str], path: Path, what: str = "log") -> None:
    """The last lines of the log ``path`` on ``stream``, under a line naming it."""
    lines = tail(path)
    if not lines:
        return
    stream.write(f"last lines of the {what} {path}:\n")
    stream.write("".join(f"  | {line}\n" for line in lines))
    stream.flush()


@contextlib.contextmanager
def watching(log: Path, title: str, stream: IO[str] | None = None) -> Iterator[Progress]:
    """A command's progress on standard error (or ``stream``) and its log file ``log`` (see
    ``labbuilder.lifecycle.logs``) while the block runs. If the block fails (other than as bad input
    or Ctrl-C), the display ends first and the log's last lines are shown, then the error
    goes on to be reported."""
    interval = heartbeat_interval()  # a bad value is refused before anything runs
    with lab_log(log, title):
        progress = Progress(stream, heartbeat=interval)
        try:
            with progress:
                yield progress
        except BaseException as err:
            if shows_log(err):
                show_tail(progress.console.file, log)
            raise
