"""Reports of an install run: JUnit XML, JSON, the failure report, and the comparison with the
previous run of the same recipe. Pure functions over ``StageOutcome``s, except ``write_reports``
and the history file helpers, which only read and write files they are given.
"""

from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from labbuilder import __version__
from labbuilder.install import StageOutcome, Status, StepOutcome

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
            if step.status == Status.FAILED and step.failed_check is None:
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
        "result": "failed" if failure else "passed",
        "failure": None
        if failure is None
        else {"stage": failure.stage, "step": failure.step, "node": failure.node},
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
    directory.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(info.started))
    junit = directory / f"install-{stamp}.xml"
    report = directory / f"install-{stamp}.json"
    junit.write_text(junit_xml(stages, info))
    report.write_text(json.dumps(report_dict(stages, info, comparisons), indent=1) + "\n")
    for target, name in ((junit, "latest.xml"), (report, "latest.json")):
        link = directory / name
        link.unlink(missing_ok=True)
        link.symlink_to(target.name)
    return junit, report


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
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"stages": history}, indent=1) + "\n")
