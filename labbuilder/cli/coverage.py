"""``recipe coverage``: how faithfully a recipe follows its guide, line by line of the guide."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from rich.console import Console

from labbuilder.api import facade as api
from labbuilder.cli.common import Subparsers
from labbuilder.common.errors import RecipeError
from labbuilder.lab.files import load_builtin_lab
from labbuilder.recipe.coverage import (
    CoverageReport,
    coverage_report,
    parse_coverage_spec,
    report_dict,
)
from labbuilder.recipe.files import load_recipe
from labbuilder.recipe.model import Recipe
from labbuilder.recipe.render import (
    RenderOptions,
    applicable_stages,
    placeholder_secrets,
    render_stages,
)

COVERAGE_FILE = "coverage.toml"
# The labs a recipe is rendered for to match the guide's lines: every role and both networking
# variants, with every optional stage.
REFERENCE_LABS = ("guide-full", "guide-2node-legacy")


def register_actions(actions: Subparsers) -> None:
    """Add ``coverage`` to the ``recipe`` subcommand's actions."""
    coverage = actions.add_parser(
        "coverage",
        help="map each installing line of the guide to the step implementing it",
        description=(
            "Every command and configuration line of the recipe's guide (by line of the guide's "
            "text), with the recipe steps that implement it or the reason it is deliberately "
            "not run as written. Exit code 1 when a line is neither."
        ),
    )
    coverage.add_argument("name", help="a built-in recipe's name or a recipe folder")
    coverage.add_argument("--json", action="store_true", help="machine-readable output")
    coverage.add_argument(
        "--summary", action="store_true", help="only the figures, the deviations and the gaps"
    )
    coverage.set_defaults(handler=cmd_recipe_coverage)


def recipe_coverage(recipe: Recipe) -> CoverageReport:
    """Read the recipe's coverage.toml and guide text; check the text is the one it counts."""
    folder = Path(recipe.directory)
    spec_path = folder / COVERAGE_FILE
    if not spec_path.is_file():
        raise RecipeError(
            f"recipe {recipe.name} has no {COVERAGE_FILE}",
            "a recipe's coverage.toml names its guide's text and its deviations",
        )
    spec = parse_coverage_spec(spec_path.read_text(encoding="utf-8"), str(spec_path))
    seed_path = folder / spec.seed
    try:
        data = seed_path.read_bytes()
    except OSError as err:
        raise RecipeError(f"{spec_path}: cannot read the guide {seed_path}: {err}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != spec.sha256:
        raise RecipeError(
            f"{seed_path}: sha256 {digest} is not the {spec.sha256} {spec_path} counts lines of",
            "the line numbers in the recipe refer to that exact text",
        )
    return coverage_report(recipe, spec, data.decode("utf-8"), reference_texts(recipe))


def reference_texts(recipe: Recipe) -> dict[str, str]:
    """What each step runs (scripts and checks), rendered for the reference labs with the
    guide's placeholder names for secrets, by ``"stage/step"``."""
    texts: dict[str, list[str]] = {}
    optional = tuple(stage.name for stage in recipe.stages if stage.optional)
    options = RenderOptions(secrets=placeholder_secrets(recipe), internet=True)
    for name in REFERENCE_LABS:
        plan = api.plan_lab(load_builtin_lab(name), host_check=False).plan
        stages = applicable_stages(recipe, plan, optional)
        for stage in render_stages(recipe, plan, stages, options):
            for step in stage.steps:
                text = "\n".join([step.script, *(check.command for check in step.checks)])
                for step_name in step.step_names:
                    texts.setdefault(f"{stage.name}/{step_name}", []).append(text)
    return {name: "\n".join(parts) for name, parts in texts.items()}


def cmd_recipe_coverage(args: argparse.Namespace, console: Console) -> int:
    recipe = load_recipe(args.name)
    report = recipe_coverage(recipe)
    if args.json:
        console.print_json(json.dumps(report_dict(report)))
    else:
        sys.stdout.write(render_report(report, recipe, summary=args.summary))
        sys.stdout.flush()
    return 0 if report.complete else 1


def render_report(report: CoverageReport, recipe: Recipe, *, summary: bool = False) -> str:
    """Plain text (one line per guide line; no wrapping: it quotes the guide)."""
    out = [
        f"recipe {report.recipe}: {report.total} installing lines in {report.seed}",
        f"  mapped to steps: {report.count('mapped')}, explained deviations: "
        f"{report.count('explained')}, unmatched: {report.count('unmatched')}, "
        f"missing: {report.count('missing')}: coverage {report.percent:.1f}%",
    ]
    if not summary:
        out += ["", "line   kind          status     guide text  ->  steps"]
        for item in report.lines:
            where = ", ".join(item.steps) or "-"
            if item.unmatched:
                where += f" (does not mention: {', '.join(item.unmatched)})"
            out.append(
                f"L{item.line.number:<5} {item.line.kind:<13} {item.status:<10} "
                f"{item.line.text}  ->  {where}"
            )
    gaps = [item for item in report.lines if item.status in ("missing", "unmatched")]
    if gaps:
        out += ["", "gaps (neither implemented by a step nor explained):"]
        out += [f"  L{item.line.number}: {item.line.text}" for item in gaps]
    out += ["", f"deliberate deviations ({len(report.deviations)}):"]
    for deviation in report.deviations:
        lines = ", ".join(f"L{a}" if a == b else f"L{a}-{b}" for a, b in deviation.lines)
        out.append(f"  {lines}: {deviation.reason}")
    notes = [
        (f"{stage.name}/{step.name}", step.guide, " ".join(step.note.split()))
        for stage in recipe.stages
        for step in stage.steps
        if step.note
    ]
    out += ["", f"step notes: the guide's fixes and the recipe's adaptations ({len(notes)}):"]
    out += [f"  {name} ({guide or 'not in the guide'}): {note}" for name, guide, note in notes]
    if report.unused_references:
        out += ["", "steps whose guide reference names no installing line:"]
        out += [f"  {reference}" for reference in report.unused_references]
    return "\n".join(out) + "\n"
