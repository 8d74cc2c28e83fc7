"""``install``: a recipe rendered for a lab that is up, run by the engine, reported, snapshotted.

This module wires the parts together: the lab's saved plan and secrets (``labstate``), the recipe
(``recipefile``, ``reciperender``), SSH sessions (``adapters.ssh``), the engine (``install``),
stage snapshots (``snapshots``) and reports (``installreport``). ``--dry-run`` needs no lab: it
renders with the guide's placeholder names instead of the lab's secrets.
"""

from __future__ import annotations

import contextlib
import shlex
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labbuilder.adapters import libvirt as lv
from labbuilder.adapters.ssh import CommandResult, GuestSession, HostKeyError, SSHSession, Transport
from labbuilder.api import facade as api
from labbuilder.common.errors import (
    DiskSpaceError,
    GuestTransportError,
    InstallError,
    UsageError,
)
from labbuilder.common.paths import state_root
from labbuilder.install.engine import (
    Engine,
    EngineEvent,
    Redactor,
    StageOutcome,
    Status,
    StepOutcome,
)
from labbuilder.install.guest import GUEST_API_SOURCE, WARM_PYTHON_SOURCE
from labbuilder.install.report import (
    Comparison,
    RunInfo,
    compare,
    error_entry,
    failure_report,
    load_history,
    save_history,
    write_reports,
)
from labbuilder.lab.check import check_lab_recipe
from labbuilder.lab.view import plan_from_dict
from labbuilder.lifecycle import snapshots
from labbuilder.lifecycle.state import (
    LabState,
    ensure_secrets,
    lab_lock,
    lab_state,
    load_state_record,
)
from labbuilder.model.lab import Lab, Plan
from labbuilder.recipe.files import load_recipe
from labbuilder.recipe.model import ApiPath, Recipe, RenderedStage
from labbuilder.recipe.render import (
    WARM_PYTHON_PATH,
    RenderOptions,
    applicable_stages,
    placeholder_secrets,
    render_stages,
    select_stages,
)
from labbuilder.recipe.sizes import check_plan


def guest_helpers(path: ApiPath) -> dict[str, str]:
    """The files the rendered scripts of ``path`` expect on every node (guest path -> text):
    the fast path's warm Python (``{{ api_python }}``)."""
    return {WARM_PYTHON_PATH: WARM_PYTHON_SOURCE.read_text()} if path == ApiPath.FAST else {}


@dataclass(frozen=True)
class Selection:
    """Which stages to run and how (the install command's flags)."""

    recipe: str | None = None  # default: the lab's recipe
    start: str | None = None
    until: str | None = None
    only: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()  # optional stages to include
    path: ApiPath = ApiPath.FAST
    force: bool = False  # run steps even when their run-once markers match
    recheck: bool = False  # run the checks of steps done before again (``--only``)
    snapshots: bool = True


@dataclass
class InstallResult:
    recipe: Recipe
    stages: list[StageOutcome]
    info: RunInfo
    comparisons: list[Comparison]
    junit: Path | None = None
    report: Path | None = None
    failure: str | None = None
    rendered: tuple[RenderedStage, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return self.failure is None


def resume_command(lab: Lab, selection: Selection) -> str:
    """The install command line that continues this run (the caller adds ``--from STAGE``)."""
    recipe = shlex.quote(selection.recipe or lab.recipe)
    faithful = " --faithful" if selection.path == ApiPath.FAITHFUL else ""
    return f"labbuilder install {_select_args(lab)} --recipe {recipe}{faithful}"


def render_for_lab(
    lab: Lab, selection: Selection, *, secrets: dict[str, str] | None, plan: Plan, virt_type: str
) -> tuple[Recipe, tuple[RenderedStage, ...]]:
    recipe = load_recipe(selection.recipe or lab.recipe)
    optional = selection.optional + lab.options.optional_stages
    stages = applicable_stages(recipe, plan, optional)
    chosen = select_stages(
        stages,
        start=selection.start,
        until=selection.until,
        only=selection.only,
        recipe=recipe,
    )
    options = RenderOptions(
        secrets=secrets if secrets is not None else placeholder_secrets(recipe),
        internet=lab.options.internet,
        virt_type=virt_type,
        ntp_servers=lab.options.ntp_servers,
        apt_proxy=lab.options.apt_proxy,
        path=selection.path,
        guest_api_source=GUEST_API_SOURCE.read_text(),
        optional_stages=optional,
    )
    return recipe, render_stages(recipe, plan, chosen, options)


def dry_run(lab: Lab, selection: Selection) -> tuple[Recipe, tuple[RenderedStage, ...]]:
    """The rendered scripts, with placeholders for secrets; the lab need not be up."""
    record = load_state_record(lab_state(lab.name))
    if record is not None:
        plan, virt_type = plan_from_dict(record["plan"]), str(record.get("virt_type", "qemu"))
    else:
        plan, virt_type = api.plan_lab(lab, host_check=False).plan, "qemu"
    return render_for_lab(lab, selection, secrets=None, plan=plan, virt_type=virt_type)


def install(
    lab: Lab,
    selection: Selection,
    *,
    on_event: Callable[[EngineEvent], None] | None = None,
) -> InstallResult:
    """Run the selected stages on the lab's nodes; snapshot the lab after each stage."""
    state = lab_state(lab.name)
    record = load_state_record(state)
    if record is None:
        raise UsageError(
            f"lab {lab.name} is not up on this host",
            f"bring it up first: labbuilder up {_select_args(lab)}",
        )
    plan = plan_from_dict(record["plan"])
    recipe = load_recipe(selection.recipe or lab.recipe)
    check_lab_recipe(lab, recipe)
    check_plan(lab, recipe, plan, bring_up_again=_select_args(lab))
    with lab_lock(state, "labbuilder install"):
        if (state.directory / snapshots.RETURN_MARKER).exists():
            with lv.LibvirtHypervisor.open(lab.libvirt_uri) as hypervisor:
                snapshots.return_if_away(hypervisor, state)
        secrets = ensure_secrets(state, recipe.secret_names)
        recipe, rendered = render_for_lab(
            lab,
            selection,
            secrets=secrets,
            plan=plan,
            virt_type=str(record.get("virt_type", "qemu")),
        )
        started = time.time()
        begin = time.monotonic()
        progress = RunProgress(rendered, on_event)
        redact = Redactor(list(secrets.values()))

        def after_stage(stage: StageOutcome) -> float | None:
            progress.finished.append(stage)
            if not selection.snapshots or progress.stopped.is_set():
                return None
            progress.where = f"the snapshot after stage {stage.name}"
            progress.snapshotting.set()
            try:
                return snapshot_stage(lab, stage, recipe, stamped=bool(record.get("template")))
            finally:
                progress.snapshotting.clear()

        def run(sessions: dict[str, GuestSession]) -> list[StageOutcome]:
            engine = Engine(
                sessions,
                redact=redact,
                log_dir=state.directory / "logs",
                on_event=progress.on_event,
                after_stage=after_stage,
                force=selection.force,
                recheck=selection.recheck or bool(selection.only),
                helpers=guest_helpers(selection.path),
            )
            progress.where = "preparing the nodes (helpers, run-once markers)"
            return engine.run(rendered)

        error: BaseException | None = None
        try:
            outcomes = _run_in_thread(plan, record, state, progress, run)
        except BaseException as err:  # reported below, then raised again
            error = err
            outcomes = progress.outcomes(redact(_error_text(err)))
    info = RunInfo(
        lab=lab.name,
        recipe=recipe.name,
        recipe_digest=recipe.digest,
        path=str(selection.path),
        started=started,
        seconds=time.monotonic() - begin,
        images=dict(record.get("images", {}) or {"all": record.get("image", {})}),
        resume_command=resume_command(lab, selection),
        error=None if error is None else error_entry(error, progress.where, redact),
    )
    history = state_root() / "history" / f"{recipe.name}-{selection.path}.json"
    comparisons = compare(outcomes, load_history(history))
    try:
        junit, report = write_reports(state.directory / "reports", outcomes, info, comparisons)
        save_history(history, outcomes)
    except Exception as err:
        if error is None:
            raise
        error.add_note(f"writing the reports failed too: {err}")
        raise error from None
    if error is not None:
        error.add_note(f"reports: {junit} {report}")
        raise error
    return InstallResult(
        recipe=recipe,
        stages=outcomes,
        info=info,
        comparisons=comparisons,
        junit=junit,
        report=report,
        failure=failure_report(outcomes, info),
        rendered=rendered,
    )


class _Unreachable:
    """A node that could not be logged in to: every script on it fails with the reason."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def run_script(
        self,
        script: str,
        *,
        timeout: float = 0.0,
        on_output: Callable[[str], None] | None = None,
        interpreter: str = "bash",
    ) -> CommandResult:
        raise GuestTransportError(self.reason, "check the lab with `labbuilder status`")


def check_lab(lab: Lab, selection: Selection | None = None) -> list[StageOutcome]:
    """Every applicable stage of the lab looked at now, nothing run: the checks of the steps
    done before run again (``Engine.check``). Read-only: no lock, no snapshot, no report; a
    node that cannot be reached fails its steps, naming why."""
    chosen = selection or Selection()
    state = lab_state(lab.name)
    record = load_state_record(state)
    if record is None:
        raise UsageError(f"lab {lab.name} is not up on this host", "bring it up first")
    plan = plan_from_dict(record["plan"])
    recipe = load_recipe(chosen.recipe or lab.recipe)
    secrets = ensure_secrets(state, recipe.secret_names)
    _, rendered = render_for_lab(
        lab,
        chosen,
        secrets=secrets,
        plan=plan,
        virt_type=str(record.get("virt_type", "qemu")),
    )
    names = sorted({node for stage in rendered for node in stage.nodes})
    sessions: dict[str, GuestSession] = {}
    unreachable: dict[str, str] = {}

    def connect(name: str) -> None:
        try:
            sessions[name] = connect_node(plan, record, state, name)
        except Exception as err:  # noqa: BLE001 - the node's steps fail, naming it
            unreachable[name] = str(err)

    with ThreadPoolExecutor(max_workers=max(1, len(names))) as pool:
        list(pool.map(connect, names))
    try:
        transports: dict[str, Transport] = {
            **sessions,
            **{name: _Unreachable(reason) for name, reason in unreachable.items()},
        }
        engine = Engine(
            transports,
            redact=Redactor(list(secrets.values())),
            helpers=guest_helpers(chosen.path),
        )
        return engine.check(rendered, once=True)
    finally:
        for session in sessions.values():
            session.close()


class RunProgress:
    """What the engine reported so far, to report a run that stopped half-way: the stages it
    finished, and from its events the steps of the stage it was in."""

    def __init__(
        self,
        stages: Sequence[RenderedStage],
        forward: Callable[[EngineEvent], None] | None,
    ) -> None:
        self.stages = stages
        self.forward = forward
        self.finished: list[StageOutcome] = []
        self.where = "connecting to the lab's nodes over SSH"
        self.stopped = threading.Event()  # set when the run stopped: no more events, snapshots
        self.snapshotting = threading.Event()  # the nodes are paused for a snapshot right now
        self._lock = threading.Lock()
        self._stage_started: dict[str, float] = {}
        self._steps: dict[tuple[str, str, str], tuple[str, float]] = {}  # -> (status, since)

    def on_event(self, event: EngineEvent) -> None:
        if self.stopped.is_set():
            raise RunStopped("the run stopped")  # ends the engine's threads at their next step
        now = time.monotonic()
        with self._lock:
            if event.kind == "stage-start":
                self._stage_started[event.stage] = now
                self.where = f"stage {event.stage}"
            elif event.kind == "step-start":
                self._steps[(event.stage, event.node, event.step)] = ("running", now)
                self.where = f"stage {event.stage}"
            elif event.kind == "step-end":
                since = self._steps.get((event.stage, event.node, event.step), ("", now))[1]
                self._steps[(event.stage, event.node, event.step)] = (event.status, since)
        if self.forward is not None:
            self.forward(event)

    def outcomes(self, error: str) -> list[StageOutcome]:
        """The finished stages as the engine reported them; the stage that was running with
        each step's status from the events (a step that was running when the run stopped has
        failed with ``error``); every later stage not run."""
        self.stopped.set()
        now = time.monotonic()
        done = {stage.name: stage for stage in self.finished}
        result: list[StageOutcome] = []
        with self._lock:
            for stage in self.stages:
                if stage.name in done:
                    result.append(done[stage.name])
                    continue
                steps = []
                for step in stage.steps:
                    status, since = self._steps.get((stage.name, step.node, step.step), ("", now))
                    outcome = StepOutcome(
                        step.stage, step.step, step.node, step.title, step.guide, Status.NOT_RUN
                    )
                    if status == "running":
                        outcome.status = Status.FAILED
                        outcome.seconds = now - since
                        outcome.output_tail = error
                        outcome.reason = error
                    elif status in set(Status):
                        outcome.status = Status(status)
                        outcome.reason = "" if status != Status.NOT_RUN else "the run stopped"
                    else:
                        outcome.reason = f"the run stopped: {error}"
                    steps.append(outcome)
                begun = self._stage_started.get(stage.name)
                seconds = now - begun if begun is not None else 0.0
                result.append(StageOutcome(stage.name, stage.title, stage.guide, seconds, steps))
        return result


class RunStopped(Exception):
    """Raised in the engine's threads once a run has stopped (an error, Ctrl-C)."""


def _run_in_thread(
    plan: Plan,
    record: dict[str, Any],
    state: LabState,
    progress: RunProgress,
    run: Callable[[dict[str, GuestSession]], list[StageOutcome]],
) -> list[StageOutcome]:
    """Connect and run the engine in a thread of their own, so that Ctrl-C reaches this one
    at once, whatever the engine's threads wait for (a step, a connection): the run is then
    reported as it stands, and the engine's threads stop at their next event."""
    box: dict[str, Any] = {}
    sessions: dict[str, GuestSession] = {}

    def work() -> None:
        try:
            sessions.update(_connect(plan, record, state))
            box["outcomes"] = run(sessions)
        except BaseException as err:  # noqa: BLE001 - handed to the waiting thread
            box["error"] = err
        finally:
            if "error" in box:
                progress.stopped.set()
            for session in list(sessions.values()):
                session.close()

    runner = threading.Thread(target=work, name="labbuilder-install", daemon=True)
    runner.start()
    try:
        while runner.is_alive():
            runner.join(0.25)
    except BaseException:
        progress.stopped.set()
        # A snapshot pauses every node: it is let finish (a few seconds), not cut off with the
        # nodes paused; a second Ctrl-C does not wait.
        while progress.snapshotting.is_set() and runner.is_alive():
            runner.join(0.25)
        for session in list(sessions.values()):
            with contextlib.suppress(Exception):
                session.close()
        raise
    if "error" in box:
        raise box["error"]
    outcomes: list[StageOutcome] = box["outcomes"]
    return outcomes


def _error_text(err: BaseException) -> str:
    return str(error_entry(err, "")["message"])


def snapshot_stage(
    lab: Lab, stage: StageOutcome, recipe: Recipe, *, stamped: bool = False
) -> float | None:
    """Snapshot every node of the lab live as "after <stage>"; returns seconds, or None when
    no snapshot was taken: nothing ran in the stage and its snapshot exists already (a re-run
    stays fast), or the lab has a snapshot of a later stage of the recipe (re-running an
    earlier stage in a lab that went further would mix later work into "after <stage>"), or
    nothing ran in the stage of a lab made from a template (its template holds that stage)."""
    ran = any(step.status in (Status.OK, Status.GUARDED) for step in stage.steps)
    if stamped and not ran:
        return None
    order = [s.name for s in recipe.stages]
    later = set(order[order.index(stage.name) + 1 :]) if stage.name in order else set()
    hypervisor = lv.LibvirtHypervisor.open(lab.libvirt_uri)
    try:
        existing = {s.name: s for s in snapshots.list_snapshots(hypervisor, lab.name)}
        if later & set(existing):
            return None
        if not ran and stage.name in existing and existing[stage.name].complete:
            return None
        start = time.monotonic()
        try:
            snapshots.take_snapshot(
                hypervisor,
                lab.name,
                stage.name,
                description=f"after stage {stage.name} of recipe {recipe.name}",
                meta={"recipe": recipe.name, "recipe_digest": recipe.digest, "stage": stage.name},
            )
        except DiskSpaceError as err:
            # The install goes on without this snapshot: a full disk would pause the guests.
            stage.snapshot_note = f"snapshot skipped: {err}"
            return None
        # The guests' clocks stood still while they were paused (and emulated guests fall
        # behind under load): the next stage starts with every clock at the host's.
        stage.snapshot_note = snapshots.sync_clocks_after_take(
            hypervisor, lab_state(lab.name), stage.name
        )
        return time.monotonic() - start
    finally:
        hypervisor.close()


def _select_args(lab: Lab) -> str:
    return f"--lab {lab.name}" if lab.source.startswith("built-in") else shlex.quote(lab.source)


def connect_node(plan: Plan, record: dict[str, Any], state: LabState, name: str) -> GuestSession:
    node = plan.node(name)
    return SSHSession(
        node.management_address,
        str(record["user"]),
        state.key_path,
        known_hosts=state.known_hosts_path,
        node=name,
        namespace=plan.gateway.namespace if plan.gateway else None,
    )


def _connect(plan: Plan, record: dict[str, Any], state: LabState) -> dict[str, GuestSession]:
    def connect(name: str) -> GuestSession:
        return connect_node(plan, record, state, name)

    names = [node.name for node in plan.nodes]
    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        futures = {name: pool.submit(connect, name) for name in names}
        sessions: dict[str, GuestSession] = {}
        errors = []
        refused: list[HostKeyError] = []
        for name, future in futures.items():
            try:
                sessions[name] = future.result()
            except HostKeyError as err:
                refused.append(err)
            except Exception as err:  # noqa: BLE001 - collected and reported together
                errors.append(f"{name}: {err}")
    if errors or refused:
        for session in sessions.values():
            session.close()
    if refused:
        raise refused[0]  # names the node, its address and known_hosts, with its own hint
    if errors:
        raise InstallError(
            "cannot log in to the lab's nodes over SSH: " + "; ".join(errors),
            "check `labbuilder status`; `labbuilder up` completes a partial lab",
        )
    return sessions


def selected_stage_names(stages: Sequence[RenderedStage]) -> list[str]:
    return [stage.name for stage in stages]
