"""The install engine with a fake transport: ordering, run-once markers, retries, checks,
failure reports, redaction, fetch, and the reports.

The transport is faked here on purpose (the engine's logic is what is tested, fast and
deterministically); the real transport over SSH into real guests is tested in
tests/test_install_e2e.py.
"""

from __future__ import annotations

import json
import re
import secrets
import shlex
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from localssh import LocalSession

from labbuilder.adapters.ssh import CommandResult, ConnectionLostError
from labbuilder.api import facade as api
from labbuilder.api import install as installer
from labbuilder.common.errors import GuestCommandError, RecipeError
from labbuilder.install.engine import (
    Engine,
    Redactor,
    Status,
    install_helpers,
    look_script,
    parse_look,
)
from labbuilder.install.guest import WARM_PYTHON_SOURCE
from labbuilder.install.report import (
    RunInfo,
    compare,
    failure_report,
    junit_xml,
    load_history,
    report_dict,
    save_history,
    write_reports,
)
from labbuilder.recipe.files import load_recipe
from labbuilder.recipe.model import ApiPath, RenderedCheck, RenderedStage, RenderedStep
from labbuilder.recipe.render import (
    GUARD_SENTINEL,
    MARKER_DIR,
    WARM_PYTHON_PATH,
    RenderOptions,
    api_python,
    applicable_stages,
    placeholder_secrets,
    render_stages,
    select_stages,
)

Rule = Callable[[str], CommandResult | None]


def answer_markers(script: str, markers: dict[str, str]) -> CommandResult | None:
    """The engine's run-once marker scripts answered as a guest would, from ``markers``
    (reading them, or writing one); None for any other script."""
    if script.startswith(f"mkdir -p {MARKER_DIR}\nfor f in"):
        listing = "".join(f"{k} {v}\n" for k, v in markers.items())
        return CommandResult("markers", 0, listing, "")
    written = re.search(rf"printf '%s\\n' (\S+) > {MARKER_DIR}/(\S+)", script)
    if written:
        markers[written.group(2)] = written.group(1)
        return CommandResult("marker", 0, "", "")
    return None


class FakeNode:
    """One node: keeps run-once markers like the guest would, answers scripts by rules."""

    def __init__(self, name: str, log: list[tuple[str, str, float]]) -> None:
        self.name = name
        self.markers: dict[str, str] = {}
        self.rules: list[Rule] = []
        self.log = log
        self.lock = threading.Lock()

    def run_script(
        self,
        script: str,
        *,
        timeout: float = 0,
        on_output: Callable[[str], None] | None = None,
        interpreter: str = "bash",
    ) -> CommandResult:
        marker = answer_markers(script, self.markers)
        if marker is not None:
            return marker
        look = re.search(r"@@labbuilder-check-([0-9a-f]+) end", script)
        if look is not None:  # the board's look at the node, one script: each check answered
            with self.lock:  # as on its own, where its step's marker matches
                self.log.append((self.name, script, time.monotonic()))
            mark = f"@@labbuilder-check-{look.group(1)}"
            out = f"\n{mark} markers\n" + "".join(f"{k} {v}\n" for k, v in self.markers.items())
            quoted = r"'(?:[^']|'\"'\"')*'"  # as shlex.quote writes it, over lines
            guard = re.compile(
                rf"^v=; {{ read -r v < {MARKER_DIR}/(\S+); }} 2>/dev/null; if \[ \"\$v\" = (\S+) \]"
            )
            body = re.compile(rf"^  printf '%s' ({quoted}) > \"\$d/\d+\"$", re.M)
            index, done = 0, False
            for part in re.split(r"(?m)^(?=v=; )", script):
                guarded = guard.match(part)
                if guarded is not None:
                    name, digest = guarded.group(1), shlex.split(guarded.group(2))[0]
                    done = self.markers.get(name) == digest
                for found in body.findall(part):
                    if done:
                        answer = self.run_script(shlex.split(found)[0])
                        out += (
                            f"\n{mark} {index} {answer.rc}\n{answer.stdout}\n{mark} {index} err\n"
                        )
                        out += answer.stderr
                    else:
                        out += f"\n{mark} {index} skip\n{mark} {index} err\n"
                    index += 1
            return CommandResult(interpreter, 0, out + f"\n{mark} end\n", "")
        with self.lock:
            self.log.append((self.name, script, time.monotonic()))
        for rule in self.rules:
            result = rule(script)
            if result is not None:
                if on_output:
                    for line in result.stdout.splitlines():
                        on_output(line)
                return result
        # By default a script succeeds and prints what its `echo` lines say.
        echoed = "".join(
            line[5:] + "\n" for line in script.splitlines() if line.startswith("echo ")
        )
        if on_output:
            for line in echoed.splitlines():
                on_output(line)
        return CommandResult(interpreter, 0, echoed, "")


def ok(stdout: str = "") -> CommandResult:
    return CommandResult("bash -s", 0, stdout, "")


def failed(rc: int, stdout: str = "", stderr: str = "") -> CommandResult:
    return CommandResult("bash -s", rc, stdout, stderr)


def write_recipe(base: Path, stages: dict[str, str], top: str = "") -> Path:
    folder = base / "recipe"
    (folder / "stages").mkdir(parents=True)
    (folder / "templates").mkdir()
    (folder / "recipe.toml").write_text(
        'name = "test-recipe"\ndescription = "a recipe for tests"\nguide = "the guide"\n'
        '[secrets]\nSECRET_PASS = "a password"\n' + top
    )
    for name, text in stages.items():
        (folder / "stages" / f"{name}.toml").write_text(text)
    return folder


STAGES = {
    "10-first": """
name = "first"
guide = "Ch.1"
[[steps]]
name = "db"
roles = ["controller"]
guide = "L10-20"
run = "echo database {{ secrets.SECRET_PASS }}"
[[steps.checks]]
name = "db answers"
run = "echo up"
expect = "up"
[[steps]]
name = "agent"
roles = ["compute"]
after = ["db"]
run = "echo agent on {{ node.name }} at {{ node.address }}"
[[steps]]
name = "everywhere"
roles = ["all"]
run = "echo hello from {{ node.name }}"
[[steps]]
name = "online"
roles = ["controller"]
internet = true
run = "ping -c 4 openstack.org"
""",
    "20-second": """
name = "second"
guide = "Ch.2"
[[steps]]
name = "objects"
roles = ["controller"]
guide = "L30"
run = "openstack project create demo"
api = [{ kind = "project", name = "demo" }, { kind = "user", name = "demo", password = "{{ secrets.SECRET_PASS }}" }]
[[steps.checks]]
name = "projects"
run = "openstack project list"
fast_run = "{{ api_python }} list-projects"
expect = "demo"
[[steps]]
name = "more-objects"
roles = ["controller"]
run = "openstack role create member"
files = [{ path = "/root/roles.yaml", content = "member\\n" }]
api = [{ kind = "role", name = "member" }]
[[steps]]
name = "config"
roles = ["controller"]
files = [{ path = "/etc/demo.conf", content = "password = {{ secrets.SECRET_PASS }}\\n", mode = "0640", owner = "root:root" }]
""",
}

SECRET = "s3cr3t-value-42"


def plan_for(name: str = "guide-3node") -> object:
    return api.plan_lab(api.load_lab(None, name), host_check=False).plan


def render(
    folder: Path, path: ApiPath = ApiPath.FAST, internet: bool = False
) -> tuple[RenderedStage, ...]:
    recipe = load_recipe(str(folder))
    plan = plan_for()
    stages = applicable_stages(recipe, plan)  # type: ignore[arg-type]
    options = RenderOptions(
        secrets={"SECRET_PASS": SECRET},
        internet=internet,
        path=path,
        guest_api_source="print('guest api')\n",
    )
    return render_stages(recipe, plan, stages, options)  # type: ignore[arg-type]


@pytest.fixture
def lab_nodes() -> tuple[dict[str, FakeNode], list[tuple[str, str, float]]]:
    log: list[tuple[str, str, float]] = []
    nodes = {name: FakeNode(name, log) for name in ("controller", "network", "compute1")}
    nodes["controller"].rules.append(
        lambda s: ok("admin\ndemo\n") if "list-projects" in s or "project list" in s else None
    )
    return nodes, log


def engine_for(nodes: dict[str, FakeNode], tmp_path: Path, **kwargs: object) -> Engine:
    return Engine(
        nodes,
        redact=Redactor([SECRET]),
        log_dir=tmp_path / "logs",
        check_interval=0.01,
        retry_delays=(0.01,),
        **kwargs,  # type: ignore[arg-type]
    )


def test_steps_run_per_role_in_order_and_after_waits_for_other_nodes(
    tmp_path: Path, lab_nodes: tuple[dict[str, FakeNode], list[tuple[str, str, float]]]
) -> None:
    nodes, log = lab_nodes
    finished: dict[str, float] = {}

    def slow_db(script: str) -> CommandResult | None:
        if "echo database" in script:
            time.sleep(0.3)
            finished["db"] = time.monotonic()
            return ok("db done\n")
        return None

    nodes["controller"].rules.append(slow_db)
    stages = render(write_recipe(tmp_path, STAGES))
    outcome = engine_for(nodes, tmp_path).run(stages)
    first = outcome[0]
    statuses = {(s.node, s.step): s.status for s in first.steps}
    assert statuses[("controller", "db")] == Status.OK
    assert statuses[("compute1", "agent")] == Status.OK
    assert ("network", "agent") not in statuses  # compute role only
    assert statuses[("network", "everywhere")] == Status.OK
    assert statuses[("controller", "online")] == Status.SKIPPED
    db_done = finished["db"]
    agent = next(t for n, s, t in log if n == "compute1" and "echo agent" in s)
    assert agent >= db_done  # waited for the controller's step
    network_first = next(t for n, s, t in log if n == "network" and "hello" in s)
    assert network_first < db_done  # the network node did not wait: it has no `after`
    assert "echo agent on compute1 at 10.0.0.31" in next(
        s for n, s, _ in log if n == "compute1" and "echo agent" in s
    )


def test_rerun_is_a_noop_and_a_changed_step_runs_again(
    tmp_path: Path, lab_nodes: tuple[dict[str, FakeNode], list[tuple[str, str, float]]]
) -> None:
    nodes, log = lab_nodes
    folder = write_recipe(tmp_path, STAGES)
    engine_for(nodes, tmp_path).run(render(folder))
    ran_first = len(log)
    assert ran_first > 0
    second = engine_for(nodes, tmp_path).run(render(folder))
    assert len(log) == ran_first  # nothing ran
    statuses = {s.status for stage in second for s in stage.steps}
    assert statuses == {Status.DONE_BEFORE, Status.SKIPPED}

    stage_file = folder / "stages" / "10-first.toml"
    stage_file.write_text(stage_file.read_text().replace("echo hello from", "echo hi from"))
    third = engine_for(nodes, tmp_path).run(render(folder))
    rerun = [(s.node, s.step) for stage in third for s in stage.steps if s.status == Status.OK]
    assert sorted(rerun) == [
        ("compute1", "everywhere"),
        ("controller", "everywhere"),
        ("network", "everywhere"),
    ]
    forced = engine_for(nodes, tmp_path, force=True).run(render(folder))
    assert any(s.status == Status.OK and s.step == "db" for s in forced[0].steps)


def test_a_recheck_runs_the_checks_of_steps_done_before_and_fails_on_a_broken_one(
    tmp_path: Path, lab_nodes: tuple[dict[str, FakeNode], list[tuple[str, str, float]]]
) -> None:
    nodes, log = lab_nodes
    folder = write_recipe(tmp_path, STAGES)
    engine_for(nodes, tmp_path).run(render(folder))
    ran_first = len(log)
    again = engine_for(nodes, tmp_path, recheck=True).run(render(folder))
    objects = next(s for s in again[1].steps if s.step.startswith("objects"))
    assert objects.status == Status.DONE_BEFORE
    assert [c.passed for c in objects.checks] == [True]
    rechecks = log[ran_first:]
    assert any("list-projects" in script for _, script, _ in rechecks), rechecks
    assert not any("echo database" in script or "hello from" in script for _, script, _ in rechecks)
    # every check at once: one look script per node, nothing checked one by one
    looks = sorted(node for node, script, _ in rechecks if "@@labbuilder-check-" in script)
    assert looks == sorted(nodes)
    # (the fake logs each check the look runs): each check ran once, in the look
    checks = [s for _, s, _ in rechecks if s.startswith("set -eo pipefail\n")]
    assert checks and len(checks) == len(set(checks)), checks

    # A check that fails at the first try is tried again, one by one, until it passes.
    tries: list[str] = []

    def slow_service(script: str) -> CommandResult | None:
        if "list-projects" not in script:
            return None
        tries.append(script)
        return ok("admin\n") if len(tries) == 1 else None

    nodes["controller"].rules.insert(0, slow_service)
    late = engine_for(nodes, tmp_path, recheck=True).run(render(folder))
    objects = next(s for s in late[1].steps if s.step.startswith("objects"))
    assert objects.status == Status.DONE_BEFORE and len(tries) == 2, tries  # look, retry
    nodes["controller"].rules.remove(slow_service)

    # The service is gone now: the step done before fails, naming its check.
    nodes["controller"].rules.insert(0, lambda s: ok("admin\n") if "list-projects" in s else None)
    broken = engine_for(nodes, tmp_path, recheck=True).run(render(folder))
    objects = next(s for s in broken[1].steps if s.step.startswith("objects"))
    assert objects.status == Status.FAILED
    assert objects.failed_check == "projects"
    assert "fails now" in objects.reason


def test_a_check_of_a_lab_runs_no_step_and_looks_at_every_stage(
    tmp_path: Path, lab_nodes: tuple[dict[str, FakeNode], list[tuple[str, str, float]]]
) -> None:
    nodes, log = lab_nodes
    folder = write_recipe(tmp_path, STAGES)
    stages = render(folder)
    fresh = engine_for(nodes, tmp_path).check(stages)
    assert not log  # nothing ran: no step done yet, so no check either
    assert {s.status for stage in fresh for s in stage.steps} == {Status.NOT_RUN, Status.SKIPPED}
    assert {s.reason for stage in fresh for s in stage.steps if s.status == Status.NOT_RUN} == {
        "not done"
    }

    engine_for(nodes, tmp_path).run(stages)
    ran = len(log)
    nodes["controller"].rules.insert(0, lambda s: ok("admin\n") if "list-projects" in s else None)
    looked = engine_for(nodes, tmp_path).check(stages)
    scripts = [script for _, script, _ in log[ran:]]
    assert not any("echo database" in s or "hello from" in s for s in scripts)  # no step ran
    first, second = looked
    assert not first.failed  # the first stage's checks pass...
    objects = next(s for s in second.steps if s.step.startswith("objects"))
    assert objects.status == Status.FAILED and objects.failed_check == "projects"
    # ...and a failed check does not keep the rest of the stage from being looked at
    assert {s.status for s in second.steps if s is not objects} <= {
        Status.DONE_BEFORE,
        Status.SKIPPED,
    }

    # A check with a timeout is tried again until then, as `install` does; with once=True
    # (the board's look at a lab) once.
    waiting = [
        replace(stage, steps=tuple(
            replace(step, checks=tuple(replace(c, timeout=1.0) for c in step.checks))
            for step in stage.steps
        ))
        for stage in stages
    ]  # fmt: skip
    for once, tries in ((False, lambda n: n > 1), (True, lambda n: n == 1)):
        before = len(log)
        found = engine_for(nodes, tmp_path).check(waiting, once=once)
        objects = next(s for s in found[1].steps if s.step.startswith("objects"))
        assert objects.status == Status.FAILED and tries(objects.checks[0].attempts), once
        assert objects.failed_check == "projects" and "fails now" in objects.reason
        assert {s.status for s in found[0].steps} <= {Status.DONE_BEFORE, Status.SKIPPED}
    # once: one script per node, its markers and every check in it (the fake answers each
    # check on its own, logged after it), not a login's worth of round trips per check or
    # a script for the helpers and another for the markers
    looks = [node for node, script, _ in log[before:] if "@@labbuilder-check-" in script]
    assert sorted(looks) == sorted({node for stage in waiting for node in stage.nodes})
    others = [script for _, script, _ in log[before:] if "@@labbuilder-check-" not in script]
    assert others and all(script.startswith("set -eo pipefail\n") for script in others)


def test_failure_stops_the_run_and_reports_where_and_how_to_resume(
    tmp_path: Path, lab_nodes: tuple[dict[str, FakeNode], list[tuple[str, str, float]]]
) -> None:
    nodes, log = lab_nodes
    nodes["controller"].rules.append(
        lambda s: (
            failed(3, f"connecting with {SECRET}\nERROR 1045 access denied\n")
            if "echo database" in s
            else None
        )
    )
    stages = render(write_recipe(tmp_path, STAGES))
    outcome = engine_for(nodes, tmp_path).run(stages)
    db = next(s for s in outcome[0].steps if s.step == "db")
    assert db.status == Status.FAILED and db.rc == 3 and db.attempts == 1
    agent = next(s for s in outcome[0].steps if s.step == "agent")
    assert agent.status == Status.NOT_RUN  # it waited for db, which failed
    assert all(s.status == Status.NOT_RUN for s in outcome[1].steps)
    assert not any("echo agent" in s for _, s, _ in log)
    info = RunInfo(
        "lab1", "test-recipe", "abc", "fast", time.time(), 1.0, {}, "labbuilder install --lab lab1"
    )
    report = failure_report(outcome, info)
    assert report is not None
    assert "stage first, step db, node controller" in report
    assert "exit code: 3" in report
    assert "ERROR 1045 access denied" in report
    assert "guide:     L10-20" in report
    assert "resume with: labbuilder install --lab lab1 --from first" in report
    assert "echo database ********" in report  # the command, secret redacted
    assert SECRET not in report
    logged = (tmp_path / "logs" / "first" / "controller.log").read_text()
    assert "ERROR 1045" in logged and SECRET not in logged and "********" in logged


def test_transient_apt_failures_are_retried(
    tmp_path: Path, lab_nodes: tuple[dict[str, FakeNode], list[tuple[str, str, float]]]
) -> None:
    nodes, _ = lab_nodes
    calls = {"n": 0}

    def flaky(script: str) -> CommandResult | None:
        if "hello from" not in script:
            return None
        calls["n"] += 1
        if calls["n"] == 1:
            return failed(100, "", "E: Could not get lock /var/lib/dpkg/lock-frontend")
        return ok()

    nodes["network"].rules.append(flaky)
    outcome = engine_for(nodes, tmp_path).run(render(write_recipe(tmp_path, STAGES)))
    step = next(s for s in outcome[0].steps if s.node == "network" and s.step == "everywhere")
    assert step.status == Status.OK and step.attempts == 2


def test_a_hard_failure_is_not_retried(
    tmp_path: Path, lab_nodes: tuple[dict[str, FakeNode], list[tuple[str, str, float]]]
) -> None:
    nodes, _ = lab_nodes
    nodes["network"].rules.append(
        lambda s: failed(1, "", "E: Unable to locate package nosuch") if "hello" in s else None
    )
    outcome = engine_for(nodes, tmp_path).run(render(write_recipe(tmp_path, STAGES)))
    step = next(s for s in outcome[0].steps if s.node == "network" and s.step == "everywhere")
    assert step.status == Status.FAILED and step.attempts == 1


def test_checks_retry_until_they_match_and_fail_with_the_expectation(
    tmp_path: Path, lab_nodes: tuple[dict[str, FakeNode], list[tuple[str, str, float]]]
) -> None:
    stages_text = dict(STAGES)
    stages_text["10-first"] = stages_text["10-first"].replace(
        'expect = "up"', 'expect = "up"\ntimeout = 5'
    )
    nodes, _ = lab_nodes
    answers = iter(["starting\n", "starting\n", "up\n"])
    nodes["controller"].rules.append(lambda s: ok(next(answers)) if "echo up" in s else None)
    outcome = engine_for(nodes, tmp_path).run(render(write_recipe(tmp_path, stages_text)))
    db = next(s for s in outcome[0].steps if s.step == "db")
    assert db.status == Status.OK
    assert db.checks[0].passed and db.checks[0].attempts == 3

    nodes2, _ = lab_nodes[0], None
    for node in nodes2.values():
        node.markers.clear()
        node.rules.insert(0, lambda s: ok("down\n") if "echo up" in s else None)
    outcome = engine_for(nodes2, tmp_path).run(render(write_recipe(tmp_path / "b", STAGES)))
    db = next(s for s in outcome[0].steps if s.step == "db")
    assert db.status == Status.FAILED and db.failed_check == "db answers"
    assert "db" not in {k.split(".")[-1] for k in nodes2["controller"].markers}
    info = RunInfo("lab1", "r", "d", "fast", time.time(), 1.0, {}, "labbuilder install")
    report = failure_report(outcome, info)
    assert report is not None and "expected:  output matching /up/" in report


def test_a_guard_that_finds_the_work_done_is_reported(
    tmp_path: Path, lab_nodes: tuple[dict[str, FakeNode], list[tuple[str, str, float]]]
) -> None:
    nodes, _ = lab_nodes
    nodes["network"].rules.append(lambda s: ok(GUARD_SENTINEL + "\n") if "hello" in s else None)
    outcome = engine_for(nodes, tmp_path).run(render(write_recipe(tmp_path, STAGES)))
    step = next(s for s in outcome[0].steps if s.node == "network" and s.step == "everywhere")
    assert step.status == Status.GUARDED
    assert "everywhere" in "".join(nodes["network"].markers)


def test_fast_path_merges_api_steps_into_one_process_and_faithful_keeps_commands(
    tmp_path: Path,
) -> None:
    folder = write_recipe(tmp_path, STAGES)
    fast = render(folder, ApiPath.FAST)[1]
    names = [s.step for s in fast.for_node("controller")]
    assert names == ["objects..more-objects", "config"]
    merged = fast.for_node("controller")[0]
    assert merged.path == ApiPath.FAST and merged.step_names == ("objects", "more-objects")
    # Run by the warm Python the engine puts on every node (imports done once per node).
    warm = "python3 /usr/local/lib/labbuilder/warmpython.py"
    assert f"{warm} /usr/local/lib/labbuilder/guestapi.py <<" in merged.script
    payload = merged.script.split("guestapi.py <<'LABBUILDER_EOF'\n")[1].split("\nLABBUILDER_EOF")[
        0
    ]
    kinds = [op["kind"] for op in json.loads(payload)["operations"]]
    assert kinds == ["project", "user", "role"]
    assert "openstack project create" not in merged.script
    assert [c.command for c in merged.checks] == [f"{warm} list-projects"]
    # An API step's files (a template an API object reads) are written before the process runs.
    assert "/root/roles.yaml" in merged.script.split("guestapi.py <<")[0]

    faithful = render(folder, ApiPath.FAITHFUL)[1]
    names = [s.step for s in faithful.for_node("controller")]
    assert names == ["objects", "more-objects", "config"]
    objects = faithful.for_node("controller")[0]
    assert "openstack project create demo" in objects.script
    assert objects.path == ApiPath.FAITHFUL
    assert [c.command for c in objects.checks] == ["openstack project list"]
    assert api_python(ApiPath.FAITHFUL) == "python3"  # the guide's way: no helper


class LocalShell:
    """A node that is this host: scripts run in a real bash (for what the engine writes)."""

    def run_script(
        self,
        script: str,
        *,
        timeout: float = 60,
        on_output: Callable[[str], None] | None = None,
        interpreter: str = "bash",
    ) -> CommandResult:
        done = subprocess.run(
            [interpreter, "-s"], input=script, capture_output=True, text=True, timeout=timeout,
            check=False,
        )  # fmt: skip
        return CommandResult(interpreter, done.returncode, done.stdout, done.stderr)


def test_helpers_are_written_executable_and_replaced(tmp_path: Path) -> None:
    target = tmp_path / "node" / "usr local" / "helper.py"
    install_helpers(LocalShell(), {str(target): "print('one')"})
    assert target.read_text() == "print('one')\n"
    assert target.stat().st_mode & 0o777 == 0o755
    install_helpers(LocalShell(), {str(target): "print('two')\n"})
    assert target.read_text() == "print('two')\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["helper.py"]  # no .new left
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(GuestCommandError, match="putting labbuilder's helpers on the node failed"):
        install_helpers(LocalShell(), {str(blocked / "helper.py"): "x"})


def test_the_engine_puts_its_helpers_on_every_node_before_any_step(
    tmp_path: Path, lab_nodes: tuple[dict[str, FakeNode], list[tuple[str, str, float]]]
) -> None:
    nodes, log = lab_nodes
    helpers = {"/usr/local/lib/labbuilder/warmpython.py": "print('warm')\n"}
    engine_for(nodes, tmp_path, helpers=helpers).run(render(write_recipe(tmp_path, STAGES)))
    for name in nodes:
        scripts = [script for node, script, _ in log if node == name]
        assert "<<'LABBUILDER_HELPER_EOF'\nprint('warm')\nLABBUILDER_HELPER_EOF\n" in scripts[0]
        assert not any("LABBUILDER_HELPER_EOF" in script for script in scripts[1:])
    assert installer.guest_helpers(ApiPath.FAST) == {
        WARM_PYTHON_PATH: WARM_PYTHON_SOURCE.read_text()
    }
    assert installer.guest_helpers(ApiPath.FAITHFUL) == {}


def test_files_are_written_with_mode_and_owner_and_secrets_substituted(tmp_path: Path) -> None:
    config = next(s for s in render(write_recipe(tmp_path, STAGES))[1].steps if s.step == "config")
    assert f"password = {SECRET}" in config.script
    assert "install -m 0640 -o root -g root /etc/demo.conf.labbuilder-new /etc/demo.conf" in (
        config.script
    )


def test_internet_steps_run_when_the_lab_allows_them(tmp_path: Path) -> None:
    online = [s for s in render(write_recipe(tmp_path, STAGES), internet=True)[0].steps]
    assert next(s for s in online if s.step == "online").skipped_reason is None


def test_fetch_copies_a_file_from_another_node(
    tmp_path: Path, lab_nodes: tuple[dict[str, FakeNode], list[tuple[str, str, float]]]
) -> None:
    stages = {
        "10-rings": """
name = "rings"
[[steps]]
name = "build"
roles = ["controller"]
run = "make-ring"
[[steps]]
name = "install"
roles = ["compute"]
after = ["build"]
fetch = [{ path = "/etc/swift/object.ring.gz", from = "controller", owner = "root:root" }]
run = "use-ring"
"""
    }
    nodes, log = lab_nodes
    nodes["controller"].rules.append(
        lambda s: (
            ok("cmluZyBkYXRh\n") if s.startswith("base64 -w0 /etc/swift/object.ring.gz") else None
        )
    )
    outcome = engine_for(nodes, tmp_path).run(render(write_recipe(tmp_path, stages)))
    assert all(s.status == Status.OK for s in outcome[0].steps)
    script = next(s for n, s, _ in log if n == "compute1" and "use-ring" in s)
    assert "echo cmluZyBkYXRh | base64 -d > /etc/swift/object.ring.gz.labbuilder-new" in script
    assert script.index("base64 -d") < script.index("use-ring")


def test_junit_and_json_reports_list_every_step_and_check(
    tmp_path: Path, lab_nodes: tuple[dict[str, FakeNode], list[tuple[str, str, float]]]
) -> None:
    nodes, _ = lab_nodes
    outcome = engine_for(nodes, tmp_path).run(render(write_recipe(tmp_path, STAGES)))
    info = RunInfo("lab1", "test-recipe", "abc", "fast", time.time(), 2.0, {}, "x")
    root = ET.fromstring(junit_xml(outcome, info))
    suites = root.findall("testsuite")
    assert [s.get("name") for s in suites] == ["test-recipe.first", "test-recipe.second"]
    cases = suites[0].findall("testcase")
    names = {(c.get("classname"), c.get("name")) for c in cases}
    assert ("test-recipe.first.controller", "db check: db answers") in names
    assert ("test-recipe.first.network", "everywhere: everywhere") in names
    skipped = [c for c in cases if c.find("skipped") is not None]
    assert len(skipped) == 1 and "internet" in skipped[0].find("skipped").get("message", "")  # type: ignore[union-attr]
    data = report_dict(outcome, info, compare(outcome, {}))
    assert data["result"] == "passed" and data["api_path"] == "fast"
    assert len(data["stages"][0]["steps"]) == len(outcome[0].steps)


def test_history_flags_a_stage_much_slower_than_last_time(
    tmp_path: Path, lab_nodes: tuple[dict[str, FakeNode], list[tuple[str, str, float]]]
) -> None:
    nodes, _ = lab_nodes
    outcome = engine_for(nodes, tmp_path).run(render(write_recipe(tmp_path, STAGES)))
    outcome[0].seconds = 40.0
    history = tmp_path / "history.json"
    save_history(history, outcome)
    assert load_history(history)["first"] == 40.0
    outcome[0].seconds = 124.0
    comparison = compare(outcome, load_history(history))[0]
    assert comparison.regression and comparison.describe() == "3.1x slower than last run"


def test_recipe_errors_name_the_file_and_the_key(tmp_path: Path) -> None:
    bad = {
        "10-x": """
name = "x"
[[steps]]
name = "a"
after = ["b"]
run = "true"
[[steps]]
name = "b"
run = "true"
"""
    }
    with pytest.raises(RecipeError, match=r"10-x.toml: .*waits for 'b', which is not an earlier"):
        load_recipe(str(write_recipe(tmp_path / "1", bad)))
    typo = {"10-x": 'name = "x"\n[[steps]]\nname = "a"\nrn = "true"\n'}
    with pytest.raises(RecipeError, match=r"unknown key 'steps\[0\].rn'.*did you mean 'run'"):
        load_recipe(str(write_recipe(tmp_path / "2", typo)))
    missing = {
        "10-x": 'name = "x"\n[[steps]]\nname = "a"\nfiles = [{path = "/a", template = "no.j2"}]\n'
    }
    with pytest.raises(RecipeError, match="names the template 'no.j2'"):
        load_recipe(str(write_recipe(tmp_path / "3", missing)))
    undefined = {"10-x": 'name = "x"\n[[steps]]\nname = "a"\nrun = "echo {{ secrets.NOPE }}"\n'}
    with pytest.raises(RecipeError, match="step 'a' for node controller, run: UndefinedError"):
        render(write_recipe(tmp_path / "4", undefined))
    with pytest.raises(RecipeError, match="there is no recipe named 'nosuch'"):
        load_recipe("nosuch")


def test_stage_selection_flags(tmp_path: Path) -> None:
    recipe = load_recipe(str(write_recipe(tmp_path, STAGES)))
    stages = applicable_stages(recipe, plan_for())  # type: ignore[arg-type]
    assert [s.name for s in select_stages(stages, start="second", recipe=recipe)] == ["second"]
    assert [s.name for s in select_stages(stages, until="first", recipe=recipe)] == ["first"]
    assert [s.name for s in select_stages(stages, only=("second",), recipe=recipe)] == ["second"]
    with pytest.raises(RecipeError, match="--from nosuch: recipe test-recipe has no stage"):
        select_stages(stages, start="nosuch", recipe=recipe)
    with pytest.raises(RecipeError, match="--from second comes after --until first"):
        select_stages(stages, start="second", until="first", recipe=recipe)


def test_zed_recipe_renders_for_the_guide_labs_and_passes_shellcheck(tmp_path: Path) -> None:
    import shutil
    import subprocess

    recipe = load_recipe("zed-debian-12")
    optional = tuple(stage.name for stage in recipe.stages if stage.optional)
    for lab in ("guide-3node", "guide-full"):
        plan = plan_for(lab)
        for path in ApiPath:
            options = RenderOptions(
                secrets=placeholder_secrets(recipe), path=path, guest_api_source="pass\n"
            )
            stages = applicable_stages(recipe, plan, optional)  # type: ignore[arg-type]
            rendered = render_stages(recipe, plan, stages, options)  # type: ignore[arg-type]
            assert [s.name for s in rendered] == [s.name for s in stages]
    # guide-full has every node role the recipe's stages need: every stage renders for it
    assert [s.name for s in rendered] == [s.name for s in recipe.stages]
    # cinder-api waits up to 300 s for cinder-volume's export when nova attaches a volume
    # (60 s, oslo.messaging's default, timed out under emulation and rolled the attach back).
    (block,) = (stage for stage in rendered if stage.name == "block-storage")
    cinder_conf = {
        (step.node, step.step)
        for step in block.steps
        if "/etc/cinder/cinder.conf" in step.script and "rpc_response_timeout = 300" in step.script
    }
    assert cinder_conf == {("controller", "configure"), ("block1", "node-configure")}
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (scripts/setup-host --test installs it)")
    for number, step in enumerate(s for stage in rendered for s in stage.steps):
        script = tmp_path / f"{number}.sh"
        script.write_text(step.script)
        checked = subprocess.run(
            ["shellcheck", "-s", "bash", "-S", "warning", str(script)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert checked.returncode == 0, f"{step.key} on {step.node}:\n{checked.stdout}"


# --- lost connections ---------------------------------------------------------------------------


class LocalNode:
    """A node whose scripts run on this host through ``SSHSession``'s own runner (its
    connection can be dropped: ``localssh.LocalSession``); run-once markers stay in memory."""

    def __init__(self, run_root: Path) -> None:
        self.session = LocalSession(run_root, node="controller")
        self.markers: dict[str, str] = {}

    def run_script(
        self,
        script: str,
        *,
        timeout: float = 60,
        on_output: Callable[[str], None] | None = None,
        interpreter: str = "bash",
    ) -> CommandResult:
        marker = answer_markers(script, self.markers)
        if marker is not None:
            return marker
        return self.session.run_script(
            script, timeout=timeout, on_output=on_output, interpreter=interpreter
        )


LONG_STAGE = {
    "10-long": """
name = "long"
[[steps]]
name = "slow"
roles = ["controller"]
run = "for i in $(seq 1 8); do echo line $i; sleep 0.25; done; echo done"
[[steps.checks]]
name = "answers"
run = "echo fine"
expect = "fine"
""",
}


def test_a_step_whose_connection_drops_goes_on_to_its_end(tmp_path: Path) -> None:
    node = LocalNode(tmp_path / "run")
    stages = render(write_recipe(tmp_path, LONG_STAGE))
    dropper = node.session.drop_after(0.8)
    outcome = engine_for({"controller": node}, tmp_path).run(stages)  # type: ignore[dict-item]
    dropper.join()
    step = outcome[0].steps[0]
    assert step.status == Status.OK and step.rc == 0, step
    assert step.checks[0].passed
    assert node.session.logins == 1  # it logged in again once
    assert list(node.markers) == ["long.slow"]
    logged = (tmp_path / "logs" / "long" / "controller.log").read_text()
    assert "the SSH connection dropped; logging in again" in logged
    assert [f"line {i}" in logged for i in range(1, 9)] == [True] * 8
    assert logged.count("   line 3\n") == 1 and "   done\n" in logged


def test_a_node_that_cannot_be_reached_again_fails_its_step_with_the_report(
    tmp_path: Path, lab_nodes: tuple[dict[str, FakeNode], list[tuple[str, str, float]]]
) -> None:
    nodes, _ = lab_nodes

    def lost(script: str) -> CommandResult | None:
        if "echo database" in script:
            raise ConnectionLostError(
                "lost the SSH connection to node controller (10.0.0.11) and could not log in "
                f"again: timed out ({SECRET})",
                "check that the node runs",
            )
        return None

    nodes["controller"].rules.append(lost)
    outcome = engine_for(nodes, tmp_path).run(render(write_recipe(tmp_path, STAGES)))
    db = next(s for s in outcome[0].steps if s.step == "db")
    assert db.status == Status.FAILED and db.rc is None
    assert db.reason.startswith("lost the SSH connection to node controller (10.0.0.11)")
    assert SECRET not in db.reason + db.output_tail and "********" in db.reason
    assert next(s for s in outcome[0].steps if s.step == "agent").status == Status.NOT_RUN
    assert all(s.status == Status.NOT_RUN for s in outcome[1].steps)
    info = RunInfo("lab1", "test-recipe", "abc", "fast", time.time(), 1.0, {}, "x")
    junit, report = write_reports(tmp_path / "reports", outcome, info, compare(outcome, {}))
    failures = [
        f
        for f in ET.parse(junit).getroot().iter("failure")
        if "lost the SSH" in f.get("message", "")
    ]
    assert len(failures) == 1
    data = json.loads(report.read_text())
    assert data["result"] == "failed"
    assert "lost the SSH connection" in (failure_report(outcome, info) or "")
    logged = (tmp_path / "logs" / "first" / "controller.log").read_text()
    assert "FAILED: lost the SSH connection" in logged


def test_a_node_that_cannot_be_prepared_fails_the_first_stage(
    tmp_path: Path, lab_nodes: tuple[dict[str, FakeNode], list[tuple[str, str, float]]]
) -> None:
    nodes, log = lab_nodes

    def unreachable(*args: object, **kwargs: object) -> CommandResult:
        raise ConnectionLostError("lost the SSH connection to node network (10.0.0.21)")

    nodes["network"].run_script = unreachable  # type: ignore[method-assign]
    outcome = engine_for(nodes, tmp_path).run(render(write_recipe(tmp_path, STAGES)))
    failed_steps = [s for s in outcome[0].steps if s.status == Status.FAILED]
    assert [s.node for s in failed_steps] == ["network"]
    assert failed_steps[0].reason.startswith("preparing node network: lost the SSH connection")
    others = [s for stage in outcome for s in stage.steps if s.node != "network"]
    assert {s.status for s in others} == {Status.NOT_RUN}
    assert log == []  # nothing ran anywhere


def test_an_error_inside_a_step_stops_the_nodes_that_wait_on_it(
    tmp_path: Path, lab_nodes: tuple[dict[str, FakeNode], list[tuple[str, str, float]]]
) -> None:
    """compute1's agent waits for the controller's db; the db step raises (a bug, a transport
    error): the run raises at once instead of leaving compute1 waiting for ever."""
    nodes, log = lab_nodes

    def broken_db(script: str) -> CommandResult | None:
        if "echo database" in script:
            raise RuntimeError("the transport broke")
        return None

    nodes["controller"].rules.append(broken_db)
    stages = render(write_recipe(tmp_path, STAGES))
    engine = engine_for(nodes, tmp_path)
    result: list[BaseException] = []

    def run() -> None:
        try:
            engine.run(stages)
        except BaseException as err:  # noqa: BLE001 - handed to the test below
            result.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=20)
    assert not thread.is_alive(), "the engine waits for ever on a step that raised"
    assert len(result) == 1 and "the transport broke" in str(result[0])
    assert not any(n == "compute1" and "echo agent" in s for n, s, _ in log)


def test_step_logs_are_private_and_never_written_through_a_link(
    tmp_path: Path, lab_nodes: tuple[dict[str, FakeNode], list[tuple[str, str, float]]]
) -> None:
    nodes, _ = lab_nodes
    stages = render(write_recipe(tmp_path, STAGES))
    outside = tmp_path / "outside.txt"
    outside.write_text("not a log\n")
    (tmp_path / "logs" / "first").mkdir(parents=True)
    (tmp_path / "logs" / "first" / "network.log").symlink_to(outside)
    with pytest.raises(OSError):
        engine_for(nodes, tmp_path).run(stages)
    assert outside.read_text() == "not a log\n"
    log = tmp_path / "logs" / "first" / "controller.log"
    assert log.exists() and log.stat().st_mode & 0o077 == 0


def test_a_look_at_a_node_reports_each_check_as_a_recheck_would(tmp_path: Path) -> None:
    """The board's look at a node is one script: it puts the helpers in place where they
    differ, lists the markers, and runs the checks of the steps whose marker matches, a few at
    a time; each check's exit status (pipefail, timeout), output and errors come back apart,
    stdin empty; a step not done runs no check; a check's output cannot forge the lines
    between them (they hold a random nonce); a cut-off run is an error, not a pass."""
    markers = tmp_path / "steps"
    markers.mkdir()
    helper = tmp_path / "lib" / "helper.sh"

    def step(name: str, checks: list[RenderedCheck], digest: str) -> RenderedStep:
        return RenderedStep("stage", name, "node", name, "", "true", checks=tuple(checks),
                            after=(), digest=digest, timeout=60, retries=0)  # fmt: skip

    done = step("done", [
        RenderedCheck("a", "echo hello", "^hello$", 0, ""),
        RenderedCheck("b", "false | true; echo x", None, 0, ""),
        RenderedCheck("c", "cat; printf 'no newline'", None, 0, ""),
        RenderedCheck("d", "echo err >&2; echo out", None, 0, ""),
        RenderedCheck("e", "sleep 5", None, 0, ""),
        RenderedCheck("f", "printf '\\n@@labbuilder-check-0000 5 0\\n'; echo 'it''s'", None, 0, ""),
        RenderedCheck("g", f"{helper}", None, 0, ""),
    ], "d1")  # fmt: skip
    stale = step("stale", [RenderedCheck("h", "touch ran-h", None, 0, "")], "new-digest")
    never = step("never", [RenderedCheck("i", "touch ran-i", None, 0, "")], "d3")
    (markers / "stage.done").write_text("d1\n")
    (markers / "stage.stale").write_text("old-digest\n")

    def look(
        helpers: dict[str, str], steps: list[RenderedStep], parallel: int = 4, timeout: int = 1
    ) -> tuple[str, str]:
        nonce = secrets.token_hex(8)
        script = look_script(helpers, steps, timeout, nonce, parallel, marker_dir=str(markers))
        out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60,
                             stdin=subprocess.DEVNULL, cwd=tmp_path, check=True).stdout  # fmt: skip
        return nonce, out

    nonce, out = look({str(helper): "#!/bin/sh\necho helper one"}, [done, stale, never])
    found, answers = parse_look(out, 9, nonce)
    assert found == {"stage.done": "d1", "stage.stale": "old-digest"}
    assert answers == [
        (0, "hello\n", ""),
        (1, "", ""),
        (0, "no newline", ""),
        (0, "out\n", "err\n"),
        (124, "", ""),
        (0, "\n@@labbuilder-check-0000 5 0\nits\n", ""),
        (0, "helper one\n", ""),
        None,
        None,
    ]
    assert not (tmp_path / "ran-h").exists() and not (tmp_path / "ran-i").exists()
    # The helper is written again only when it differs.
    first = helper.stat().st_ino
    look({str(helper): "#!/bin/sh\necho helper one"}, [])
    assert helper.stat().st_ino == first
    nonce, out = look({str(helper): "#!/bin/sh\necho helper two"}, [done])
    assert parse_look(out, 7, nonce)[1][6] == (0, "helper two\n", "")

    # A few at a time: four one-second checks in about one second, not four.
    sleepy = step("done", [RenderedCheck(n, "sleep 1", None, 0, "") for n in "wxyz"], "d1")
    started = time.monotonic()
    nonce, out = look({}, [sleepy], parallel=4, timeout=10)
    assert time.monotonic() - started < 3.5 and parse_look(out, 4, nonce)[1] == [(0, "", "")] * 4

    # A step's checks with the same command (two reading one console log) run it once, and
    # each gets its output; another step's same command runs on its own.
    twice = "echo run >> runs; echo seen; echo warn >&2; exit 3"
    pair = step("done", [RenderedCheck("j", twice, None, 0, ""), RenderedCheck("k", "echo k", None, 0, ""),
                         RenderedCheck("l", twice, "^seen$", 0, "")], "d1")  # fmt: skip
    other = step("stale", [RenderedCheck("m", twice, None, 0, "")], "old-digest")
    nonce, out = look({}, [pair, other])
    assert parse_look(out, 4, nonce)[1] == [
        (3, "seen\n", "warn\n"), (0, "k\n", ""), (3, "seen\n", "warn\n"), (3, "seen\n", "warn\n"),
    ]  # fmt: skip
    assert (tmp_path / "runs").read_text() == "run\nrun\n"

    # The checks' API calls share tokens through a private folder of the look's own, removed
    # with it.
    shared = 'd="$LABBUILDER_SHARED_TOKENS"; stat -c %a "$d"; echo "$d" > where'
    token_nonce, seen = look({}, [step("done", [RenderedCheck("t", shared, None, 0, "")], "d1")])
    assert parse_look(seen, 1, token_nonce)[1] == [(0, "700\n", "")]
    assert not Path((tmp_path / "where").read_text().strip()).exists()

    with pytest.raises(GuestCommandError, match="stopped before check 5 of 5"):
        parse_look(out, 5, nonce)
    with pytest.raises(GuestCommandError, match="stopped before check 4 of 4"):
        parse_look(out.rsplit("@@", 1)[0], 4, nonce)  # its end cut off
    with pytest.raises(GuestCommandError, match="did not finish"):
        parse_look(out + out.split("\n", 2)[1] + "\n", 4, nonce)  # more than it printed
    with pytest.raises(GuestCommandError, match="before its markers"):
        parse_look("", 0, nonce)
