"""``labbuilder verify``: Tempest against a lab that is up. Reads what Tempest needs of the
cloud on the controller, writes a workspace under the lab's state (``verify/<time>/``, the
``tempest.conf`` in it mode 0600: it holds the admin password), leaves the recipe's expected
skips out of the run, runs Debian's Tempest on this host where the lab's nodes are, and writes
the reports beside the install's: ``reports/verify-<time>.xml`` (JUnit, a case per test) and
``.json`` (a summary per service, the skips with their reasons), ``verify-latest.*`` pointing
at them; the failing tests' tracebacks go to ``logs/verify.log``."""

from __future__ import annotations

import json
import re
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labbuilder.adapters import tempest
from labbuilder.api.install import connect_node
from labbuilder.common.errors import GuestCommandError, UsageError
from labbuilder.install.guest import CLOUD_FACTS_SOURCE
from labbuilder.install.report import point_at
from labbuilder.lab.view import plan_from_dict
from labbuilder.lifecycle.state import (
    ensure_private_dir,
    lab_lock,
    lab_state,
    load_secrets,
    load_state_record,
    write_state_file,
)
from labbuilder.model.lab import Lab, Plan, Role
from labbuilder.recipe.files import load_recipe
from labbuilder.recipe.render import WARM_PYTHON_PATH
from labbuilder.verify import results
from labbuilder.verify.config import CloudFacts, Target, cloud_skips, tempest_conf
from labbuilder.verify.spec import ExpectedSkip, VerifySpec, load_verify_spec

FACTS_TIMEOUT = 600.0
ADMIN_ENV = "/root/admin-openrc"
PUBLIC_NETWORK = "ext-net"  # the guide's external network (initial networks, L3560)


@dataclass
class VerifyResult:
    lab: str
    suite: str
    seconds: float
    cases: list[results.TestCase]
    junit: Path
    report: Path
    exit_code: int  # Tempest's
    ssh_validation: str  # why it is off ("" when on)
    summary: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def failed(self) -> list[results.TestCase]:
        return [case for case in self.cases if case.status == results.FAILED]

    @property
    def passed(self) -> bool:
        return results.passed(self.cases, self.exit_code)


def check_tempest(spec: VerifySpec) -> str:
    """The host's Tempest version; a ``UsageError`` (exit 2: the host is not ready) when it is
    missing or not the one the recipe is verified with."""
    version = tempest.installed_version()
    if version is None:
        raise UsageError(
            "Tempest is not installed on this host",
            "apt-get install tempest (Debian 12 packages Tempest 33.0.0), or scripts/setup-host",
        )
    if version != spec.tempest:
        raise UsageError(
            f"recipe {spec.recipe} is verified with Tempest {spec.tempest}, this host has {version}"
            + (f" ({spec.why_version})" if spec.why_version else ""),
            f"install Tempest {spec.tempest}",
        )
    return version


def cloud_facts(
    plan: Plan, record: dict[str, Any], lab: Lab, settings: dict[str, Any]
) -> CloudFacts:
    """Read on the controller what Tempest's configuration needs of the cloud."""
    controller = next((n for n in plan.nodes if n.role == Role.CONTROLLER), None)
    if controller is None:
        raise UsageError(f"lab {lab.name} has no controller", "verify a lab with a controller")
    args = (
        " ".join(shlex.quote(str(settings[key])) for key in ("test_image", "test_flavor"))
        + " "
        + shlex.quote(PUBLIC_NETWORK)
    )
    script = (
        f". {ADMIN_ENV}\n"
        f"if [ -f {WARM_PYTHON_PATH} ]; then py='python3 {WARM_PYTHON_PATH}'; else py=python3; fi\n"
        f"$py - {args} <<'LABBUILDER_FACTS'\n{CLOUD_FACTS_SOURCE.read_text()}\nLABBUILDER_FACTS\n"
    )
    state = lab_state(lab.name)
    session = connect_node(plan, record, state, controller.name)
    try:
        result = session.run_script(script, timeout=FACTS_TIMEOUT)
    finally:
        session.close()
    line = next((text for text in reversed(result.stdout.splitlines()) if text.startswith("{")), "")
    if result.rc != 0 or not line:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-5:])
        raise GuestCommandError(
            f"could not read the cloud's image, flavor and external network on "
            f"{controller.name} (exit {result.rc}): {tail}",
            "install the lab through the image and initial networks stages first "
            "(labbuilder install --until initial-networks)",
        )
    data = json.loads(line)
    services = set(data["services"])
    missing = [
        what
        for what, service, key in (
            (f"test image {settings['test_image']}", "image", "image_id"),
            (f"flavor {settings['test_flavor']}", "compute", "flavor_id"),
            (f"external network {PUBLIC_NETWORK}", "network", "public_network_id"),
        )
        if service in services and not data[key]
    ]
    if missing:
        raise UsageError(
            f"lab {lab.name}'s cloud has no {', no '.join(missing)}: Tempest needs them",
            "install the lab on through stage launch-instance (labbuilder install)",
        )
    return CloudFacts(
        image_id=data["image_id"],
        flavor_id=data["flavor_id"],
        public_network_id=data["public_network_id"],
        public_network_name=data["public_network_name"],
        services=frozenset(data["services"]),
        compute_hosts=int(data["compute_hosts"]),
        dashboard=bool(data["dashboard"]),
        volume_backend=str(data["volume_backend"]),
        network_extensions=tuple(data.get("network_extensions", ())),
        volume_backup=bool(data.get("volume_backup", False)),
        object_apis=tuple(data.get("object_apis", ())),
    )


def expected_skips(
    tests: Sequence[str], skips: Sequence[ExpectedSkip]
) -> list[tuple[str, ExpectedSkip]]:
    """Each listed test an expected skip matches, with the first skip that matches it."""
    found = []
    for test in tests:
        skip = next((s for s in skips if re.search(s.test, test)), None)
        if skip is not None:
            found.append((test, skip))
    return found


def verify(
    lab: Lab,
    suites: Sequence[str],
    *,
    concurrency: int | None = None,
    timeout: float | None = None,
    on_line: Callable[[str], None] | None = None,
) -> VerifyResult:
    state = lab_state(lab.name)
    record = load_state_record(state)
    if record is None:
        raise UsageError(
            f"lab {lab.name} is not up on this host", "bring it up and install it first"
        )
    plan = plan_from_dict(record["plan"])
    recipe = load_recipe(lab.recipe)
    spec = load_verify_spec(Path(recipe.directory), recipe.name)
    check_tempest(spec)
    secrets = load_secrets(state)
    if "ADMIN_PASS" not in secrets:
        raise UsageError(
            f"lab {lab.name} has no admin password yet", "install it first (labbuilder install)"
        )
    suite_names = list(suites) or ["smoke"]
    regexes = [spec.suite_regex(suite) for suite in suite_names]
    for regex in regexes:
        try:
            re.compile(regex)
        except re.error as err:
            raise UsageError(f"--suite {regex!r} is not a regular expression: {err}") from None
    with lab_lock(state, "labbuilder verify"):
        facts = cloud_facts(plan, record, lab, dict(recipe.settings))
        stamp = time.strftime("%Y%m%dT%H%M%S")
        workspace = state.directory / "verify" / stamp
        ensure_private_dir(workspace / "etc")
        ensure_private_dir(workspace / "logs")
        target = Target(
            auth_url="http://controller:5000/v3",
            region=str(dict(recipe.settings).get("region", "RegionOne")),
            admin_user="admin",
            admin_password=secrets["ADMIN_PASS"],
            dashboard_url="http://controller/horizon/",
        )
        write_state_file(
            workspace / "etc" / "tempest.conf", tempest_conf(spec, target, facts, str(workspace))
        )
        hosts = "127.0.0.1 localhost\n" + "".join(f"{a} {n}\n" for a, n in plan.hosts)
        write_state_file(workspace / "etc" / "hosts", hosts)
        (workspace / "etc" / "hosts").chmod(0o644)  # read by Tempest's resolver as /etc/hosts
        tempest.init(workspace)
        listed = tempest.list_tests(workspace, regexes, workspace / "etc" / "hosts")
        if not listed:
            raise UsageError(
                f"--suite {' '.join(suite_names)} selects no Tempest test",
                "give smoke, full or a regular expression over test ids (tempest.api.identity)",
            )
        skipped = expected_skips(listed, (*spec.skips, *cloud_skips(facts)))
        exclude = None
        if skipped:
            exclude = workspace / "etc" / "expected-skips.txt"
            write_state_file(exclude, "".join(f"^{re.escape(test)}$\n" for test, _ in skipped))
        namespace = plan.gateway.namespace if plan.gateway else None
        begin = time.monotonic()

        def reports(code: int) -> tuple[list[results.TestCase], Path, Path]:
            found = results.with_expected_skips(
                results.read_subunit(tempest.last_stream(workspace)), skipped
            )
            seconds = time.monotonic() - begin
            junit, report = _write_reports(
                state.directory, lab.name, " ".join(suite_names), seconds, found, spec, code, stamp
            )
            return found, junit, report

        code = 0  # every test selected is an expected skip: nothing runs (Tempest fails on that)
        try:
            if len(skipped) < len(listed):
                code = tempest.run(
                    workspace,
                    regexes=regexes,
                    exclude_list=exclude,
                    concurrency=concurrency or spec.concurrency,
                    namespace=namespace,
                    hosts=workspace / "etc" / "hosts",
                    on_line=on_line,
                    timeout=timeout,
                )
        except BaseException as err:  # Ctrl-C, a timeout: the tests that ended are reported
            try:
                _, junit, report = reports(-1)
                err.add_note(f"reports of the tests that ended: {junit} {report}")
            except Exception as failed:  # noqa: BLE001 - the first error is the one to show
                err.add_note(f"writing the reports failed too: {failed}")
            raise
        seconds = time.monotonic() - begin
        cases, junit, report = reports(code)
        return VerifyResult(
            lab=lab.name,
            suite=" ".join(suite_names),
            seconds=seconds,
            cases=cases,
            junit=junit,
            report=report,
            exit_code=code,
            ssh_validation=spec.ssh_validation,
            summary=results.summary(cases),
        )


def _write_reports(
    directory: Path,
    lab: str,
    suite: str,
    seconds: float,
    cases: list[results.TestCase],
    spec: VerifySpec,
    code: int,
    stamp: str,
) -> tuple[Path, Path]:
    reports = directory / "reports"
    junit = reports / f"verify-{stamp}.xml"
    report = reports / f"verify-{stamp}.json"
    write_state_file(junit, results.junit_xml(cases, lab=lab, suite=suite, seconds=seconds))
    failed = [case for case in cases if case.status == results.FAILED]
    data = {
        "lab": lab,
        "suite": suite,
        "tempest": spec.tempest,
        "seconds": round(seconds, 1),
        "result": "passed" if results.passed(cases, code) else "failed",
        "tempest_exit_code": code,
        "ssh_validation": spec.ssh_validation or "on",
        "summary": results.summary(cases),
        "skips": results.skip_reasons(cases),
        "failures": [{"test": c.name, "reason": c.reason} for c in failed],
        "tests": [
            {"test": c.name, "status": c.status, "seconds": round(c.seconds, 2), "reason": c.reason}
            for c in cases
        ],
    }
    write_state_file(report, json.dumps(data, indent=1))
    point_at(reports / "verify-latest.xml", junit)
    point_at(reports / "verify-latest.json", report)
    log = "".join(f"==== {c.name}: FAILED\n{c.details}\n" for c in failed)
    write_state_file(
        directory / "logs" / "verify.log",
        f"labbuilder verify {lab} ({suite}): {len(failed)} failed\n{log}",
    )
    return junit, report
