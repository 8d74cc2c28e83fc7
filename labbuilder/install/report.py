"""Reports of an install run: JUnit XML, JSON, the failure report, and the comparison with the
previous run of the same recipe. Pure functions over ``StageOutcome``s, except ``write_reports``
and the history file helpers, which only read and write files they are given.
"""

from __future__ import annotations

import json
import secrets
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from labbuilder import __version__
from labbuilder.common.errors import LabbuilderError
from labbuilder.install.engine import StageOutcome, Status, StepOutcome
from labbuilder.lifecycle.state import write_state_file

REGRESSION_FACTOR = 1.5  # a stage this much slower than last time is flagged
REGRESSION_MIN_SECONDS = 10.0  # ... when it took at least this long


@dataclass(frozen=True)
class RunInfo:
    lab: str
    recipe: str
    recipe_digest: str
    path: str  # "fast" or "faithful"
    started: float  # epoch seconds
    seconds: float
    images: Mapping[str, Any]  # image manifests by node role
    resume_command: str
    # What stopped the run half-way (an error, Ctrl-C): type, where, message, hint
    error: Mapping[str, str | None] | None = None


@dataclass(frozen=True)
class Comparison:
    stage: str
    seconds: float
    previous: float | None

    @property
    def ratio(self) -> float | None:
        if self.previous is None or self.previous <= 0:
            return None
        return self.seconds / self.previous

    @property
    def regression(self) -> bool:
        ratio = self.ratio
        return (
            ratio is not None
            and ratio >= REGRESSION_FACTOR
            and self.seconds >= REGRESSION_MIN_SECONDS
        )

    def describe(self) -> str:
        ratio = self.ratio
        if ratio is None:
            return "first run"
        if self.regression:
            return f"{ratio:.1f}x slower than last run"
        return f"{ratio:.2f}x last run"


def first_failure(stages: Sequence[StageOutcome]) -> StepOutcome | None:
    for stage in stages:
        for step in stage.steps:
            if step.status == Status.FAILED:
                return step
    return None


def failure_report(stages: Sequence[StageOutcome], info: RunInfo) -> str | None:
    """What failed, where, why, and how to resume; None when nothing failed."""
    step = first_failure(stages)
    if info.error is not None:
        error = info.error
        resume = f"{info.resume_command} --from {step.stage}" if step else info.resume_command
        return "\n".join(
            [
                f"install stopped: {error['message']}",
                f"  where:     {error['where']}",
                *([f"  step:      {step.stage}/{step.step} on node {step.node}"] if step else []),
                *([f"  hint:      {error['hint']}"] if error.get("hint") else []),
                f"  resume with: {resume}",
            ]
        )
    if step is None:
        return None
    lines = [
        f"install failed: stage {step.stage}, step {step.step}, node {step.node}",
        f"  step:      {step.title}",
        f"  guide:     {step.guide or '(no guide reference)'}",
    ]
    if step.failed_check is not None:
        check = next(c for c in step.checks if c.name == step.failed_check)
        lines += [
            f"  check:     {check.name} "
            f"(failed after {check.attempts} tries, {check.seconds:.0f} s)",
            f"  command:   {check.command}",
        ]
        if check.expect:
            lines.append(f"  expected:  output matching /{check.expect}/")
    else:
        lines.append("  command:   " + "\n             ".join(step.script_head.splitlines()))
        lines.append(f"  exit code: {step.rc}" + (" (timed out)" if step.rc == 124 else ""))
    lines.append("  last output:")
    lines += [f"    {line}" for line in (step.output_tail or "(none)").splitlines()]
    lines.append(f"  resume with: {info.resume_command} --from {step.stage}")
    return "\n".join(lines)


def compare(stages: Sequence[StageOutcome], previous: Mapping[str, float]) -> list[Comparison]:
    return [
        Comparison(stage.name, stage.seconds, previous.get(stage.name))
        for stage in stages
        if stage.steps and any(s.status not in (Status.NOT_RUN,) for s in stage.steps)
    ]


def junit_xml(stages: Sequence[StageOutcome], info: RunInfo) -> str:
    """A suite per stage; a case per step and node, and per check and node."""
    root = ET.Element(
        "testsuites",
        name=f"labbuilder install {info.recipe} on {info.lab}",
        time=f"{info.seconds:.3f}",
    )
    if info.error is not None:
        suite = ET.SubElement(
            root, "testsuite", name=f"{info.recipe}.run", tests="1", failures="0", errors="1"
        )
        case = ET.SubElement(suite, "testcase", classname=f"{info.recipe}.run", name="run")
        error = ET.SubElement(
            case, "error", message=str(info.error["message"]), type=str(info.error["type"])
        )
        error.text = "\n".join(f"{key}: {value}" for key, value in info.error.items() if value)
    for stage in stages:
        cases: list[ET.Element] = []
        failures = skipped = 0
        for step in stage.steps:
            case = ET.Element(
                "testcase",
                classname=f"{info.recipe}.{stage.name}.{step.node}",
                name=f"{step.step}: {step.title}",
                time=f"{step.seconds:.3f}",
            )
            if step.status == Status.FAILED and step.rc is None and step.failed_check is None:
                failures += 1  # stopped by an error, not by the step's own exit code
                failure = ET.SubElement(
                    case,
                    "failure",
                    message=step.reason or "the step did not finish",
                    type="RunStopped",
                )
                failure.text = step.output_tail
            elif step.status == Status.FAILED and step.failed_check is None:
                failures += 1
                failure = ET.SubElement(
                    case, "failure", message=f"exit code {step.rc}", type="StepFailed"
                )
                failure.text = step.output_tail
            elif step.status in (Status.SKIPPED, Status.NOT_RUN, Status.DONE_BEFORE):
                skipped += 1
                ET.SubElement(case, "skipped", message=_skip_message(step))
            props = ET.SubElement(case, "properties")
            ET.SubElement(props, "property", name="guide", value=step.guide)
            ET.SubElement(props, "property", name="status", value=str(step.status))
            if step.path:
                ET.SubElement(props, "property", name="api_path", value=step.path)
            cases.append(case)
            for check in step.checks:
                check_case = ET.Element(
                    "testcase",
                    classname=f"{info.recipe}.{stage.name}.{step.node}",
                    name=f"{step.step} check: {check.name}",
                    time=f"{check.seconds:.3f}",
                )
                if not check.passed:
                    failures += 1
                    failure = ET.SubElement(
                        check_case,
                        "failure",
                        message=f"check failed after {check.attempts} tries",
                        type="CheckFailed",
                    )
                    failure.text = f"$ {check.command}\n{check.output_tail}"
                cases.append(check_case)
        suite = ET.SubElement(
            root,
            "testsuite",
            name=f"{info.recipe}.{stage.name}",
            tests=str(len(cases)),
            failures=str(failures),
            errors="0",
            skipped=str(skipped),
            time=f"{stage.seconds:.3f}",
        )
        suite.extend(cases)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode")


def _skip_message(step: StepOutcome) -> str:
    if step.status == Status.DONE_BEFORE:
        return "done before (run-once marker matches)"
    return step.reason or str(step.status)


def report_dict(
    stages: Sequence[StageOutcome], info: RunInfo, comparisons: Sequence[Comparison]
) -> dict[str, Any]:
    failure = first_failure(stages)
    by_stage = {c.stage: c for c in comparisons}
    return {
        "labbuilder_version": __version__,
        "lab": info.lab,
        "recipe": info.recipe,
        "recipe_digest": info.recipe_digest,
        "api_path": info.path,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(info.started)),
        "seconds": round(info.seconds, 3),
        "result": _result(failure, info),
        "failure": None
        if failure is None
        else {"stage": failure.stage, "step": failure.step, "node": failure.node},
        "error": None if info.error is None else dict(info.error),
        "resume_command": info.resume_command,
        "images": dict(info.images),
        "stages": [
            {
                "name": stage.name,
                "title": stage.title,
                "guide": stage.guide,
                "seconds": round(stage.seconds, 3),
                "snapshot_seconds": stage.snapshot_seconds,
                "snapshot_note": stage.snapshot_note or None,
                "previous_seconds": by_stage[stage.name].previous
                if stage.name in by_stage
                else None,
                "regression": by_stage[stage.name].regression if stage.name in by_stage else False,
                "steps": [_step_dict(step) for step in stage.steps],
            }
            for stage in stages
        ],
    }


def _result(failure: StepOutcome | None, info: RunInfo) -> str:
    if info.error is not None:
        return "interrupted" if info.error["type"] == "interrupted" else "failed"
    return "failed" if failure else "passed"


def _step_dict(step: StepOutcome) -> dict[str, Any]:
    data = asdict(step)
    data["status"] = str(step.status)
    data["seconds"] = round(step.seconds, 3)
    for check in data["checks"]:
        check["seconds"] = round(check["seconds"], 3)
    return data


def write_reports(
    directory: Path,
    stages: Sequence[StageOutcome],
    info: RunInfo,
    comparisons: Sequence[Comparison],
) -> tuple[Path, Path]:
    """Write ``install-<time>.xml`` and ``.json`` and point ``latest.xml``/``.json`` at them."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(info.started))
    junit = directory / f"install-{stamp}.xml"
    report = directory / f"install-{stamp}.json"
    write_state_file(junit, junit_xml(stages, info))
    write_state_file(report, json.dumps(report_dict(stages, info, comparisons), indent=1) + "\n")
    point_at(directory / "latest.xml", junit)
    point_at(directory / "latest.json", report)
    return junit, report


def point_at(link: Path, target: Path) -> None:
    """Make ``link`` a symbolic link to ``target`` (in the same folder), replacing it at once."""
    temporary = link.with_name(f".{link.name}.{secrets.token_hex(8)}.new")
    temporary.symlink_to(target.name)
    temporary.replace(link)


# --- the report of `up` ------------------------------------------------------------------------


@dataclass
class UpRecord:
    """What an ``up`` did, for its report: each node's rungs, the log, and how it ended."""

    lab: str
    started: float = field(default_factory=time.time)
    begin: float = field(default_factory=time.monotonic)
    rungs: dict[str, dict[str, float]] = field(default_factory=dict)  # node -> rung -> seconds
    current: dict[str, str] = field(default_factory=dict)  # node -> rung it waits for
    log: list[tuple[float, str]] = field(default_factory=list)

    def on_log(self, message: str) -> None:
        self.log.append((time.monotonic() - self.begin, message))

    def on_rung(self, node: str, rung: str, seconds: float) -> None:
        previous = self.current.get(node)
        if previous is not None:
            self.rungs.setdefault(node, {})[previous] = round(seconds, 3)
        self.current[node] = rung

    def as_dict(self, error: Mapping[str, str | None] | None) -> dict[str, Any]:
        return {
            "labbuilder_version": __version__,
            "command": "up",
            "lab": self.lab,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "seconds": round(time.monotonic() - self.begin, 3),
            "result": "passed"
            if error is None
            else ("interrupted" if error["type"] == "interrupted" else "failed"),
            "error": None if error is None else dict(error),
            "nodes": {
                node: {"rung": rung, "rungs": self.rungs.get(node, {})}
                for node, rung in sorted(self.current.items())
            },
            "log": [{"seconds": round(t, 3), "message": m} for t, m in self.log],
        }


def up_junit_xml(data: Mapping[str, Any], rung_names: Sequence[str]) -> str:
    """A suite for the lab: a case for the bring-up as a whole, and one per node and rung."""
    error = data["error"]
    cases: list[ET.Element] = []
    failures = skipped = 0
    whole = ET.Element("testcase", classname=f"up.{data['lab']}", name="bring-up",
                       time=f"{data['seconds']:.3f}")  # fmt: skip
    if error is not None:
        element = ET.SubElement(whole, "error", message=str(error["message"]), type=error["type"])
        element.text = "\n".join(f"{key}: {value}" for key, value in error.items() if value)
    system_out = ET.SubElement(whole, "system-out")
    system_out.text = "\n".join(f"{e['seconds']:8.1f} {e['message']}" for e in data["log"])
    cases.append(whole)
    for node, entry in data["nodes"].items():
        before = 0.0
        for rung in rung_names:
            case = ET.Element("testcase", classname=f"up.{data['lab']}.{node}", name=rung)
            reached = entry["rungs"].get(rung)
            if reached is not None:
                case.set("time", f"{reached - before:.3f}")
                before = reached
            elif entry["rung"] == rung and error is not None:
                failures += 1
                failure = ET.SubElement(
                    case, "failure", message=f"not reached: {error['message']}", type="NotReady"
                )
                failure.text = str(error["message"])
            else:
                skipped += 1
                ET.SubElement(case, "skipped", message="not reached")
            cases.append(case)
    root = ET.Element("testsuites", name=f"labbuilder up {data['lab']}",
                      time=f"{data['seconds']:.3f}")  # fmt: skip
    suite = ET.SubElement(
        root, "testsuite", name=f"up.{data['lab']}", tests=str(len(cases)),
        failures=str(failures), errors="0" if error is None else "1", skipped=str(skipped),
        time=f"{data['seconds']:.3f}",
    )  # fmt: skip
    suite.extend(cases)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode")


def write_up_reports(
    directory: Path,
    record: UpRecord,
    rung_names: Sequence[str],
    error: Mapping[str, str | None] | None = None,
) -> tuple[Path, Path]:
    """Write ``up-<time>.xml`` and ``.json``; ``up-latest.xml``/``.json`` point at them."""
    data = record.as_dict(error)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(record.started))
    junit = directory / f"up-{stamp}.xml"
    report = directory / f"up-{stamp}.json"
    write_state_file(junit, up_junit_xml(data, rung_names))
    write_state_file(report, json.dumps(data, indent=1) + "\n")
    point_at(directory / "up-latest.xml", junit)
    point_at(directory / "up-latest.json", report)
    return junit, report


def error_entry(
    err: BaseException, where: str, redact: Callable[[str], str] = lambda text: text
) -> dict[str, str | None]:
    """What stopped a command, for its report: the error, where it happened, what to do."""
    if isinstance(err, KeyboardInterrupt):
        kind, message, hint = "interrupted", "interrupted (Ctrl-C)", None
    elif isinstance(err, LabbuilderError):
        kind, message, hint = type(err).__name__, err.message, err.hint
    else:
        kind = f"{type(err).__module__}.{type(err).__name__}"
        message, hint = f"{type(err).__name__}: {err}", None
    return {
        "type": kind,
        "where": where,
        "message": redact(message),
        "hint": redact(hint) if hint else None,
    }


def load_history(path: Path) -> dict[str, float]:
    """Seconds per stage of the last run of a recipe that completed each stage."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): float(v) for k, v in data.get("stages", {}).items()}


def save_history(path: Path, stages: Sequence[StageOutcome]) -> None:
    """Remember each stage that ran to completion this time (steps done before do not count)."""
    history = load_history(path)
    for stage in stages:
        ran = [s for s in stage.steps if s.status in (Status.OK, Status.GUARDED)]
        if ran and not stage.failed:
            history[stage.name] = round(stage.seconds, 3)
    write_state_file(path, json.dumps({"stages": history}, indent=1) + "\n")
