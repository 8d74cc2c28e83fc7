"""``install`` (a recipe into a lab that is up), ``run`` (up, install, report, down) and
``recipe`` (list and show recipes)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from labbuilder.api import install as installer
from labbuilder.cli import coverage
from labbuilder.cli.common import (
    Sizes,
    Subparsers,
    add_lab_arguments,
    add_plain_row,
    lab_option,
    plain_table,
    selected_lab,
)
from labbuilder.cli.upwatch import (
    copy_consoles,
    copy_logs,
    up_log_path,
    up_reports_dir,
    up_watched,
)
from labbuilder.cli.watch import InstallWatch, install_estimates, show_tail, watching
from labbuilder.common.errors import UsageError
from labbuilder.common.paths import state_root
from labbuilder.install.engine import StageOutcome, Status
from labbuilder.install.report import Comparison, error_entry
from labbuilder.lifecycle.state import lab_state
from labbuilder.model.lab import Lab
from labbuilder.recipe.files import load_recipe, recipe_names
from labbuilder.recipe.model import ApiPath, RenderedStage

INSTALL_EPILOG = """\
Each step runs once: a marker in the guest remembers the digest of what ran, so a re-run skips
finished steps unless their rendered content changed (use --force to run them anyway). After
each completed stage all nodes are snapshotted live (`labbuilder snapshot list`).
Exit codes: 0 every step and check passed, 1 a step or check failed or the run stopped on an
error (the report says where and how to resume), 2 bad input, 130 interrupted (Ctrl-C). The
reports are written in every case but bad input.
"""


def register(commands: Subparsers) -> None:
    install = commands.add_parser(
        "install",
        help="install OpenStack into a lab that is up, stage by stage, with checks",
        description=(
            "Run an install recipe in the lab's nodes: the guide's chapters as stages, each "
            "step on the nodes of its roles, each followed by the guide's checks. Writes JUnit "
            "XML and JSON reports and per-stage, per-node logs under the lab's state directory."
        ),
        epilog=INSTALL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_lab_arguments(install)
    add_install_options(install)
    install.add_argument(
        "--dry-run",
        action="store_true",
        help="print the rendered script of every step per node and stage; change nothing "
        "(secrets show as the guide's placeholder names; the lab need not be up)",
    )
    install.add_argument("--json", action="store_true", help="print the JSON report on stdout")
    install.set_defaults(handler=cmd_install)

    run = commands.add_parser(
        "run",
        help="for CI: up, install, reports, down, in one command",
        description=(
            "Bring the lab up, install the recipe, keep the reports, and take the lab down "
            "again. On failure the lab is kept for inspection unless --always-down. With "
            "--repeat N it does this N times from scratch and reports how many runs passed "
            "(flakiness), with each stage's times."
        ),
        epilog="Exit codes: 0 every run passed, 1 a run failed, 2 bad input, 130 interrupted. "
        "The reports of a run are copied to --report-dir whatever failed.",
    )
    add_lab_arguments(run, allow_small=True)
    add_install_options(run)
    run.add_argument(
        "--auto-subnets",
        action="store_true",
        help="move lab networks that clash with the host to free subnets",
    )
    run.add_argument("--keep", action="store_true", help="keep the lab when the run passes")
    run.add_argument(
        "--always-down", action="store_true", help="take the lab down even when the run fails"
    )
    run.add_argument(
        "--repeat", type=positive_int, default=1, metavar="N", help="fresh runs (default 1)"
    )
    run.add_argument(
        "--report-dir",
        type=report_dir_path,
        metavar="DIR",
        help="where the JUnit and JSON reports are copied (default: "
        "<state root>/runs/<lab>-<time>/); they outlive the lab",
    )
    run.add_argument("--json", action="store_true", help="print a JSON summary of the runs")
    run.set_defaults(handler=cmd_run)

    recipe = commands.add_parser(
        "recipe",
        help="list install recipes, show a recipe's stages",
        description="Install recipes: the guide's chapters as data (stages, steps, checks).",
    )
    actions = recipe.add_subparsers(dest="recipe_command", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="the built-in recipes")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(handler=cmd_recipe_list)
    show = actions.add_parser("show", help="a recipe's stages and steps")
    show.add_argument("name", help="a built-in recipe's name or a recipe folder")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(handler=cmd_recipe_show)
    coverage.register_actions(actions)


def add_install_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--recipe", metavar="NAME", help="a built-in recipe or a recipe folder (default: the lab's)"
    )
    parser.add_argument("--from", dest="start", metavar="STAGE", help="start at this stage")
    parser.add_argument("--until", metavar="STAGE", help="stop after this stage")
    parser.add_argument(
        "--only", metavar="STAGE", action="append", default=[], help="run only this stage (repeat)"
    )
    parser.add_argument(
        "--with",
        dest="optional",
        metavar="STAGE",
        action="append",
        default=[],
        help="include this optional stage (repeat)",
    )
    parser.add_argument(
        "--faithful",
        action="store_true",
        help="create API objects with the guide's own CLI commands, one process per call, "
        "instead of one in-guest process per stage (the fast path)",
    )
    parser.add_argument(
        "--force", action="store_true", help="run steps even when they are marked done"
    )
    parser.add_argument(
        "--no-snapshots",
        action="store_true",
        help="do not snapshot the nodes after each completed stage",
    )


def positive_int(text: str) -> int:
    """An argparse type: a whole number of 1 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: give 1 or more")
    return value


def report_dir_path(text: str) -> Path:
    """An argparse type: a folder for reports (it may not exist yet; it must not be a file)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("the folder's path is empty")
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a folder")
    return path


def selection_from(args: argparse.Namespace) -> installer.Selection:
    return installer.Selection(
        recipe=args.recipe,
        start=args.start,
        until=args.until,
        only=tuple(args.only),
        optional=tuple(args.optional),
        path=ApiPath.FAITHFUL if args.faithful else ApiPath.FAST,
        force=args.force,
        snapshots=not args.no_snapshots,
    )


def check_optional_stages(lab: Lab, selection: installer.Selection) -> None:
    """Every ``--with STAGE`` names a stage of the recipe (refused before anything runs)."""
    recipe = load_recipe(selection.recipe or lab.recipe)
    names = [stage.name for stage in recipe.stages]
    for name in selection.optional:
        if name not in names:
            optional = [stage.name for stage in recipe.stages if stage.optional]
            raise UsageError(
                f"--with {name}: recipe {recipe.name} has no stage {name!r}",
                f"its optional stages: {', '.join(optional) or '(none)'}",
            )


def cmd_install(args: argparse.Namespace, console: Console) -> int:
    lab = selected_lab(args, Sizes.IF_UP)
    selection = selection_from(args)
    check_optional_stages(lab, selection)
    if args.dry_run:
        recipe, rendered = installer.dry_run(lab, selection)
        print_dry_run(console, lab, recipe.name, rendered)
        return 0
    since = time.time()
    try:
        result = run_install(lab, selection, json_output=args.json)
    except BaseException:
        latest = lab_state(lab.name).directory / "reports" / "latest.json"
        if args.json and latest.is_file() and latest.stat().st_mtime >= since - 1:
            sys.stdout.write(latest.read_text())  # the report of the run that stopped
            sys.stdout.flush()
        raise
    if args.json:
        assert result.report is not None
        sys.stdout.write(result.report.read_text())  # plain: rich would wrap long strings
        sys.stdout.flush()
        if result.failure:
            Console(stderr=True, soft_wrap=True).print(result.failure, markup=False)
    else:
        print_summary(console, result)
    return 0 if result.ok else 1


def run_install(
    lab: Lab, selection: installer.Selection, *, json_output: bool
) -> installer.InstallResult:
    """``installer.install`` with its progress on stderr (stdout holds only the result: JSON
    with ``--json``) and its detail in the lab's ``logs/install.log``; when a step fails, the
    last lines of its log are shown."""
    del json_output  # the progress is on stderr either way
    state = lab_state(lab.name)
    recipe = load_recipe(selection.recipe or lab.recipe)
    stages, steps = install_estimates(
        state_root() / "history" / f"{recipe.name}-{selection.path}.json",  # as installer's
        state.directory / "reports" / "latest.json",
    )
    log = state.directory / "logs" / "install.log"
    with watching(log, f"labbuilder install {lab_option(lab)}") as progress:
        watch = InstallWatch(progress, stages, steps)
        result = installer.install(lab, selection, on_event=watch.on_event)
    if result.failure and watch.failed is not None:
        stage, node = watch.failed
        show_tail(sys.stderr, state.directory / "logs" / stage / f"{node}.log", "step's log")
    return result


def print_dry_run(console: Console, lab: Lab, recipe: str, stages: Sequence[RenderedStage]) -> None:
    """Every node's scripts, stage by stage, as plain text (no wrapping: it is shell)."""
    del console  # plain stdout: rich would wrap long command lines
    out: list[str] = []
    nodes = list(dict.fromkeys(node for stage in stages for node in stage.nodes))
    for node in nodes:
        out.append(f"########## node {node} (lab {lab.name}, recipe {recipe})")
        for stage in stages:
            steps = stage.for_node(node)
            if not steps:
                continue
            out.append(f"# ===== stage {stage.name}: {stage.title} ({stage.guide})")
            for step in steps:
                if step.skipped_reason:
                    out.append(f"# step {step.step} skipped: {step.skipped_reason}")
                out.append(step.script.rstrip("\n"))
                for check in step.checks:
                    expect = f" (expect /{check.expect}/)" if check.expect else ""
                    out.append(f"# check: {check.name}{expect}")
                    out.extend(f"#   {line}" for line in check.command.splitlines())
                out.append("")
    sys.stdout.write("\n".join(out) + "\n")
    sys.stdout.flush()


def summary_table(stages: Sequence[StageOutcome], comparisons: Sequence[Comparison]) -> Table:
    by_stage = {c.stage: c for c in comparisons}
    columns = ("stage", "result", "steps run", "done before", "skipped", "seconds", "vs last run")
    table = plain_table("install summary", columns)
    for stage in stages:
        counts = {status: 0 for status in Status}
        for step in stage.steps:
            counts[step.status] += 1
        result = (
            "failed"
            if stage.failed
            else ("not run" if counts[Status.NOT_RUN] == len(stage.steps) else "ok")
        )
        comparison = by_stage.get(stage.name)
        versus = Text(comparison.describe() if comparison else "-")
        if comparison and comparison.regression:
            versus.stylize("bold red")
        add_plain_row(
            table,
            stage.name,
            result,
            str(counts[Status.OK] + counts[Status.GUARDED] + counts[Status.FAILED]),
            str(counts[Status.DONE_BEFORE]),
            str(counts[Status.SKIPPED]),
            f"{stage.seconds:.1f}",
            versus,
        )
    return table


def print_summary(console: Console, result: installer.InstallResult) -> None:
    console.print(summary_table(result.stages, result.comparisons))
    console.print(
        f"recipe {result.recipe.name} ({result.info.path} path) on lab {result.info.lab}: "
        f"{result.info.seconds:.0f} s; reports: {result.junit}, {result.report}",
        markup=False,
        soft_wrap=True,
    )
    if result.failure:
        # Plain text: the resume command must stay on one line, to be copied as it is.
        console.file.write(result.failure + "\n")
        console.file.flush()


def cmd_run(args: argparse.Namespace, console: Console) -> int:
    from labbuilder.api import facade as api

    lab = selected_lab(args, Sizes.FLAG)
    selection = selection_from(args)
    if args.keep and args.repeat > 1:
        raise UsageError(
            "--keep keeps one lab; it cannot be combined with --repeat",
            "leave out --keep, or --repeat",
        )
    check_optional_stages(lab, selection)  # a bad recipe or stage fails before `up`
    installer.dry_run(lab, selection)  # so do --from, --until and --only
    stamp = time.strftime("%Y%m%dT%H%M%S")
    report_dir = args.report_dir or state_root() / "runs" / f"{lab.name}-{stamp}"
    try:
        report_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(
            f"--report-dir {report_dir}: cannot make the folder: {err.strerror}",
            "give a folder labbuilder can write",
        ) from None
    runs: list[dict[str, object]] = []
    status = 0
    progress = Console(stderr=True, emoji=False, highlight=False, markup=False)

    def summary() -> None:
        passed = sum(1 for run in runs if run["passed"])
        if args.json:
            console.print_json(json.dumps({"lab": lab.name, "passed": passed, "runs": runs}))
        else:
            console.print(f"{passed} of {len(runs)} runs passed; reports in {report_dir}")

    for number in range(1, args.repeat + 1):
        progress.print(f"run {number}/{args.repeat}: up")
        started = time.monotonic()
        since = time.time()
        marks = log_marks(lab)
        target = report_dir / f"run-{number}" if args.repeat > 1 else report_dir
        up_seconds: float | None = None
        try:
            up = up_watched(lab, auto_subnets=args.auto_subnets)
            up_seconds = up.seconds
            result = run_install(lab, selection, json_output=args.json)
        except BaseException as err:
            # Whatever stopped the run, its reports (up's, and install's so far) are kept.
            copied = copy_reports(lab, target, since)
            copy_logs(marks, target)
            copy_consoles(lab, target, since)
            err.add_note(f"reports in {target}" if copied else "no report was written")
            if args.always_down and not isinstance(err, KeyboardInterrupt):
                try:
                    api.down(lab)
                except Exception as failed:  # noqa: BLE001 - the first error is the one to show
                    err.add_note(f"taking the lab down failed too: {failed}")
            runs.append(
                {
                    "run": number,
                    "passed": False,
                    "error": error_entry(err, "up" if up_seconds is None else "install"),
                    "up_seconds": None if up_seconds is None else round(up_seconds, 1),
                    "total_seconds": round(time.monotonic() - started, 1),
                    "reports": str(target),
                    "kept": not args.always_down or isinstance(err, KeyboardInterrupt),
                }
            )
            summary()
            raise
        copy_reports(lab, target, since)
        copy_logs(marks, target)
        copy_consoles(lab, target, since)
        keep = (args.keep and result.ok) or (not result.ok and not args.always_down)
        if not keep:
            api.down(lab)
        runs.append(
            {
                "run": number,
                "passed": result.ok,
                "up_seconds": round(up.seconds, 1),
                "install_seconds": round(result.info.seconds, 1),
                "total_seconds": round(time.monotonic() - started, 1),
                "stages": {stage.name: round(stage.seconds, 1) for stage in result.stages},
                "reports": str(target),
                "kept": keep,
            }
        )
        if not args.json:
            print_summary(console, result)
        if not result.ok:
            status = 1
            if keep:
                console.print(
                    f"the lab is kept for inspection: `labbuilder ssh {lab_option(lab)} NODE`, "
                    f"`labbuilder down {lab_option(lab)}` when done"
                )
                break
    summary()
    return status


def cmd_up_install(args: argparse.Namespace, console: Console) -> int:
    """``up --install``: one ``run --keep``. Bring the lab up, install its recipe (the core path
    to a launched instance, and the optional stages the lab file selects), keep the lab whether
    the install passes or fails, and say where the reports are."""
    defaults: dict[str, object] = {"recipe": None, "start": None, "until": None, "only": []}
    defaults |= {"optional": [], "faithful": False, "force": False, "no_snapshots": False}
    defaults |= {"repeat": 1, "keep": True, "always_down": False, "report_dir": None}
    run_args = argparse.Namespace(**{**vars(args), **defaults})
    status = cmd_run(run_args, console)
    if status == 0 and not args.json:
        lab = selected_lab(args, Sizes.FLAG)
        console.print(
            f"lab {lab.name} is up with recipe {lab.recipe} installed: "
            f"`labbuilder ssh {lab_option(lab)} controller`, `labbuilder down {lab_option(lab)}` "
            "when done",
            markup=False,
            soft_wrap=True,
        )
    return status


def log_marks(lab: Lab) -> dict[Path, int]:
    """The lab's ``up`` and ``install`` logs, each with its size now (where a run begins)."""
    logs = (up_log_path(lab.name), lab_state(lab.name).directory / "logs" / "install.log")
    marks: dict[Path, int] = {}
    for log in logs:
        try:
            marks[log] = log.stat().st_size if log.is_file() and not log.is_symlink() else 0
        except OSError:
            marks[log] = 0
    return marks


def copy_reports(lab: Lab, target: Path, since: float) -> list[Path]:
    """Copy the reports of the lab written since ``since`` (epoch seconds) to ``target``:
    ``up-<time>``/``install-<time>`` as they are, and the newest as ``up-latest`` and
    ``latest`` (install), in JUnit XML and JSON."""
    folders = {"up": up_reports_dir(lab.name), "install": lab_state(lab.name).directory / "reports"}
    copied: list[Path] = []
    target.mkdir(parents=True, exist_ok=True)
    for kind, latest in (("up", "up-latest"), ("install", "latest")):
        for suffix in (".xml", ".json"):
            found = sorted(
                path
                for path in folders[kind].glob(f"{kind}-*{suffix}")
                if not path.is_symlink()
                and path.stem != "up-latest"
                and path.stat().st_mtime >= since - 1
            )
            for path in found:
                shutil.copy2(path, target / path.name)
                copied.append(target / path.name)
            if found:
                shutil.copy2(found[-1], target / f"{latest}{suffix}")
    return copied


def cmd_recipe_list(args: argparse.Namespace, console: Console) -> int:
    recipes = [load_recipe(name) for name in recipe_names()]
    if args.json:
        console.print_json(
            json.dumps(
                [
                    {
                        "name": r.name,
                        "description": r.description,
                        "stages": [s.name for s in r.stages],
                    }
                    for r in recipes
                ]
            )
        )
        return 0
    table = plain_table("install recipes", ("recipe", "stages", "description"))
    for recipe in recipes:
        stages = ", ".join(s.name for s in recipe.stages)
        add_plain_row(table, recipe.name, stages, recipe.description)
    console.print(table)
    return 0


def cmd_recipe_show(args: argparse.Namespace, console: Console) -> int:
    recipe = load_recipe(args.name)
    if args.json:
        console.print_json(
            json.dumps(
                {
                    "name": recipe.name,
                    "digest": recipe.digest,
                    "stages": [
                        {
                            "name": stage.name,
                            "guide": stage.guide,
                            "optional": stage.optional,
                            "networking": stage.networking,
                            "steps": [
                                {"name": step.name, "roles": list(step.roles), "guide": step.guide}
                                for step in stage.steps
                            ],
                        }
                        for stage in recipe.stages
                    ],
                }
            )
        )
        return 0
    console.print(f"{recipe.name}: {recipe.description}\nfollows: {recipe.guide}", markup=False)
    for stage in recipe.stages:
        flags = [f for f, on in (("optional", stage.optional),) if on]
        if stage.networking:
            flags.append(f"{stage.networking} networking only")
        extra = f" [{', '.join(flags)}]" if flags else ""
        console.print(f"\nstage {stage.name}: {stage.title} ({stage.guide}){extra}", markup=False)
        for step in stage.steps:
            marks = " (internet)" if step.internet else ""
            marks += " (api)" if step.api else ""
            console.print(
                f"  {step.name:<22} {','.join(step.roles):<22} {step.guide}{marks}", markup=False
            )
    return 0
