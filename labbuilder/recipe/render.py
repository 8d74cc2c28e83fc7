"""Render a recipe for one lab: which stages apply, and each step's script per node. Pure.

Every step becomes one bash script per node that runs as root: ``set -euo pipefail``, the guard
(exit 0 means "already done": the script prints ``GUARD_SENTINEL`` and stops), the step's files
written through quoted here-documents and ``install`` (mode, owner), then its commands. The
script's digest (with its checks) is the run-once marker the engine keeps in the guest.

On the fast path, consecutive API steps of a node are merged into one step that creates their
objects from one in-guest Python process (``guestapi.py``, openstacksdk); on the faithful path
each API step runs the guide's own commands.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import jinja2
from jinja2.sandbox import SandboxedEnvironment

from labbuilder.common.errors import RecipeError
from labbuilder.common.quoting import FILTERS, QuotingError
from labbuilder.model.lab import NicRole, Plan, PlannedNode
from labbuilder.recipe.model import (
    ALL_ROLES,
    ApiPath,
    CheckSpec,
    Recipe,
    RenderedCheck,
    RenderedStage,
    RenderedStep,
    StageSpec,
    StepSpec,
)

GUARD_SENTINEL = "LABBUILDER-GUARD-SATISFIED"
MARKER_DIR = "/var/lib/labbuilder/steps"
GUEST_API_PATH = "/usr/local/lib/labbuilder/guestapi.py"
WARM_PYTHON_PATH = "/usr/local/lib/labbuilder/warmpython.py"
_HEREDOC = "LABBUILDER_EOF"


@dataclass(frozen=True)
class RenderOptions:
    """What the lab and the host add to a recipe's settings."""

    secrets: Mapping[str, str]  # name -> value; placeholders for --dry-run
    internet: bool = False
    virt_type: str = "qemu"
    ntp_servers: tuple[str, ...] = ()
    apt_proxy: str | None = None
    path: ApiPath = ApiPath.FAST
    guest_api_source: str = ""  # the text of guestapi.py, written to the guest on the fast path
    optional_stages: tuple[str, ...] = ()  # optional stages the lab selects (and --with adds)


def placeholder_secrets(recipe: Recipe) -> dict[str, str]:
    """The guide's way of writing secrets (``KEYSTONE_DBPASS``): for --dry-run and golden tests."""
    return {name: name for name in recipe.secret_names}


# --- stage selection --------------------------------------------------------------------------


def applicable_stages(
    recipe: Recipe, plan: Plan, optional: Sequence[str] = ()
) -> tuple[StageSpec, ...]:
    """The stages that apply to this lab, in order: networking variant, roles, optional ones.

    A name in ``optional`` (``options.stages``, ``install --with``) that is not an optional
    stage of ``recipe`` is refused, never ignored."""
    choices = [stage.name for stage in recipe.stages if stage.optional]
    for name in optional:
        if name not in choices:
            raise RecipeError(
                f"stage {name!r} (options.stages or --with) is not an optional stage of recipe "
                f"{recipe.name}",
                f"optional stages of {recipe.name}: {', '.join(choices) or 'none'}",
            )
    roles = {str(node.role) for node in plan.nodes}
    chosen = []
    for stage in recipe.stages:
        if stage.networking is not None and stage.networking != str(plan.networking):
            continue
        if stage.requires_roles and not set(stage.requires_roles) <= roles:
            continue
        if stage.optional and stage.name not in optional:
            continue
        chosen.append(stage)
    return tuple(chosen)


def select_stages(
    stages: Sequence[StageSpec],
    *,
    start: str | None = None,
    until: str | None = None,
    only: Sequence[str] = (),
    recipe: Recipe,
) -> tuple[StageSpec, ...]:
    """Apply ``--from``, ``--until`` and ``--only`` (names checked against the recipe)."""
    known = [stage.name for stage in recipe.stages]
    names = [stage.name for stage in stages]
    for flag, value in (("--from", start), ("--until", until), *(("--only", o) for o in only)):
        if value is None:
            continue
        if value not in known:
            raise RecipeError(
                f"{flag} {value}: recipe {recipe.name} has no stage {value!r}",
                f"stages: {', '.join(known)}",
            )
        if value not in names and flag != "--only":
            raise RecipeError(
                f"{flag} {value}: stage {value!r} does not apply to this lab",
                f"stages for this lab: {', '.join(names)}",
            )
    if only:
        by_name = {stage.name: stage for stage in recipe.stages}
        return tuple(by_name[name] for name in known if name in only)
    if not names:  # no stage applies to this lab (an optional-only recipe, say)
        return ()
    first = names.index(start) if start else 0
    last = names.index(until) if until else len(names) - 1
    if first > last:
        raise RecipeError(f"--from {start} comes after --until {until} in recipe {recipe.name}")
    return tuple(stages[first : last + 1])


# --- rendering --------------------------------------------------------------------------------


def render_stages(
    recipe: Recipe, plan: Plan, stages: Sequence[StageSpec], options: RenderOptions
) -> tuple[RenderedStage, ...]:
    env = _environment(recipe)
    base = _context(recipe, plan, options)
    return tuple(_render_stage(env, recipe, plan, stage, base, options) for stage in stages)


def _environment(recipe: Recipe) -> jinja2.Environment:
    """A sandboxed jinja environment: a recipe's templates can read the values they are given
    and nothing else on the host (no attribute walks to Python internals). Lab values are
    written through one filter per destination: ``shell``, ``aptconf``, ``ini``, ``chrony``,
    ``yaml`` (``labbuilder.common.quoting``)."""
    env = SandboxedEnvironment(
        loader=jinja2.DictLoader(dict(recipe.templates)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,  # noqa: S701 - shell scripts and config files, not HTML
    )
    env.filters.update(FILTERS)
    return env


def node_context(plan: Plan, node: PlannedNode) -> dict[str, Any]:
    by_network = {nic.network: nic for nic in node.nics}
    roles = {net.name: net.role for net in plan.networks}

    def nic_for(role: NicRole) -> Any:
        return next((nic for name, nic in by_network.items() if roles[name] == role), None)

    management, tunnel, external = (
        nic_for(NicRole.MANAGEMENT),
        nic_for(NicRole.TUNNEL),
        nic_for(NicRole.EXTERNAL),
    )
    return {
        "name": node.name,
        "role": str(node.role),
        "vcpus": node.vcpus,
        "memory_mb": node.memory // (1024 * 1024),
        "address": node.management_address,
        "management_interface": management.device if management else None,
        "tunnel_address": tunnel.address if tunnel else None,
        "tunnel_interface": tunnel.device if tunnel else None,
        "external_interface": external.device if external else None,
        "disks": [{"device": d.device, "purpose": d.purpose} for d in node.disks],
    }


def _context(recipe: Recipe, plan: Plan, options: RenderOptions) -> dict[str, Any]:
    nodes = [node_context(plan, node) for node in plan.nodes]
    by_role: dict[str, list[dict[str, Any]]] = {}
    for node in nodes:
        by_role.setdefault(node["role"], []).append(node)
    networks = {}
    for net in plan.networks:
        networks[str(net.role)] = {
            "cidr": net.cidr,
            "netmask": net.netmask,
            "gateway": net.gateway,
            "prefix": int(net.cidr.split("/")[1]),
            "floating_start": net.floating_range[0] if net.floating_range else None,
            "floating_end": net.floating_range[1] if net.floating_range else None,
        }
    settings = dict(recipe.settings)
    settings.update(
        internet=options.internet,
        virt_type=options.virt_type,
        ntp_servers=list(options.ntp_servers),
        apt_proxy=options.apt_proxy,
        api_path=str(options.path),
    )
    return {
        "api_python": api_python(options.path),
        "lab": {"name": plan.lab, "networking": str(plan.networking)},
        "nodes": nodes,
        "roles": by_role,
        "controller": by_role["controller"][0] if by_role.get("controller") else None,
        "hosts": [{"address": address, "name": name} for address, name in plan.hosts],
        "networks": networks,
        "secrets": dict(options.secrets),
        # a role's packages in this lab: its own and those of the optional stages it selects
        "packages": {
            role: list(recipe.role_image(role, options.optional_stages).packages)
            for role, _ in recipe.roles
        },
        "settings": settings,
    }


def api_python(path: ApiPath) -> str:
    """The ``python3`` that recipes' openstacksdk code runs with (``{{ api_python }}``): on the
    fast path the warm one (labbuilder/warmpython.py, which the engine puts on every node), whose
    imports are done once per node, not once per call; on the faithful path plain python3."""
    return f"python3 {WARM_PYTHON_PATH}" if path == ApiPath.FAST else "python3"


def _runs_on(step: StepSpec, node: PlannedNode) -> bool:
    return ALL_ROLES in step.roles or str(node.role) in step.roles


def _render_stage(
    env: jinja2.Environment,
    recipe: Recipe,
    plan: Plan,
    stage: StageSpec,
    base: dict[str, Any],
    options: RenderOptions,
) -> RenderedStage:
    rendered: list[RenderedStep] = []
    for node in plan.nodes:
        context = {
            **base,
            "node": node_context(plan, node),
            "stage": stage.name,
            "stage_packages": {
                role: list(image.stage_packages(stage.name).packages)
                for role, image in recipe.roles
            },
        }
        node_steps = [
            _render_step(env, stage, step, node.name, context, options)
            for step in stage.steps
            if _runs_on(step, node)
        ]
        rendered.extend(_merge_api_steps(stage, node_steps, options))
    return RenderedStage(stage.name, stage.title, stage.guide, tuple(rendered))


def _text(env: jinja2.Environment, source: str, context: Mapping[str, Any], what: str) -> str:
    try:
        return env.from_string(source).render(context)
    except jinja2.TemplateError as err:
        raise RecipeError(f"{what}: {type(err).__name__}: {err}") from None
    except QuotingError as err:
        raise RecipeError(f"{what}: {err.message}", err.hint) from None


def _template(env: jinja2.Environment, name: str, context: Mapping[str, Any], what: str) -> str:
    try:
        return env.get_template(name).render(context)
    except jinja2.TemplateError as err:
        raise RecipeError(f"{what}: template {name}: {type(err).__name__}: {err}") from None
    except QuotingError as err:
        raise RecipeError(f"{what}: template {name}: {err.message}", err.hint) from None


@dataclass(frozen=True)
class _Pending:
    """A rendered step plus what the fast path needs to merge API steps."""

    step: RenderedStep
    api: tuple[dict[str, Any], ...]
    prelude: str
    files: tuple[str, ...]  # the step's file writes: the API objects may read them


def _render_step(
    env: jinja2.Environment,
    stage: StageSpec,
    step: StepSpec,
    node: str,
    context: Mapping[str, Any],
    options: RenderOptions,
) -> RenderedStep | _Pending:
    what = f"{stage.source}: step {step.name!r} for node {node}"
    parts = [
        "#!/bin/bash",
        f"# {stage.name}/{step.name} on {node}: {step.title}"
        + (f" ({step.guide})" if step.guide else ""),
        "set -euo pipefail",
        "export DEBIAN_FRONTEND=noninteractive",
    ]
    if step.note:
        parts.extend(f"# note: {line}" for line in step.note.strip().splitlines())
    if step.guard:
        guard = _text(env, step.guard, context, f"{what}, guard").strip()
        parts.append(f"if (\n{guard}\n) >/dev/null 2>&1; then echo {GUARD_SENTINEL}; exit 0; fi")
    files = []
    for spec in step.files:
        if spec.template is not None:
            body = _template(env, spec.template, context, what)
        else:
            body = _text(env, spec.content or "", context, f"{what}, file {spec.path}")
        files.append(write_file_script(spec.path, body, spec.mode, spec.owner, what))
    parts.extend(files)
    if step.run:
        parts.append(_text(env, step.run, context, f"{what}, run").rstrip())
    script = "\n".join(parts) + "\n"
    checks = tuple(
        _render_check(env, check, context, f"{what}, check {check.name!r}", options)
        for check in step.checks
    )
    fetch = []
    for wanted in step.fetch:
        sources = context["roles"].get(wanted.source_role) or []
        if not sources:
            raise RecipeError(
                f"{what}: fetches {wanted.path} from a {wanted.source_role} node, "
                "and the lab has none"
            )
        fetch.append((str(sources[0]["name"]), wanted.path, wanted.mode, wanted.owner))
    skipped = None
    if step.internet and not options.internet:
        skipped = "needs the internet (set options.internet = true in the lab file)"
    rendered = RenderedStep(
        stage=stage.name,
        step=step.name,
        node=node,
        title=step.title,
        guide=step.guide,
        script=script,
        checks=checks,
        after=step.after,
        digest=_digest(script, checks),
        timeout=step.timeout,
        retries=step.retries,
        path=options.path if step.api else None,
        skipped_reason=skipped,
        note=step.note,
        fetch=tuple(fetch),
    )
    if step.api and options.path == ApiPath.FAST:
        api = tuple(_render_api(env, item, context, what) for item in step.api)
        return _Pending(rendered, api, str(context["settings"].get("api_env", "")), tuple(files))
    return rendered


def _render_check(
    env: jinja2.Environment,
    check: CheckSpec,
    context: Mapping[str, Any],
    what: str,
    options: RenderOptions,
) -> RenderedCheck:
    source = check.fast_run if (options.path == ApiPath.FAST and check.fast_run) else check.run
    return RenderedCheck(
        name=check.name,
        command=_text(env, source, context, what).strip(),
        expect=None if check.expect is None else _text(env, check.expect, context, what),
        timeout=check.timeout,
        guide=check.guide,
    )


def _render_api(
    env: jinja2.Environment, item: Mapping[str, Any], context: Mapping[str, Any], what: str
) -> dict[str, Any]:
    def render(value: Any) -> Any:
        if isinstance(value, str):
            return _text(env, value, context, f"{what}, api")
        if isinstance(value, list):
            return [render(v) for v in value]
        if isinstance(value, dict):
            return {k: render(v) for k, v in value.items()}
        return value

    return {key: render(value) for key, value in item.items()}


def write_file_script(
    path: str, body: str, mode: str, owner: str, what: str, delimiter: str = _HEREDOC
) -> str:
    """Shell lines that write ``body`` to ``path`` in a node (whole, then moved into place)."""
    if re.search(rf"^{delimiter}$", body, re.MULTILINE):
        raise RecipeError(f"{what}: file {path} contains the line {delimiter}")
    if not body.endswith("\n"):
        body += "\n"
    user, group = owner.split(":")
    directory = shlex.quote(path.rsplit("/", 1)[0] or "/")
    new = shlex.quote(f"{path}.labbuilder-new")
    return (
        f"install -d {directory}\n"
        f"cat > {new} <<'{delimiter}'\n{body}{delimiter}\n"
        f"install -m {mode} -o {user} -g {group} {new} {shlex.quote(path)}\n"
        f"rm -f {new}"
    )


def _merge_api_steps(
    stage: StageSpec, steps: list[RenderedStep | _Pending], options: RenderOptions
) -> list[RenderedStep]:
    """Consecutive API steps become one step run by one in-guest process (the fast path)."""
    merged: list[RenderedStep] = []
    group: list[_Pending] = []

    def flush() -> None:
        if not group:
            return
        first = group[0].step
        names = [pending.step.step for pending in group]
        ops = [op for pending in group for op in pending.api]
        prelude = group[0].prelude
        payload = json.dumps({"operations": ops}, indent=1, sort_keys=True)
        parts = [
            "#!/bin/bash",
            f"# {stage.name}/{'+'.join(names)} on {first.node}: fast path, one API process "
            f"for: {', '.join(pending.step.title for pending in group)}",
            "set -euo pipefail",
        ]
        if prelude:
            parts.append(f". {prelude}")
        parts.extend(file for pending in group for file in pending.files)
        api_source = options.guest_api_source
        parts.append(write_file_script(GUEST_API_PATH, api_source, "0755", "root:root", ""))
        parts.append(
            f"{api_python(ApiPath.FAST)} {GUEST_API_PATH} <<'{_HEREDOC}'\n{payload}\n{_HEREDOC}"
        )
        script = "\n".join(parts) + "\n"
        checks = tuple(check for pending in group for check in pending.step.checks)
        after = tuple(dict.fromkeys(a for pending in group for a in pending.step.after))
        merged.append(
            replace(
                first,
                step=names[0] if len(names) == 1 else f"{names[0]}..{names[-1]}",
                title="; ".join(pending.step.title for pending in group),
                guide=", ".join(p.step.guide for p in group if p.step.guide),
                script=script,
                checks=checks,
                after=tuple(a for a in after if a not in names),
                digest=_digest(script, checks),
                timeout=max(p.step.timeout for p in group),
                path=ApiPath.FAST,
                covers=tuple(names),
            )
        )
        group.clear()

    for item in steps:
        if isinstance(item, _Pending):
            group.append(item)
        else:
            flush()
            merged.append(item)
    flush()
    return merged


def _digest(script: str, checks: Sequence[RenderedCheck]) -> str:
    blob = json.dumps(
        [script, [[c.name, c.command, c.expect, c.timeout] for c in checks]], sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()
