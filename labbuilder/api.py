"""What the CLI does, as functions usable from Python: load a lab, plan it, ..."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from labbuilder.errors import UsageError
from labbuilder.hostfacts import gather_host_facts
from labbuilder.labfile import builtin_lab_names, load_builtin_lab, load_lab_file
from labbuilder.model import HostFacts, Lab, Plan
from labbuilder.paths import state_root
from labbuilder.planner import plan

DEFAULT_LAB = "guide-3node"


def load_lab(path: Path | None = None, name: str | None = None, *, force: bool = False) -> Lab:
    """A lab from a file, or a built-in lab by name (``guide-3node`` when neither is given)."""
    if path is not None and name is not None:
        raise UsageError("give a lab file or --lab NAME, not both")
    if path is not None:
        return load_lab_file(path, force=force)
    return load_builtin_lab(name or DEFAULT_LAB, force=force)


def list_labs() -> list[Lab]:
    return [load_builtin_lab(name) for name in builtin_lab_names()]


@dataclass(frozen=True)
class PlanResult:
    plan: Plan
    notes: tuple[str, ...]  # host facts that could not be gathered


def plan_lab(lab: Lab, *, auto_subnets: bool = False, host_check: bool = True) -> PlanResult:
    """Plan ``lab`` against this host's facts (or against none with ``host_check=False``)."""
    if not host_check:
        return PlanResult(plan(lab, HostFacts(), auto_subnets=auto_subnets), ())
    gathered = gather_host_facts(lab, state_root())
    return PlanResult(plan(lab, gathered.facts, auto_subnets=auto_subnets), gathered.notes)
