"""The install engine: runs rendered stages on the lab's nodes, checks them, keeps run-once markers.

Stages run one after another. Within a stage every node walks its own steps in recipe order, in
parallel with the other nodes; a step that declares ``after`` waits until those steps are done on
every node that has them (the controller's database before the compute node's service, say). The
first failure stops the stage: nodes finish the step they are on and run nothing more.

For each step on each node:

* the run-once marker in the guest (``MARKER_DIR/<stage>.<step>``) holds the digest of the step's
  rendered script and checks; a matching marker means "done before": the step is skipped;
* otherwise the script runs (as root, fed on stdin); its guard may report it done already;
  transient failures (apt lock held, mirror 5xx, DNS hiccup) are retried a bounded number of times;
* then each check runs, retried until it matches or its timeout passes;
* only when the script and every check succeeded is the marker written.

A node that cannot be reached (its connection dropped and could not be made again: see
``adapters.ssh``) fails the step it was on, with the reason, like any failed step; the run is
reported as usual.

The engine is the only place that runs recipe commands. It talks to nodes through
``adapters.ssh.Transport`` (paramiko in production, a fake in unit tests), writes one log per
stage and node (secrets redacted), and reports every step and check as a ``StepOutcome``.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shlex
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from labbuilder.adapters.ssh import CommandResult, Transport
from labbuilder.common.errors import LabbuilderError
from labbuilder.recipe.model import RenderedCheck, RenderedStage, RenderedStep
from labbuilder.recipe.render import GUARD_SENTINEL, MARKER_DIR, write_file_script

TRANSIENT = re.compile(
    r"Could not get lock|Unable to acquire the dpkg frontend lock|Unable to lock directory"
    r"|Temporary failure resolving|Failed to fetch .* (?:50[0-9]|Connection)"
    r"|Hash Sum mismatch|Could not connect to|Connection timed out|Connection reset by peer",
)
CHECK_INTERVAL = 5.0
ONCE_TIMEOUT = 60.0  # a check tried once (a board's look at a lab) may take this long
RETRY_DELAYS = (5.0, 15.0, 30.0)
TAIL_LINES = 25


class Status(StrEnum):
    OK = "ok"  # ran, and its checks passed
    DONE_BEFORE = "done-before"  # its marker matched: nothing ran
    GUARDED = "guarded"  # its guard found the work done; checks ran
    SKIPPED = "skipped"  # not for this lab (e.g. needs the internet)
    FAILED = "failed"
    NOT_RUN = "not-run"  # an earlier failure stopped the run


@dataclass
class CheckOutcome:
    name: str
    command: str
    passed: bool
    seconds: float
    attempts: int
    output_tail: str
    guide: str
    expect: str | None


@dataclass
class StepOutcome:
    stage: str
    step: str
    node: str
    title: str
    guide: str
    status: Status
    seconds: float = 0.0
    rc: int | None = None
    attempts: int = 0
    output_tail: str = ""
    failed_check: str | None = None
    checks: list[CheckOutcome] = field(default_factory=list)
    path: str | None = None  # "fast" or "faithful" for API steps
    reason: str = ""
    script_head: str = ""  # the step's first command lines (redacted), for the failure report


@dataclass
class StageOutcome:
    name: str
    title: str
    guide: str
    seconds: float
    steps: list[StepOutcome]
    snapshot_seconds: float | None = None
    snapshot_note: str = ""  # why no snapshot was taken after a completed stage, if one was
    # due, or how a node that did not answer after it was brought back

    @property
    def failed(self) -> bool:
        return any(step.status == Status.FAILED for step in self.steps)


@dataclass
class EngineEvent:
    # "stage-start", "step-start", "step-end", "check", "stage-end", "snapshot", "snapshot-end"
    kind: str
    stage: str
    node: str = ""
    step: str = ""
    status: str = ""
    elapsed: float = 0.0


class Redactor:
    """Replaces every secret value in a text with ``********``."""

    def __init__(self, secrets: Sequence[str]) -> None:
        values = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)
        self._pattern = re.compile("|".join(re.escape(v) for v in values)) if values else None

    def __call__(self, text: str) -> str:
        return self._pattern.sub("********", text) if self._pattern else text


BATCH_MARK = "@@labbuilder-check"
SHARED_TOKENS = "LABBUILDER_SHARED_TOKENS"  # the warm Python's (install/guest/warmpython.py)
LOOK_PARALLEL = 4  # a node's checks run at once, at most, in a look (they only read)


def look_script(
    helpers: Mapping[str, str],
    steps: Sequence[RenderedStep],
    timeout: float,
    nonce: str,
    parallel: int = LOOK_PARALLEL,
    marker_dir: str = MARKER_DIR,
) -> str:
    """One script that looks at a node as a board does, in one login: puts the helpers the
    checks rely on in place (where they differ), lists the run-once markers, and runs the
    checks of each of ``steps`` whose marker matches its digest, ``parallel`` at a time, each
    as a re-check runs it (bash, ``set -eo pipefail``, stdin from /dev/null) under ``timeout``
    seconds; a step's checks with the same command share one run of it. It prints the
    markers, then each check's exit status (or ``skip``: its step is not done), output and
    errors, between lines holding ``nonce`` (a check's own output cannot forge them;
    ``parse_look``)."""
    mark = f"{BATCH_MARK}-{nonce}"
    lines = ["set +e"]
    for path, text in sorted(helpers.items()):
        body = text if text.endswith("\n") else text + "\n"
        digest = hashlib.sha256(body.encode()).hexdigest()
        write = write_file_script(
            path, body, "0755", "root:root", "helper", "LABBUILDER_HELPER_EOF"
        )
        lines.append(
            f"printf '%s  %s\\n' {digest} {shlex.quote(path)} | sha256sum -c --status "
            f"2>/dev/null || {{\n{write}\n}}"
        )
    # Forks are what costs in an emulated guest: the shell's builtins read the markers, and
    # each check's record (status, output, errors) is written by its own background job into
    # a file, all of which one `cat` prints in order.
    lines += [
        "d=$(mktemp -d) || exit 1",
        "trap 'rm -rf \"$d\"' EXIT",
        # the checks' API calls (the warm Python's) share an Identity token per credentials
        f'mkdir -m 0700 "$d/tokens" && export {SHARED_TOKENS}="$d/tokens"',
        f"mkdir -p {shlex.quote(marker_dir)}",
        f"printf '\\n{mark} markers\\n'",
        f'for f in {shlex.quote(marker_dir)}/*; do [ -f "$f" ] && read -r v < "$f" && '
        'printf \'%s %s\\n\' "${f##*/}" "$v"; done',
        "n=0",
    ]
    index = 0
    for step in steps:
        marker = shlex.quote(f"{marker_dir}/{marker_name(step)}")
        lines.append(
            f"v=; {{ read -r v < {marker}; }} 2>/dev/null; "
            f'if [ "$v" = {shlex.quote(step.digest)} ]; then'
        )
        # A step's checks that run the same command (two reading one console log) run it
        # once: its record is copied, renumbered, for the others.
        first: dict[str, int] = {}
        copies: dict[int, list[int]] = {}
        for offset, check in enumerate(step.checks):
            if check.command in first:
                copies.setdefault(first[check.command], []).append(index + offset)
            else:
                first[check.command] = index + offset
        for check in step.checks:
            if first[check.command] != index:
                index += 1
                continue
            body = shlex.quote("set -eo pipefail\n" + check.command + "\n")
            record = f'"$d/{index:05d}.rec"'
            copy = "".join(
                f"; sed 's/^{mark} {index} /{mark} {other} /' {record} > \"$d/{other:05d}.rec\""
                for other in copies.get(index, [])
            )
            lines += [
                f"  printf '%s' {body} > \"$d/{index}\"",
                f'  {{ {{ timeout {int(timeout)} bash "$d/{index}" </dev/null >"$d/{index}.out" '
                f'2>"$d/{index}.err"; printf \'\\n{mark} {index} %s\\n\' "$?"; '
                f"cat \"$d/{index}.out\"; printf '\\n{mark} {index} err\\n'; "
                f'tail -c 4000 "$d/{index}.err"; }} > {record}{copy}; }} &',
                f'  n=$((n + 1)); if [ "$n" -ge {max(1, parallel)} ]; then wait -n; '
                "n=$((n - 1)); fi",
            ]
            index += 1
        lines.append("else")
        for i in range(index - len(step.checks), index):
            lines.append(f"  printf '\\n{mark} {i} skip\\n{mark} {i} err\\n' > \"$d/{i:05d}.rec\"")
        lines.append("fi")
    lines.append("wait")
    if index:
        lines.append('cat "$d"/*.rec')
    lines.append(f"printf '\\n{mark} end\\n'")
    return "\n".join(lines) + "\n"


def parse_look(
    stdout: str, count: int, nonce: str
) -> tuple[dict[str, str], list[tuple[int, str, str] | None]]:
    """The markers and each check's (exit status, output, errors), None for a check not run,
    from ``look_script``'s output; GuestCommandError if the script did not get through."""
    from labbuilder.common.errors import GuestCommandError

    mark = f"{BATCH_MARK}-{nonce}"
    pattern = re.compile(rf"^{re.escape(mark)} (\d+|end|markers)(?: (-?\d+|err|skip))?$", re.M)
    marks = list(pattern.finditer(stdout))
    if not marks or marks[0].group(1) != "markers":
        raise GuestCommandError(
            "looking at the node failed before its markers were read",
            "check that the lab is up (`labbuilder status`)",
        )
    listing = stdout[marks[0].end() + 1 : marks[1].start() if len(marks) > 1 else len(stdout)]
    markers = _marker_lines(listing)
    answers: list[tuple[int, str, str] | None] = []
    for index in range(count):
        head = 1 + 2 * index
        if head + 2 >= len(marks) or marks[head].group(1) != str(index):
            raise GuestCommandError(
                f"the checks stopped before check {index + 1} of {count}",
                "check that the lab is up (`labbuilder status`)",
            )
        if marks[head].group(2) == "skip":
            answers.append(None)
            continue
        rc = int(marks[head].group(2))
        out = stdout[marks[head].end() + 1 : marks[head + 1].start()].removesuffix("\n")
        err = stdout[marks[head + 1].end() + 1 : marks[head + 2].start()].removesuffix("\n")
        answers.append((rc, out, err))
    if marks[-1].group(1) != "end" or len(marks) != 2 + 2 * count:
        raise GuestCommandError(
            "the checks did not finish", "check that the lab is up (`labbuilder status`)"
        )
    return markers, answers


def marker_name(step: RenderedStep) -> str:
    return f"{step.stage}.{step.step}"


def read_markers(transport: Transport) -> dict[str, str]:
    """The run-once markers a node has: marker name -> digest."""
    script = (
        f"mkdir -p {MARKER_DIR}\n"
        f"for f in {MARKER_DIR}/*; do [ -f \"$f\" ] && printf '%s %s\\n' "
        '"${f##*/}" "$(cat "$f")"; done; true\n'
    )
    result = transport.run_script(script, timeout=120)
    if result.failed:
        raise_transport_failure("reading the run-once markers", result)
    return _marker_lines(result.stdout)


def _marker_lines(text: str) -> dict[str, str]:
    """Marker name -> digest, from the lines ``name digest`` a marker listing prints."""
    markers = {}
    for line in text.splitlines():
        name, _, digest = line.partition(" ")
        if digest:
            markers[name] = digest.strip()
    return markers


def install_helpers(transport: Transport, helpers: Mapping[str, str]) -> None:
    """Put the files the rendered scripts rely on (path -> text, executable) on a node."""
    parts = [
        write_file_script(path, text, "0755", "root:root", "helper", "LABBUILDER_HELPER_EOF")
        for path, text in sorted(helpers.items())
    ]
    if not parts:
        return
    result = transport.run_script("set -e\n" + "\n".join(parts) + "\n", timeout=120)
    if result.failed:
        raise_transport_failure("putting labbuilder's helpers on the node", result)


def raise_transport_failure(what: str, result: CommandResult) -> None:
    from labbuilder.common.errors import GuestCommandError

    raise GuestCommandError(
        f"{what} failed (exit code {result.rc}): {result.stderr.strip()[-500:]}",
        "check that the lab is up (`labbuilder status`) and the node answers `labbuilder ssh`",
    )


class Engine:
    """Runs rendered stages over one transport per node. Create one per ``install`` run."""

    def __init__(
        self,
        transports: Mapping[str, Transport],
        *,
        redact: Callable[[str], str] = lambda text: text,
        log_dir: Path | None = None,
        on_event: Callable[[EngineEvent], None] | None = None,
        after_stage: Callable[[StageOutcome], float | None] | None = None,
        force: bool = False,
        recheck: bool = False,
        helpers: Mapping[str, str] | None = None,
        check_interval: float = CHECK_INTERVAL,
        retry_delays: Sequence[float] = RETRY_DELAYS,
    ) -> None:
        self.transports = transports
        self.redact = redact
        self.log_dir = log_dir
        self.on_event = on_event or (lambda _event: None)
        self.after_stage = after_stage
        self.force = force
        self.recheck = recheck  # a step done before runs its checks again
        self.helpers = dict(helpers or {})
        self.check_once = False  # each check tried once (see check)
        self.check_interval = check_interval
        self.retry_delays = tuple(retry_delays)
        self.markers: dict[str, dict[str, str]] = {}
        self.looked: dict[str, StepOutcome] = {}  # re-checks done at once, by stage/step@node
        self._log_lock = threading.Lock()

    # --- the run ------------------------------------------------------------------------------

    def run(self, stages: Sequence[RenderedStage]) -> list[StageOutcome]:
        nodes = sorted({node for stage in stages for node in stage.nodes})
        missing = [node for node in nodes if node not in self.transports]
        if missing:
            raise ValueError(f"no transport for nodes {missing}")

        if self.recheck and not self.force:
            # Steps done before have their checks run again: first all at once (one script per
            # node, as a board's look), then, one by one with their retries, only those whose
            # check did not pass at the first try.
            found, self.looked = self._look(stages, nodes)
        else:
            found = self._prepare(nodes)
        unprepared = {node: err for node, err in found.items() if isinstance(err, LabbuilderError)}
        self.markers = {n: m for n, m in found.items() if not isinstance(m, LabbuilderError)}
        outcomes: list[StageOutcome] = []
        failed = False
        for stage in stages:
            if unprepared and not failed:
                # A node that could not be prepared fails the first stage, with the reason.
                outcomes.append(self._unprepared(stage, unprepared))
                failed = True
                continue
            if failed:
                outcomes.append(self._not_run(stage, "an earlier stage failed"))
                continue
            outcome = self.run_stage(stage)
            outcomes.append(outcome)
            failed = outcome.failed
            if not failed and self.after_stage is not None:
                self.on_event(EngineEvent("snapshot", stage.name))
                outcome.snapshot_seconds = self.after_stage(outcome)
                self.on_event(
                    EngineEvent(
                        "snapshot-end",
                        stage.name,
                        status=outcome.snapshot_note,
                        elapsed=outcome.snapshot_seconds or 0.0,
                    )
                )
        return outcomes

    def check(self, stages: Sequence[RenderedStage], *, once: bool = False) -> list[StageOutcome]:
        """Run no step: each step done before (its marker matches) has its checks run again
        (its status stays done-before, or is failed naming the check); a step not done yet is
        not run ("not done"). Every stage is looked at, whatever an earlier one found: what a
        trainer's board shows of a lab now. Nodes are looked at in parallel, each node's steps
        one after the other. With ``once``, each check is tried once (at most
        ``ONCE_TIMEOUT`` seconds), not again until its timeout: how the lab is now."""
        self.check_once = once
        nodes = sorted({node for stage in stages for node in stage.nodes})
        if once:
            found, batched = self._look(stages, nodes)
        else:
            found, batched = self._prepare(nodes), {}
        self.markers = {n: m for n, m in found.items() if not isinstance(m, LabbuilderError)}
        outcomes = []
        for stage in stages:
            start = time.monotonic()

            def look(step: RenderedStep) -> StepOutcome:
                reached = found.get(step.node)
                if isinstance(reached, LabbuilderError):
                    return self._outcome(
                        step, Status.FAILED, reason=self.redact(f"unreachable: {reached.message}")
                    )
                if step.skipped_reason:
                    return self._outcome(step, Status.SKIPPED, reason=step.skipped_reason)
                if reached is None or reached.get(marker_name(step)) != step.digest:
                    return self._outcome(step, Status.NOT_RUN, reason="not done")
                if not step.checks:
                    return self._outcome(step, Status.DONE_BEFORE)
                if step.key + "@" + step.node in batched:
                    return batched[step.key + "@" + step.node]
                return self._recheck(step)

            def walk(node: str, stage: RenderedStage = stage) -> list[StepOutcome]:
                return [look(step) for step in stage.for_node(node)]  # one node: one at a time

            with ThreadPoolExecutor(max_workers=max(1, len(stage.nodes))) as pool:
                by_node = dict(zip(stage.nodes, pool.map(walk, stage.nodes), strict=True))
            found_steps = {(s.node, s.step): s for outs in by_node.values() for s in outs}
            steps = [found_steps[(step.node, step.step)] for step in stage.steps]
            outcomes.append(
                StageOutcome(stage.name, stage.title, stage.guide, time.monotonic() - start, steps)
            )
        return outcomes

    def _look(
        self, stages: Sequence[RenderedStage], nodes: Sequence[str]
    ) -> tuple[dict[str, dict[str, str] | LabbuilderError], dict[str, StepOutcome]]:
        """Each node looked at in one script (``look_script``; the nodes in parallel): its
        markers, and the checks of its steps done before, each tried once. A login's worth of
        round trips per script costs seconds under emulation. Gives each node's markers (or
        its error) and the outcomes of the steps done before, keyed ``stage/step@node``."""
        todo: dict[str, list[RenderedStep]] = {node: [] for node in nodes}
        for stage in stages:
            for step in stage.steps:
                if not step.skipped_reason and step.checks and step.node in todo:
                    todo[step.node].append(step)

        def node_look(node: str) -> tuple[dict[str, str] | LabbuilderError, dict[str, StepOutcome]]:
            steps = todo[node]
            checks = [check for step in steps for check in step.checks]
            start = time.monotonic()
            try:
                nonce = secrets.token_hex(8)
                result = self.transports[node].run_script(
                    look_script(self.helpers, steps, ONCE_TIMEOUT, nonce),
                    timeout=ONCE_TIMEOUT * len(checks) + 120,
                )
                if result.rc != 0 and BATCH_MARK not in result.stdout:
                    raise_transport_failure("looking at the node", result)
                markers, answers = parse_look(result.stdout, len(checks), nonce)
            except LabbuilderError as err:
                return err, {}
            ran = sum(1 for answer in answers if answer is not None)
            seconds = (time.monotonic() - start) / max(1, ran)
            outcomes: dict[str, StepOutcome] = {}
            index = 0
            for step in steps:
                found = answers[index : index + len(step.checks)]
                index += len(step.checks)
                if markers.get(marker_name(step)) != step.digest:
                    continue  # not done: no outcome here
                outcome = self._outcome(step, Status.DONE_BEFORE)
                for check, answer in zip(step.checks, found, strict=True):
                    if outcome.status == Status.FAILED:
                        continue  # as a re-check does: the step's first failing check counts
                    if answer is None:
                        outcome.status = Status.FAILED
                        outcome.reason = "its marker changed while the node was looked at"
                        continue
                    rc, out, errors = answer
                    passed = rc == 0 and (
                        check.expect is None or re.search(check.expect, out, re.M) is not None
                    )
                    tail = self.redact("\n".join((out + errors).splitlines()[-20:]))
                    outcome.checks.append(
                        CheckOutcome(
                            name=check.name,
                            command=self.redact(check.command),
                            passed=passed,
                            seconds=seconds,
                            attempts=1,
                            output_tail=tail,
                            guide=check.guide,
                            expect=check.expect,
                        )
                    )
                    if not passed:
                        outcome.status = Status.FAILED
                        outcome.failed_check = check.name
                        outcome.output_tail = tail
                        outcome.reason = f"done before, but its check {check.name} fails now"
                outcomes[f"{step.key}@{node}"] = outcome
            return markers, outcomes

        with ThreadPoolExecutor(max_workers=max(1, len(nodes))) as pool:
            looked = dict(zip(nodes, pool.map(node_look, nodes), strict=True))
        found = {node: markers for node, (markers, _) in looked.items()}
        return found, {key: out for _, outs in looked.values() for key, out in outs.items()}

    def _prepare(self, nodes: Sequence[str]) -> dict[str, dict[str, str] | LabbuilderError]:
        """Each node's helpers written and its run-once markers read, in parallel; a node
        that cannot be reached gives its error instead."""

        def prepare(node: str) -> dict[str, str] | LabbuilderError:
            try:
                install_helpers(self.transports[node], self.helpers)
                return read_markers(self.transports[node])
            except LabbuilderError as err:
                return err

        with ThreadPoolExecutor(max_workers=max(1, len(nodes))) as pool:
            return dict(zip(nodes, pool.map(prepare, nodes), strict=True))

    def _not_run(self, stage: RenderedStage, reason: str) -> StageOutcome:
        steps = [
            StepOutcome(s.stage, s.step, s.node, s.title, s.guide, Status.NOT_RUN, reason=reason)
            for s in stage.steps
        ]
        return StageOutcome(stage.name, stage.title, stage.guide, 0.0, steps)

    def _unprepared(
        self, stage: RenderedStage, errors: Mapping[str, LabbuilderError]
    ) -> StageOutcome:
        outcome = self._not_run(stage, "a node could not be prepared")
        for step in outcome.steps:
            if step.node in errors:
                err = errors[step.node]
                step.status = Status.FAILED
                step.reason = self.redact(f"preparing node {step.node}: {err.message}")
                step.output_tail = self.redact(str(err))
        return outcome

    def run_stage(self, stage: RenderedStage) -> StageOutcome:
        start = time.monotonic()
        self.on_event(EngineEvent("stage-start", stage.name))
        results: dict[tuple[str, str], StepOutcome] = {}
        done: set[tuple[str, str]] = set()  # (node, recipe step name)
        runs_on: dict[str, set[str]] = {}
        for step in stage.steps:
            for name in step.step_names:
                runs_on.setdefault(name, set()).add(step.node)
        condition = threading.Condition()
        stop = threading.Event()

        def walk(node: str) -> None:
            for step in stage.for_node(node):
                if stop.is_set():
                    results[(node, step.step)] = self._outcome(
                        step, Status.NOT_RUN, reason="an earlier step failed"
                    )
                    continue
                with condition:
                    condition.wait_for(
                        lambda step=step: (
                            stop.is_set()  # type: ignore[misc]
                            or all(
                                (other, name) in done
                                for name in step.after
                                for other in runs_on.get(name, ())
                            )
                        )
                    )
                if stop.is_set():
                    results[(node, step.step)] = self._outcome(
                        step, Status.NOT_RUN, reason="an earlier step failed"
                    )
                    continue
                try:
                    outcome = self.run_step(step)
                except BaseException:
                    # Nodes waiting on this step's `after` must not wait for ever: they stop.
                    with condition:
                        stop.set()
                        condition.notify_all()
                    raise
                results[(node, step.step)] = outcome
                with condition:
                    if outcome.status == Status.FAILED:
                        stop.set()
                    else:
                        done.update((node, name) for name in step.step_names)
                    condition.notify_all()

        with ThreadPoolExecutor(max_workers=max(1, len(stage.nodes))) as pool:
            for future in [pool.submit(walk, node) for node in stage.nodes]:
                future.result()
        ordered = [results[(step.node, step.step)] for step in stage.steps]
        seconds = time.monotonic() - start
        outcome = StageOutcome(stage.name, stage.title, stage.guide, seconds, ordered)
        status = "failed" if outcome.failed else "ok"
        self.on_event(EngineEvent("stage-end", stage.name, status=status, elapsed=seconds))
        return outcome

    def _outcome(self, step: RenderedStep, status: Status, **extra: object) -> StepOutcome:
        outcome = StepOutcome(
            step.stage,
            step.step,
            step.node,
            step.title,
            step.guide,
            status,
            path=str(step.path) if step.path else None,
        )
        for key, value in extra.items():
            setattr(outcome, key, value)
        return outcome

    # --- one step -----------------------------------------------------------------------------

    def run_step(self, step: RenderedStep) -> StepOutcome:
        if step.skipped_reason:
            self._log(step, f"== {step.step}: skipped: {step.skipped_reason}")
            return self._outcome(step, Status.SKIPPED, reason=step.skipped_reason)
        marker = marker_name(step)
        if not self.force and self.markers.get(step.node, {}).get(marker) == step.digest:
            self._log(step, f"== {step.step}: done before (marker {marker} matches)")
            if self.recheck and step.checks:
                looked = self.looked.get(f"{step.key}@{step.node}")
                if looked is not None and looked.status != Status.FAILED:
                    for check in looked.checks:
                        self._log(step, f"   check passed: {check.name} (re-checked at once)")
                    self.on_event(
                        EngineEvent("step-end", step.stage, step.node, step.step, "done-before")
                    )
                    return looked
                return self._recheck(step)
            self.on_event(EngineEvent("step-end", step.stage, step.node, step.step, "done-before"))
            return self._outcome(step, Status.DONE_BEFORE)
        start = time.monotonic()
        self.on_event(EngineEvent("step-start", step.stage, step.node, step.step))
        self._log(step, f"== {step.step}: {step.title} ({step.guide or 'no guide reference'})")
        try:
            return self._run_step(step, start)
        except LabbuilderError as err:
            # The node could not be reached (the connection dropped and did not come back,
            # a file to copy could not be read): the step fails with its report.
            reason = self.redact(err.message.splitlines()[0] if err.message else str(err))
            seconds = time.monotonic() - start
            self._log(step, f"   FAILED: {err}")
            self.on_event(
                EngineEvent("step-end", step.stage, step.node, step.step, "failed", seconds)
            )
            return self._outcome(
                step,
                Status.FAILED,
                seconds=seconds,
                reason=reason,
                output_tail=self.redact(str(err)),
                script_head=self._script_head(step),
            )

    def _recheck(self, step: RenderedStep) -> StepOutcome:
        """A step done before, its checks run again: still done-before if they pass, failed
        (naming the check) if one does not."""
        start = time.monotonic()
        self.on_event(EngineEvent("step-start", step.stage, step.node, step.step))
        outcome = self._outcome(step, Status.DONE_BEFORE)
        try:
            for check in step.checks:
                checked = self.run_check(self.transports[step.node], step, check)
                outcome.checks.append(checked)
                if not checked.passed:
                    self._log(step, f"   done before, but check {check.name} fails now")
                    outcome.status = Status.FAILED
                    outcome.failed_check = check.name
                    outcome.output_tail = checked.output_tail
                    outcome.reason = f"done before, but its check {check.name} fails now"
                    break
        except LabbuilderError as err:
            outcome.status = Status.FAILED
            outcome.reason = self.redact(err.message.splitlines()[0] if err.message else str(err))
        outcome.seconds = time.monotonic() - start
        self.on_event(
            EngineEvent(
                "step-end", step.stage, step.node, step.step, str(outcome.status), outcome.seconds
            )
        )
        return outcome

    def _run_step(self, step: RenderedStep, start: float) -> StepOutcome:
        marker = marker_name(step)
        transport = self.transports[step.node]
        result, attempts = self._run_with_retries(transport, step)
        status = Status.OK
        if GUARD_SENTINEL in result.stdout and result.rc == 0:
            status = Status.GUARDED
            self._log(step, "   guard: already done")
        outcome = self._outcome(
            step,
            status,
            rc=result.rc,
            attempts=attempts,
            output_tail=self._tail(result),
            script_head=self._script_head(step),
        )
        if result.failed:
            outcome.status = Status.FAILED
            outcome.seconds = time.monotonic() - start
            self._log(step, f"   FAILED with exit code {result.rc}")
            self.on_event(
                EngineEvent("step-end", step.stage, step.node, step.step, "failed", outcome.seconds)
            )
            return outcome
        for check in step.checks:
            checked = self.run_check(transport, step, check)
            outcome.checks.append(checked)
            if not checked.passed:
                outcome.status = Status.FAILED
                outcome.failed_check = check.name
                outcome.output_tail = checked.output_tail
                break
        if outcome.status != Status.FAILED:
            written = transport.run_script(
                f"mkdir -p {MARKER_DIR}\nprintf '%s\\n' {shlex.quote(step.digest)}"
                f" > {MARKER_DIR}/{shlex.quote(marker)}\n",
                timeout=60,
            )
            if written.failed:
                outcome.status = Status.FAILED
                outcome.output_tail = f"could not write the run-once marker: {written.stderr}"
        outcome.seconds = time.monotonic() - start
        self.on_event(
            EngineEvent(
                "step-end", step.stage, step.node, step.step, str(outcome.status), outcome.seconds
            )
        )
        return outcome

    def _fetched_files(self, step: RenderedStep) -> str:
        """Shell that writes the files the step copies from other nodes (read from them now)."""
        parts = []
        for source, path, mode, owner in step.fetch:
            read = self.transports[source].run_script(
                f"base64 -w0 {shlex.quote(path)}\n", timeout=300
            )
            if read.failed:
                raise_transport_failure(f"reading {path} on {source} for {step.key}", read)
            user, group = owner.split(":")
            target = shlex.quote(path)
            parts.append(
                f"install -d {shlex.quote(path.rsplit('/', 1)[0] or '/')}\n"
                f"echo {read.stdout.strip()} | base64 -d > {target}.labbuilder-new\n"
                f"install -m {mode} -o {user} -g {group} {target}.labbuilder-new {target}\n"
                f"rm -f {target}.labbuilder-new\n"
            )
        return "".join(parts)

    def _run_with_retries(
        self, transport: Transport, step: RenderedStep
    ) -> tuple[CommandResult, int]:
        script = step.script
        if step.fetch:
            head, _, body = script.partition("set -euo pipefail\n")
            script = head + "set -euo pipefail\n" + self._fetched_files(step) + body
        attempt = 0
        while True:
            attempt += 1
            result = transport.run_script(
                script,
                timeout=step.timeout,
                on_output=lambda line: self._log(step, "   " + line),
            )
            if not result.failed or attempt > step.retries:
                return result, attempt
            if not TRANSIENT.search(result.stdout + result.stderr):
                return result, attempt
            delay = self.retry_delays[min(attempt - 1, len(self.retry_delays) - 1)]
            self._log(step, f"   transient failure (exit {result.rc}); retrying in {delay:.0f} s")
            time.sleep(delay)

    def run_check(
        self, transport: Transport, step: RenderedStep, check: RenderedCheck
    ) -> CheckOutcome:
        start = time.monotonic()
        deadline = start + (0.0 if self.check_once else check.timeout)
        attempts = 0
        self._log(step, f"   check: {check.name}")
        while True:
            attempts += 1
            result = transport.run_script(
                "set -eo pipefail\n" + check.command + "\n",
                timeout=ONCE_TIMEOUT if self.check_once else max(120.0, check.timeout),
            )
            passed = result.rc == 0 and (
                check.expect is None or re.search(check.expect, result.stdout, re.M) is not None
            )
            if passed or time.monotonic() + self.check_interval > deadline:
                break
            time.sleep(self.check_interval)
        tail = self._tail(result)
        self._log(
            step,
            f"   check {'passed' if passed else 'FAILED'}: {check.name} "
            f"({attempts} tries, {time.monotonic() - start:.1f} s)\n"
            + "\n".join("     " + line for line in tail.splitlines()),
        )
        self.on_event(
            EngineEvent(
                "check", step.stage, step.node, check.name, "passed" if passed else "failed"
            )
        )
        if not passed and check.expect is not None and result.rc == 0:
            tail += f"\n(expected output matching /{check.expect}/)"
        return CheckOutcome(
            name=check.name,
            command=self.redact(check.command),
            passed=passed,
            seconds=time.monotonic() - start,
            attempts=attempts,
            output_tail=tail,
            guide=check.guide,
            expect=check.expect,
        )

    # --- output -------------------------------------------------------------------------------

    def _tail(self, result: CommandResult) -> str:
        lines = (result.stdout.rstrip() + "\n" + result.stderr.rstrip()).strip().splitlines()
        lines = [line for line in lines if line != GUARD_SENTINEL]
        return self.redact("\n".join(lines[-TAIL_LINES:]))

    def _script_head(self, step: RenderedStep) -> str:
        body = [
            line
            for line in step.script.splitlines()
            if line and not line.startswith("#") and not line.startswith(("set -", "export "))
        ]
        return self.redact("\n".join(body[:6]))

    def _log(self, step: RenderedStep, text: str) -> None:
        if self.log_dir is None:
            return
        path = self.log_dir / step.stage / f"{step.node}.log"
        with self._log_lock:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Never through a link planted where a log goes; logs may hold secrets' context.
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
            with os.fdopen(os.open(path, flags, 0o600), "a") as log:
                stamp = time.strftime("%H:%M:%S")
                log.write(f"{stamp} {self.redact(text)}\n")
