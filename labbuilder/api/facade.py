"""What the CLI does, as functions usable from Python: load a lab, plan it, bring it up, ..."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labbuilder.adapters import hostprobe, netns, relay
from labbuilder.adapters import libvirt as lv
from labbuilder.api import up as bringup
from labbuilder.api.up import UpResult
from labbuilder.common.errors import UsageError
from labbuilder.common.paths import state_root
from labbuilder.host import probecache
from labbuilder.host.facts import gather_host_facts
from labbuilder.host.probe import HostProbe
from labbuilder.lab.check import check_lab_recipe
from labbuilder.lab.files import builtin_lab_names, load_builtin_lab, load_lab_file
from labbuilder.lab.planner import plan
from labbuilder.lifecycle import status as labstatus
from labbuilder.lifecycle import teardown
from labbuilder.lifecycle.state import gateway_namespace as state_gateway_namespace
from labbuilder.lifecycle.state import lab_state, load_state_record, write_state_file
from labbuilder.lifecycle.status import LabStatus
from labbuilder.lifecycle.teardown import Removed
from labbuilder.model.lab import HostFacts, Lab, Plan
from labbuilder.recipe.files import load_recipe
from labbuilder.recipe.sizes import fit_lab

DEFAULT_LAB = "guide-3node"


def load_lab(
    path: Path | None = None,
    name: str | None = None,
    *,
    allow_small: bool = False,
    recipe: str | None = None,
    check_recipe: bool = True,
) -> Lab:
    """A lab from a file, or a built-in lab by name (``guide-3node`` when neither is given).

    ``allow_small`` turns node sizes below the guide's (and the recipe's) minimums into
    warnings. An empty name is refused: it never means the default lab. The lab is checked
    against the recipe that will install it (``recipe``, as `install --recipe` names it, else
    the lab's own): its ``options.stages``, its controller, its networking variant, and its
    node sizes (a size the lab leaves out is raised to the recipe's minimum for the node's
    role); ``check_recipe=False`` skips that for commands that install nothing (``down`` must
    remove a lab whose file no longer suits its recipe)."""
    if path is not None and name is not None:
        raise UsageError("give a lab file or --lab NAME, not both")
    if name is not None and not name.strip():
        raise UsageError(f"the lab's name {name!r} is empty", "give a built-in lab's name")
    if path is not None:
        if not str(path).strip():
            raise UsageError("the lab file's path is empty", "give a lab file's path")
        lab = load_lab_file(path, force=allow_small)
    else:
        lab = load_builtin_lab(name or DEFAULT_LAB, force=allow_small)
    if check_recipe:
        installing = load_recipe(recipe or lab.recipe)
        check_lab_recipe(lab, installing)
        lab = fit_lab(lab, installing, allow_small=allow_small)
    return lab


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


def up(
    lab: Lab,
    *,
    auto_subnets: bool = False,
    log: Callable[[str], None] | None = None,
    on_rung: Callable[[str, str, float], None] | None = None,
    timeouts: dict[str, float] | None = None,
    from_template: str | None = None,
) -> UpResult:
    """Bring the lab up (see ``labbuilder.api.up``), or stamp it from a template."""
    return bringup.up(
        lab,
        auto_subnets=auto_subnets,
        log=log,
        on_rung=on_rung,
        timeouts=timeouts,
        from_template=from_template,
    )


def down(lab: Lab) -> Removed:
    return teardown.down(lab.name, lab.libvirt_uri)


def status(lab: Lab) -> LabStatus:
    return labstatus.lab_status(lab.name, lab.libvirt_uri, lab_state(lab.name))


def ssh_config(lab: Lab) -> str:
    return labstatus.render_ssh_config(lab_state(lab.name))


def write_ssh_config(lab: Lab) -> Path:
    """Write the lab's ssh_config into its state directory and return the file's path."""
    state = lab_state(lab.name)
    write_state_file(state.ssh_config_path, labstatus.render_ssh_config(state))
    return state.ssh_config_path


def node_domain(lab: Lab, node: str) -> str:
    """The libvirt domain of a node of a lab that is up."""
    for entry in labstatus.lab_status(lab.name, lab.libvirt_uri, lab_state(lab.name)).nodes:
        if entry.name == node:
            return entry.domain
    raise UsageError(f"lab {lab.name} has no node {node!r} on this host")


def labs_on_host(uri: str) -> dict[str, dict[str, int]]:
    with lv.LibvirtHypervisor.open(uri) as hypervisor:
        return teardown.labs_on_host(hypervisor)


def gc(uri: str, match: str = "*") -> dict[str, Removed]:
    return teardown.gc(uri, match)


def gc_templates(uri: str) -> list[str]:
    return teardown.gc_templates(uri)


def doctor(uri: str) -> HostProbe:
    """Probe the host afresh (and remember the result for `up` until the host reboots)."""
    return probecache.probe(uri, fresh=True)


def enable_ksm() -> list[str]:
    """Start KSM; the commands it ran ([] when it ran already)."""
    return hostprobe.enable_ksm(dry_run=False)


def enable_nested(uri: str, *, kvm_works: bool, dry_run: bool) -> list[str]:
    return hostprobe.enable_nested(dry_run=dry_run, uri=uri, kvm_works=kvm_works)


# --- an isolated lab's gateway ----------------------------------------------------------------


def _up_record(lab_name: str) -> dict[str, Any]:
    record = load_state_record(teardown.lab_state_of(lab_name))
    if record is None:
        raise UsageError(
            f"lab {lab_name} is not up on this host", "bring it up with `labbuilder up`"
        )
    return record


def gateway_namespace(lab_name: str) -> str | None:
    """The gateway namespace of a lab that is up (None: its gateways are on the host)."""
    return state_gateway_namespace(_up_record(lab_name))


def node_address(lab_name: str, node: str) -> str:
    """A node's management address, from the plan its lab came up with."""
    for entry in _up_record(lab_name)["plan"]["nodes"]:
        if entry["name"] == node:
            return str(next(nic["address"] for nic in entry["nics"] if nic["address"]))
    raise UsageError(f"lab {lab_name} has no node {node!r}", "`labbuilder status` lists its nodes")


def relay_stdio(lab_name: str, host: str, port: int) -> None:
    """Relay standard input and output to ``host``:``port`` of the lab (ssh's ProxyCommand)."""
    relay.pipe_stdio(relay.open_node(gateway_namespace(lab_name), host, port))


def forward(lab_name: str, node: str, port: int, listen: tuple[str, int]) -> relay.Forward:
    """A port on the host relayed to ``node``:``port`` of the lab (serve it, then close it)."""
    namespace = gateway_namespace(lab_name)
    address = node_address(lab_name, node)
    try:
        return relay.Forward(listen, namespace, address, port)
    except OSError as err:
        raise UsageError(
            f"cannot listen on {listen[0]}:{listen[1]}: {err.strerror}",
            "choose another port with --port",
        ) from None


def enter_gateway(lab_name: str) -> None:
    """Move this process into the lab's gateway namespace (before it runs a command there)."""
    namespace = gateway_namespace(lab_name)
    if namespace is None:
        raise UsageError(
            f"lab {lab_name} is not isolated: its gateways are on this host",
            "run the command on the host itself",
        )
    netns.enter(namespace)
