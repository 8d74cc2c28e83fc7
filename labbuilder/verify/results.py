"""Tempest's results, read from the subunit v2 stream its run leaves, into reports: one JUnit
case per test, a summary per service (passed, failed, skipped with Tempest's reason), the
failing tests' tracebacks. The recipe's expected skips are reported as skipped with their
reason, though they never ran."""

from __future__ import annotations

import io
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import subunit  # type: ignore[import-untyped]
import testtools

from labbuilder.verify.spec import ExpectedSkip

PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"
_STATUS = {"success": PASSED, "xfail": PASSED, "fail": FAILED, "uxsuccess": FAILED,
           "skip": SKIPPED}  # fmt: skip
_TAGS = re.compile(r"\[[^\]]*\]$")
_FIXTURE = re.compile(r"^(setUpClass|tearDownClass) \((.+)\)$")  # a class's setup, as a test


@dataclass(frozen=True)
class TestCase:
    """One Tempest test (or a class's setup, which Tempest reports as a test of its own)."""

    id: str  # tempest.api.identity.v3.test_tokens.TokensV3Test.test_create_token[id-...,smoke]
    status: str  # passed | failed | skipped
    seconds: float = 0.0
    reason: str = ""  # a skip's reason, a failure's last line
    details: str = field(default="", repr=False)  # a failure's traceback and log

    @property
    def name(self) -> str:
        """The id without its tags."""
        return _TAGS.sub("", self.id)

    @property
    def service(self) -> str:
        """``identity``, ``compute``, ``network``, ... for API tests; ``scenario`` otherwise.
        A class's setup counts for its class's service."""
        parts = self.classname.split(".")
        if len(parts) > 2 and parts[1] == "api":
            return parts[2]
        return parts[1] if len(parts) > 1 and parts[0] == "tempest" else "other"

    @property
    def classname(self) -> str:
        fixture = _FIXTURE.match(self.name)
        return fixture.group(2) if fixture else self.name.rsplit(".", 1)[0]

    @property
    def method(self) -> str:
        fixture = _FIXTURE.match(self.name)
        return fixture.group(1) if fixture else self.name.rsplit(".", 1)[-1]


SUBUNIT_V2 = b"\xb3"  # the first byte of every packet of a version 2 stream


def read_subunit(data: bytes) -> list[TestCase]:
    """The tests in a subunit stream (version 2, or version 1 as stestr's repository keeps a
    run), in the order they ended."""
    cases: list[TestCase] = []

    def ended(test: Any) -> None:  # testtools' TestDict
        status = _STATUS.get(test["status"])
        if status is None:  # "exists" (a listing) or "inprogress" (cut off)
            if test["status"] != "inprogress":
                return
            status = FAILED
        timestamps = [t for t in test["timestamps"] if t is not None]
        seconds = (timestamps[-1] - timestamps[0]).total_seconds() if len(timestamps) > 1 else 0.0
        details = {name: content.as_text() for name, content in test["details"].items()}
        reason = details.get("reason", "").strip()
        text = "\n".join(
            f"--- {name}\n{value}" for name, value in details.items() if name != "reason" and value
        )
        if status == FAILED and not reason:
            trace = details.get("traceback", "").strip().splitlines()
            reason = trace[-1] if trace else "no traceback (the test did not finish)"
        cases.append(
            TestCase(test["id"], status, seconds, reason, text if status == FAILED else "")
        )

    result = testtools.StreamToDict(ended)
    if data[:1] == SUBUNIT_V2:
        stream = subunit.ByteStreamToStreamResult(io.BytesIO(data), non_subunit_name="stdout")
        result.startTestRun()
        try:
            stream.run(result)
        finally:
            result.stopTestRun()
    else:  # version 1, as stestr keeps a run in its repository
        decorated = testtools.ExtendedToStreamDecorator(result)
        decorated.startTestRun()
        try:
            subunit.ProtocolTestCase(io.BytesIO(data)).run(decorated)
        finally:
            decorated.stopTestRun()
    return cases


def with_expected_skips(
    cases: Sequence[TestCase], skipped: Iterable[tuple[str, ExpectedSkip]]
) -> list[TestCase]:
    """``cases`` and, for every (test id, expected skip) left out of the run, a skipped case
    with the recipe's reason."""
    ran = {case.id for case in cases}
    extra = [
        TestCase(test, SKIPPED, 0.0, f"expected skip: {skip.why}")
        for test, skip in skipped
        if test not in ran
    ]
    return [*cases, *extra]


def passed(cases: Sequence[TestCase], exit_code: int) -> bool:
    """A run passes when Tempest ended well (0, or not run at all when every test selected is
    an expected skip), no test failed, and tests were reported, passed or skipped with a
    reason (a run that reports nothing never passes)."""
    return exit_code == 0 and bool(cases) and not any(c.status == FAILED for c in cases)


def summary(cases: Sequence[TestCase]) -> dict[str, dict[str, int]]:
    """Per service: how many tests passed, failed and were skipped."""
    out: dict[str, dict[str, int]] = {}
    for case in cases:
        counts = out.setdefault(case.service, {PASSED: 0, FAILED: 0, SKIPPED: 0})
        counts[case.status] += 1
    return dict(sorted(out.items()))


def skip_reasons(cases: Sequence[TestCase]) -> dict[str, list[str]]:
    """Each skip reason and the tests it skipped."""
    out: dict[str, list[str]] = {}
    for case in cases:
        if case.status == SKIPPED:
            out.setdefault(case.reason or "no reason given", []).append(case.name)
    return dict(sorted(out.items()))


def junit_xml(cases: Sequence[TestCase], *, lab: str, suite: str, seconds: float) -> str:
    """A suite per service, a case per test."""
    root = ET.Element("testsuites", name=f"labbuilder verify {lab} ({suite})",
                      time=f"{seconds:.3f}")  # fmt: skip
    by_service: dict[str, list[TestCase]] = {}
    for case in cases:
        by_service.setdefault(case.service, []).append(case)
    for service, group in sorted(by_service.items()):
        element = ET.SubElement(
            root,
            "testsuite",
            name=f"tempest.{service}",
            tests=str(len(group)),
            failures=str(sum(c.status == FAILED for c in group)),
            errors="0",
            skipped=str(sum(c.status == SKIPPED for c in group)),
            time=f"{sum(c.seconds for c in group):.3f}",
        )
        for case in group:
            node = ET.SubElement(element, "testcase", classname=case.classname,
                                 name=case.method, time=f"{case.seconds:.3f}")  # fmt: skip
            if case.status == FAILED:
                failure = ET.SubElement(node, "failure", message=case.reason[:500],
                                        type="TempestFailure")  # fmt: skip
                failure.text = case.details
            elif case.status == SKIPPED:
                ET.SubElement(node, "skipped", message=case.reason[:500])
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode")
