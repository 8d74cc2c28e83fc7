"""What a recipe needs of a lab's nodes: each role's minimum vCPUs, memory and root disk.

A recipe declares them per role (``min_vcpus``, ``min_memory``, ``min_disk`` under
``[roles.<role>]`` in its recipe.toml): the sizes its services were measured to need, where the
guide's minimums are too small. ``fit_lab`` gives every node whose lab file leaves a size out the
larger of the guide's default and the recipe's minimum (so the default lab is one the recipe can
install), and refuses a size the lab file sets below the recipe's minimum (``allow_small``: a
warning instead). ``check_plan`` checks the sizes of a lab that is up (its saved plan) before
``install`` runs. Pure functions: no I/O.
"""

from __future__ import annotations

from dataclasses import replace

from labbuilder.common.errors import LabFileError, UsageError
from labbuilder.common.sizes import format_size
from labbuilder.model.lab import Lab, NodeSpec, Plan, PlannedNode
from labbuilder.recipe.model import Recipe

SIZE_KEYS = ("vcpus", "memory", "disk")


def role_minimum(recipe: Recipe, role: str) -> dict[str, int]:
    """The sizes ``recipe`` declares for a node of ``role`` (only those it declares)."""
    image = recipe.role_image(role)
    declared = {"vcpus": image.min_vcpus, "memory": image.min_memory, "disk": image.min_disk}
    return {key: value for key, value in declared.items() if value is not None}


def show_size(key: str, value: int) -> str:
    """A size as a lab file writes it: vCPUs as a number, memory and disk with a unit."""
    return str(value) if key == "vcpus" else format_size(value)


def shortfall(recipe: Recipe, role: str, path: str, key: str, value: int, least: int) -> str:
    """``nodes.controller.memory = 2 GB is below recipe R's minimum for role controller (5 GB)``."""
    wanted = f"{least} vCPUs" if key == "vcpus" else format_size(least)
    return (
        f"{path}.{key} = {show_size(key, value)} is below recipe {recipe.name}'s minimum for "
        f"role {role} ({wanted})"
    )


def node_sizes(node: NodeSpec | PlannedNode) -> dict[str, int]:
    if isinstance(node, NodeSpec):
        return {"vcpus": node.vcpus, "memory": node.memory, "disk": node.disk}
    return {"vcpus": node.vcpus, "memory": node.memory, "disk": node.disks[0].size}


def fit_lab(lab: Lab, recipe: Recipe, *, allow_small: bool = False) -> Lab:
    """``lab`` with the sizes its file leaves out raised to ``recipe``'s minimums (recorded in
    each node's ``recipe_minimum``). A size the file sets below them raises ``LabFileError``;
    with ``allow_small`` it becomes one of the lab's warnings."""
    warnings = list(lab.warnings)
    nodes = []
    for node in lab.nodes:
        sizes = node_sizes(node)
        raised = []
        for key, least in role_minimum(recipe, str(node.role)).items():
            if sizes[key] >= least:
                continue
            if key not in node.sized:
                sizes[key] = least
                raised.append(key)
                continue
            problem = shortfall(recipe, str(node.role), node.defined_by, key, sizes[key], least)
            if not allow_small:
                raise LabFileError(
                    f"{lab.source}: {problem}",
                    f"set {node.defined_by}.{key} = {quoted(key, least)} or more, or leave it out "
                    "(a node without a size gets the recipe's minimum); --allow-small lets "
                    "smaller sizes through as warnings",
                )
            warnings.append(f"{lab.source}: {problem}")
        nodes.append(
            replace(
                node,
                vcpus=sizes["vcpus"],
                memory=sizes["memory"],
                disk=sizes["disk"],
                recipe_minimum=tuple(raised),
            )
        )
    return replace(lab, nodes=tuple(nodes), warnings=tuple(warnings))


def quoted(key: str, value: int) -> str:
    return str(value) if key == "vcpus" else f'"{format_size(value)}"'


def check_plan(lab: Lab, recipe: Recipe, plan: Plan, *, bring_up_again: str) -> None:
    """Refuse to install ``recipe`` into a lab that is up (``plan``, as ``up`` saved it) with a
    node below the recipe's minimums, unless ``up --allow-small`` accepted that size (it is one
    of the plan's warnings). ``bring_up_again`` is the command line that selects the lab."""
    paths = {node.name: node.defined_by for node in lab.nodes}
    for node in plan.nodes:
        path = paths.get(node.name, f"nodes.{node.name}")
        sizes = node_sizes(node)
        for key, least in role_minimum(recipe, str(node.role)).items():
            if sizes[key] >= least:
                continue
            problem = shortfall(recipe, str(node.role), path, key, sizes[key], least)
            if any(problem in warning for warning in plan.warnings):
                continue  # `up --allow-small` let it through: the user chose it
            raise UsageError(
                f"{lab.source}: {problem}",
                f"the lab is up at that size: `labbuilder down {bring_up_again}`, then "
                f"`labbuilder up {bring_up_again}` (a node without a size gets the recipe's "
                "minimum; `up --allow-small` keeps smaller sizes, as warnings)",
            )
