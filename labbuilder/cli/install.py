"""``install``: a recipe into a lab that is up, stage by stage, with its progress and reports."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table
from rich.text import Text

from labbuilder.api import install as installer
from labbuilder.cli.common import (
    Sizes,
    Subparsers,
    add_lab_arguments,
    add_plain_row,
    lab_option,
    plain_table,
    selected_lab,
)
from labbuilder.cli.watch import InstallWatch, install_estimates, show_tail, watching
from labbuilder.common.errors import UsageError
from labbuilder.common.paths import state_root
from labbuilder.install.engine import StageOutcome, Status
from labbuilder.install.report import Comparison
from labbuilder.lifecycle.state import lab_state
from labbuilder.model.lab import Lab
from labbuilder.recipe.files import load_recipe
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


def add_install_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--recipe", metavar="NAME", help="a built-in recipe or a recipe folder (default: the lab's)"
    )
    parser.add_argument("--from", dest="start", metavar="STAGE", help="start at this stage")
    parser.add_argument("--until", metavar="STAGE", help="stop after this stage")
    parser.add_argument(
        "--only",
        metavar="STAGE",
        action="append",
        default=[],
        help="run only this stage (repeat); its steps done before run their checks again",
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
