"""``recipe``: list the built-in recipes, show a recipe's stages and steps, and (from
``labbuilder.cli.coverage``) how faithfully it follows its guide."""

from __future__ import annotations

import argparse
import json

from rich.console import Console

from labbuilder.cli import coverage
from labbuilder.cli.common import (
    Subparsers,
    add_plain_row,
    plain_table,
)
from labbuilder.recipe.files import load_recipe, recipe_names


def register(commands: Subparsers) -> None:
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
