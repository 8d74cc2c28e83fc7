"""What a long command (``up``, ``install``, ``run``, ``images build``) shows while it runs: one
line per phase, with elapsed time and, where a previous run is known, an estimate.

A command names its phases on *tracks* (one per node, say): ``start(track, text, estimate)``
begins a phase on a track (ending the phase the track had), ``finish(track, text)`` ends it and
prints ``text``, ``line(text)`` prints a sentence. Nothing else reaches the terminal: external
tools' output goes to the lab's log file (``labbuilder.lifecycle.logs``).

- On a terminal the running phases are a live display under the printed lines (a bar against
  the estimate, or a pulse where none is known, and the time elapsed). It is gone when the
  command ends, so the command's last sentence stands on its own line.
- Elsewhere (a pipe, a CI log) every line is plain and timestamped (``HH:MM:SS text``), and
  while a phase runs with nothing printed, ``HH:MM:SS still running: <phase> (N s)`` comes every
  heartbeat interval: ``$LABBUILDER_PROGRESS_HEARTBEAT`` seconds, 20 by default.

Every printed line (not the heartbeats) is also logged to ``labbuilder.cli.progress`` (INFO), so a
lab's log file holds the phases among the tools' output.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import IO

from rich.console import Console, RenderableType
from rich.progress import Progress as LiveProgress
from rich.progress import (
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from labbuilder.common.errors import UsageError

HEARTBEAT_ENV = "LABBUILDER_PROGRESS_HEARTBEAT"
DEFAULT_HEARTBEAT = 20.0  # seconds: a CI log hears from a long phase at least this often
HEARTBEAT_RANGE = (0.1, 30.0)

_log = logging.getLogger("labbuilder.cli.progress")


def heartbeat_interval(environ: Mapping[str, str] | None = None) -> float:
    """Seconds between ``still running`` lines: ``$LABBUILDER_PROGRESS_HEARTBEAT`` (0.1 to 30),
    else ``DEFAULT_HEARTBEAT``. Any other value is bad input (``UsageError``, exit 2)."""
    env = os.environ if environ is None else environ
    text = env.get(HEARTBEAT_ENV, "").strip()
    if not text:
        return DEFAULT_HEARTBEAT
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    low, high = HEARTBEAT_RANGE
    if not low <= value <= high:  # also refuses nan and inf
        raise UsageError(
            f"{HEARTBEAT_ENV}={text!r} is not a number of seconds from {low:g} to {high:g}",
            f"unset {HEARTBEAT_ENV} (a line every {DEFAULT_HEARTBEAT:.0f} s), or set it to, "
            "e.g., 5",
        )
    return value


def seconds(value: float) -> str:
    """A duration as the terminal shows it: ``95 s``."""
    return f"{value:.0f} s"


def with_estimate(text: str, estimate: float | None) -> str:
    """``text``, and what the same phase took last time where that is known (a last time under
    a second, say a re-run that found every step done, is no estimate)."""
    return text if estimate is None or estimate < 1 else f"{text} (last time {seconds(estimate)})"


@dataclass
class Phase:
    """A phase running on a track."""

    text: str
    started: float  # on the progress's clock
    estimate: float | None  # seconds it took last time
    task: TaskID | None = None  # its row in the live display


class EstimateColumn(ProgressColumn):
    """A bar filling up against the phase's estimate (a pulse where none is known), and the
    estimate itself."""

    def render(self, task: Task) -> RenderableType:
        estimate = task.fields.get("estimate")
        elapsed = task.elapsed or 0.0
        if not isinstance(estimate, float | int) or estimate <= 0:
            return ProgressBar(total=None, width=20, animation_time=task.get_time())
        row = Table.grid(padding=(0, 1))
        row.add_row(
            ProgressBar(total=float(estimate), completed=min(elapsed, estimate), width=20),
            Text(f"~{seconds(estimate)}"),
        )
        return row


class Progress:
    """One command's progress on ``stream`` (standard error by default); see the module's doc.

    Use it as a context manager: the live display or the heartbeat runs inside it. ``tty``
    chooses the form (default: whether ``stream`` is a terminal that is not dumb);
    ``heartbeat`` is the interval of ``still running`` lines (default
    ``heartbeat_interval()``). Its methods may be called from any thread.
    """

    def __init__(
        self,
        stream: IO[str] | None = None,
        *,
        tty: bool | None = None,
        heartbeat: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.console = Console(
            file=stream if stream is not None else sys.stderr,
            force_terminal=tty,
            emoji=False,
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
        self.tty = self.console.is_terminal and not self.console.is_dumb_terminal
        self.heartbeat = heartbeat_interval() if heartbeat is None else heartbeat
        self.clock = clock
        self.phases: dict[str, Phase] = {}
        self._lock = threading.RLock()
        self._last_output = clock()
        self._stop = threading.Event()
        self._beating: threading.Thread | None = None
        self._live: LiveProgress | None = None

    def __enter__(self) -> Progress:
        self.open()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()

    def open(self) -> None:
        """Start the live display (terminal) or the heartbeat (elsewhere)."""
        with self._lock:
            if self._live is not None or self._beating is not None:
                return
            self._stop.clear()
            self._last_output = self.clock()
            if self.tty:
                self._live = LiveProgress(
                    SpinnerColumn(),
                    TextColumn("{task.description}", markup=False),
                    EstimateColumn(),
                    TimeElapsedColumn(),
                    console=self.console,
                    transient=True,
                    refresh_per_second=4,
                )
                self._live.start()
            else:
                self._beating = threading.Thread(
                    target=self._beat, name="progress-heartbeat", daemon=True
                )
                self._beating.start()

    def close(self) -> None:
        """Stop the display or the heartbeat; the phases still running are dropped. The
        stream is left at the start of a line. Closing twice is harmless."""
        self._stop.set()
        beating = self._beating
        if beating is not None and beating is not threading.current_thread():
            beating.join()
        with self._lock:
            self._beating = None
            live, self._live = self._live, None
            self.phases.clear()
        if live is not None:
            live.stop()  # transient: the display is erased, the cursor at a line's start
        self.console.file.flush()

    def line(self, text: str) -> None:
        """Print ``text`` as a line of its own (timestamped), and log it."""
        _log.info("%s", text)
        self._write(text)

    def start(self, track: str, text: str, estimate: float | None = None) -> None:
        """Begin a phase on ``track`` (ending the one it had); ``estimate`` is what it took
        last time, in seconds. Nothing is printed: the live display shows it, and the
        heartbeat names it."""
        with self._lock:
            phase = Phase(text, self.clock(), estimate)
            old = self.phases.get(track)
            if self._live is not None:
                if old is not None and old.task is not None:
                    self._live.reset(old.task, description=text, estimate=estimate)
                    phase.task = old.task
                else:
                    phase.task = self._live.add_task(text, total=None, estimate=estimate)
            self.phases[track] = phase

    def finish(self, track: str, text: str | None = None) -> None:
        """End the phase on ``track`` (if any) and print ``text`` (if any)."""
        with self._lock:
            phase = self.phases.pop(track, None)
            if phase is not None and phase.task is not None and self._live is not None:
                self._live.remove_task(phase.task)
        if text is not None:
            self.line(text)

    def tracks(self, prefix: str = "") -> list[str]:
        """The tracks with a phase running now whose names start with ``prefix``."""
        with self._lock:
            return [track for track in self.phases if track.startswith(prefix)]

    def running(self) -> list[tuple[str, float]]:
        """The phases running now: (text, seconds since it began), oldest first."""
        with self._lock:
            now = self.clock()
            phases = sorted(self.phases.values(), key=lambda phase: phase.started)
            return [(phase.text, now - phase.started) for phase in phases]

    def _write(self, text: str) -> None:
        stamped = f"{time.strftime('%H:%M:%S')} {text}"
        with self._lock:
            self._last_output = self.clock()
            if self._live is not None:
                self._live.console.print(Text(stamped), soft_wrap=True)
            else:
                self.console.file.write(stamped + "\n")
                self.console.file.flush()

    def _beat(self) -> None:
        """The heartbeat: ``still running: ...`` when nothing was printed for an interval."""
        tick = min(1.0, self.heartbeat / 4)
        while not self._stop.wait(tick):
            with self._lock:
                if not self.phases or self.clock() - self._last_output < self.heartbeat:
                    continue
                running = "; ".join(f"{text} ({seconds(spent)})" for text, spent in self.running())
                self._write(f"still running: {running}")
