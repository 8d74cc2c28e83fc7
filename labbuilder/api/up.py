"""``up``: from a lab to running, reachable nodes — networks, volumes, seeds, domains, readiness.

Idempotent: what exists and matches the plan is kept, what is missing is created, so a running
lab is a no-op and a partial one (say, after a killed ``up``) is completed. If creating the lab
fails and the lab did not exist before, everything made so far is removed again.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from labbuilder.adapters import libvirt as lv
from labbuilder.adapters import netns, processes, storage
from labbuilder.adapters.hypervisor import Domain, Hypervisor, Volume
from labbuilder.catalog.model import BaseImage
from labbuilder.common.errors import PlanError
from labbuilder.common.paths import lab_lock_path, pool_dir, pool_name, state_root
from labbuilder.host import probecache
from labbuilder.host.facts import gather_host_facts
from labbuilder.host.probe import HostProbe
from labbuilder.images.boot import resolve_base_image, resolve_role_image
from labbuilder.lab.planner import plan as make_plan
from labbuilder.lab.planner import through_uplink
from labbuilder.lab.stamp import template_differences, with_template_macs
from labbuilder.lab.view import plan_as_dict
from labbuilder.lifecycle import registry, snapshots, templates
from labbuilder.lifecycle.readiness import NodeNotReadyError, NodeTarget, RungCallback, wait_ready
from labbuilder.lifecycle.render import (
    BootSpec,
    DiskAttachment,
    SeedInput,
    plan_hash,
    render_domain_xml,
    render_network_xml,
    render_seed_files,
)
from labbuilder.lifecycle.seed_iso import build_seed_iso
from labbuilder.lifecycle.state import (
    LabState,
    ensure_host_keys,
    ensure_secrets,
    ensure_ssh_key,
    lab_lock,
    lab_state,
    password_hash,
    write_secret_file,
)
from labbuilder.lifecycle.teardown import remove_lab_objects
from labbuilder.model.lab import Egress, Lab, LibvirtNetworkFact, Plan, PlannedNode
from labbuilder.recipe.files import load_recipe

Log = Callable[[str], None]


@dataclass(frozen=True)
class UpResult:
    plan: Plan
    acceleration: str  # how the guests run: "kvm" or "tcg"
    virt_type: str  # nova's virt_type on the compute nodes
    seconds: float
    rungs: dict[str, dict[str, float]]  # node -> rung -> seconds from its start
    created: bool  # False when the lab was already up
    template: str | None = None  # the template its nodes resumed from


def up(
    lab: Lab,
    *,
    auto_subnets: bool = False,
    log: Log | None = None,
    on_rung: RungCallback | None = None,
    timeouts: dict[str, float] | None = None,
    state: LabState | None = None,
    from_template: str | None = None,
) -> UpResult:
    """Bring the lab up (with ``from_template``, its nodes resume from that template:
    ``stamp``). On a fresh host the work overlaps: the host probe runs beside the role
    images' builds, the networks are made meanwhile, and each node boots as soon as its own image
    is there (network and compute boot while the controller's larger image is still building)."""
    emit = log or (lambda _message: None)
    start = time.monotonic()
    state = state or lab_state(lab.name)
    if from_template is not None:
        return stamp(lab, from_template, auto_subnets=auto_subnets, log=emit, state=state)
    with lab_lock(state, "labbuilder up"):
        gathered = gather_host_facts(lab, state_root())
        plan = make_plan(lab, gathered.facts, auto_subnets=auto_subnets)
        check_registration(lab, state)
        check_ownership(lab, plan)
        digest = plan_hash(plan)
        base = resolve_base_image(lab.image, log=emit)
        hypervisor = lv.LibvirtHypervisor.open(lab.libvirt_uri)
        try:
            existing = hypervisor.domains(lab.name)
            check_same_plan(lab, existing, digest)
            fresh = not existing and not hypervisor.networks(lab.name)
            # Registered before anything is made: a killed `up` leaves what `down`/`gc` find.
            registry.register(lab.name, state.directory, lab.libvirt_uri)
            try:
                outside = through_uplink(plan, gathered.facts)
                probe, rungs = _bring_up(
                    hypervisor, lab, plan, digest, base, state, emit, on_rung, timeouts, outside
                )
            except BaseException:
                if fresh:
                    remove_made(hypervisor, lab, emit)
                raise
        finally:
            hypervisor.close()
    return UpResult(
        plan,
        str(probe.acceleration),
        str(probe.virt_type),
        time.monotonic() - start,
        rungs,
        created=fresh,
    )


def stamp(
    lab: Lab,
    name: str,
    *,
    auto_subnets: bool = False,
    log: Log | None = None,
    state: LabState | None = None,
) -> UpResult:
    """A new lab whose nodes resume, running, from the template ``name``: its own networks
    (and gateway), thin overlays on the template's disks, the template's memory, secrets and
    keys, clocks stepped to the host's. Refused (exit 2) before anything is made if the lab's
    plan or recipe differs from the template's, or if the lab is up already. On failure
    nothing of the lab is left."""
    emit = log or (lambda _message: None)
    start = time.monotonic()
    state = state or lab_state(lab.name)
    template = templates.load_template(name)
    with lab_lock(state, "labbuilder up"):
        gathered = gather_host_facts(lab, state_root())
        plan = make_plan(lab, gathered.facts, auto_subnets=auto_subnets)
        check_template(lab, plan, template)
        plan = with_template_macs(plan, template.plan)
        check_registration(lab, state)
        check_ownership(lab, plan)
        digest = plan_hash(plan)
        hypervisor = lv.LibvirtHypervisor.open(lab.libvirt_uri)
        try:
            if hypervisor.domains(lab.name) or hypervisor.networks(lab.name):
                raise PlanError(
                    f"lab {lab.name} is up already",
                    f"take it down first (`labbuilder down`) to make it from template {name}",
                )
            registry.register(lab.name, state.directory, lab.libvirt_uri)
            try:
                templates.copy_state_into(template, state)
                emit(f"template {name}: lab {template.lab} after stage {template.stage}")
                make_networks(
                    hypervisor, lab, plan, digest, state, emit, through_uplink(plan, gathered.facts)
                )
                pool = hypervisor.ensure_pool(pool_name(), str(pool_dir()))
                templates.stamp_nodes(hypervisor, template, plan, digest, state, pool, log=emit)
                record = templates.stamped_record(
                    template, lab.name, lab.source, plan_as_dict(plan)
                )
                write_secret_file(
                    state.directory / "lab.json", json.dumps(record, indent=1).encode()
                )
                emit("stepping the nodes' clocks to the host's")
                snapshots.sync_clocks(state)
            except BaseException:
                remove_made(hypervisor, lab, emit)
                raise
        finally:
            hypervisor.close()
    return UpResult(
        plan,
        str(template.record.get("acceleration", "")),
        str(template.record.get("virt_type", "")),
        time.monotonic() - start,
        {},
        created=True,
        template=name,
    )


def remove_made(hypervisor: Hypervisor, lab: Lab, emit: Log) -> None:
    """After a failed `up` of a new lab: everything of it removed, its registration too."""
    emit("creating the lab failed; removing what was made")
    remove_lab_objects(hypervisor, lab.name)
    registry.unregister(lab.name)


def check_template(lab: Lab, plan: Plan, template: templates.Template) -> None:
    """Refuse (exit 2, naming the difference) a lab that is not the template's lab under
    another name: nodes, sizes, networks and addresses, the recipe and its digest."""
    differences = template_differences(plan, template.plan)
    recipe = load_recipe(lab.recipe)
    if recipe.name != template.recipe or recipe.digest != template.recipe_digest:
        differences.append(
            f"recipe {recipe.name} (digest {recipe.digest[:12]}) in the lab, {template.recipe} "
            f"(digest {template.recipe_digest[:12]}) in the template"
        )
    if str(template.record.get("image", {}).get("digest", "")) and lab.image != template.plan.image:
        differences.append(f"image {lab.image} in the lab, {template.plan.image} in the template")
    if differences:
        raise PlanError(
            f"lab {lab.name} cannot be made from template {template.name}: "
            + "; ".join(dict.fromkeys(differences)),
            f"use a lab file with the plan of lab {template.lab} (`labbuilder template show "
            f"{template.name}`), or save a template from a lab of this plan",
        )


def _bring_up(
    hypervisor: Hypervisor,
    lab: Lab,
    plan: Plan,
    digest: str,
    base: BaseImage,
    state: LabState,
    emit: Log,
    on_rung: RungCallback | None,
    timeouts: dict[str, float] | None,
    outside: tuple[str, ...] = (),
) -> tuple[HostProbe, dict[str, dict[str, float]]]:
    """The probe and the images in the background, the networks now, each node as soon as its
    image and the probe are there; the probe and each node's rungs. On failure every thread
    is told to stop and has stopped (nothing is created after) before the error goes on."""
    stop = threading.Event()
    contents = node_contents(lab, plan)
    builds = image_builds(lab, plan, contents)
    workers = 1 + max(1, min(len(builds), os.cpu_count() or 1))
    with (
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="image") as builder,
        ThreadPoolExecutor(max_workers=len(plan.nodes), thread_name_prefix="node") as starter,
    ):
        try:
            emit("probing the host")
            probing = builder.submit(probecache.probe, lab.libvirt_uri, kernel=base.kernel)
            first = first_in_line(builds)
            made = {
                content: builder.submit(resolve_build, lab, base, build, emit, content != first)
                for content, build in builds.items()
            }
            node_images: dict[str, Future[BaseImage]] = {}
            for node in plan.nodes:
                content = contents[node.name]
                node_images[node.name] = made[content] if content in made else _done(base)
            made_lab = prepare_lab(hypervisor, lab, plan, digest, base, state, emit, outside)

            def bring(node: PlannedNode) -> dict[str, float]:
                image = node_images[node.name].result()
                probe = probing.result()
                if stop.is_set():
                    raise NodeNotReadyError(f"node {node.name}: stopped before it was created")
                create_node(hypervisor, made_lab, node, probe, image, emit)
                target = NodeTarget(
                    name=node.name,
                    address=node.management_address,
                    mac=node.nics[0].mac,
                    user=base.default_user,
                    key_path=state.key_path,
                    console_log=state.console_log(node.name),
                    namespace=plan.gateway.namespace if plan.gateway else None,
                )
                return wait_ready(
                    hypervisor,
                    node.domain,
                    target,
                    timeouts=timeouts,
                    on_rung=on_rung,
                    stop=stop,
                    note=emit,
                )

            started = {node.name: starter.submit(bring, node) for node in plan.nodes}
            probe = probing.result()
            emit(
                f"guests run under {probe.acceleration}; "
                f"compute nodes use virt_type {probe.virt_type}"
            )
            images = {name: future.result() for name, future in node_images.items()}
            save_state(state, lab, plan, probe, base, images)
            rungs = {name: future.result() for name, future in started.items()}
        except BaseException:
            stop.set()
            builder.shutdown(wait=False, cancel_futures=True)
            raise
    return probe, rungs


def _done(image: BaseImage) -> Future[BaseImage]:
    future: Future[BaseImage] = Future()
    future.set_result(image)
    return future


# A role image's packages, masked units and build script (file name, text).
Content = tuple[tuple[str, ...], tuple[str, ...], tuple[str, str] | None]
NOTHING: Content = ((), (), None)


@dataclass(frozen=True)
class ImageBuild:
    """One distinct role image a lab needs: what it carries and the first role that wants it."""

    role: str
    packages: tuple[str, ...]
    masked_units: tuple[str, ...]
    build_script: tuple[str, str] | None = None


def node_contents(lab: Lab, plan: Plan) -> dict[str, Content]:
    """What each node's image adds to the lab's image (nothing without ``options.role_images``),
    from one reading of the recipe."""
    if not lab.options.role_images:
        return {node.name: NOTHING for node in plan.nodes}
    recipe = load_recipe(lab.recipe)
    contents = {}
    for node in plan.nodes:
        wanted = recipe.node_image(str(node.role), lab.options.optional_stages)
        contents[node.name] = (
            tuple(sorted(wanted.packages)),
            tuple(sorted(wanted.masked_units)),
            wanted.build_script,
        )
    return contents


def image_builds(
    lab: Lab, plan: Plan, contents: dict[str, Content] | None = None
) -> dict[Content, ImageBuild]:
    """The distinct role images of the lab (none without ``options.role_images``): roles that
    want the same packages and masked units (network and compute in a recipe that says they
    share an image) share one image, and a role with nothing to add boots the plain image."""
    contents = node_contents(lab, plan) if contents is None else contents
    builds: dict[Content, ImageBuild] = {}
    for node in plan.nodes:
        content = contents[node.name]
        if content != NOTHING and content not in builds:
            builds[content] = ImageBuild(str(node.role), *content)
    return builds


def first_in_line(builds: dict[Content, ImageBuild]) -> Content | None:
    """The role image the lab waits for longest (the one with a build script and the most
    packages: the controller's): built at normal CPU priority, the others yield to it."""
    if not builds:
        return None
    return max(builds, key=lambda c: (builds[c].build_script is not None, len(c[0])))


def resolve_build(
    lab: Lab, base: BaseImage, build: ImageBuild, emit: Log, yielding: bool = False
) -> BaseImage:
    with processes.yielding() if yielding else contextlib.nullcontext():
        return resolve_role_image(
            lab.image,
            role=build.role,
            packages=build.packages,
            masked_units=build.masked_units,
            build_script=build.build_script,
            libvirt_uri=lab.libvirt_uri,
            log=emit,
        )


def check_registration(lab: Lab, state: LabState) -> None:
    """Refuse to bring up a lab that is up on this host with its state elsewhere (another
    ``$LABBUILDER_STATE_DIR``): its nodes trust that state's keys, not this one's."""
    try:
        entry = registry.registration(lab.name)
    except ValueError as err:
        raise PlanError(str(err), "remove that file if no lab of that name exists") from None
    if entry is None or entry.state_dir == state.directory.absolute() or not entry.has_state:
        return
    raise PlanError(
        f"lab {lab.name} is up on this host with its state in {entry.state_dir}, not in "
        f"{state.directory}",
        "run labbuilder with the LABBUILDER_STATE_DIR that lab was made with, or "
        "`labbuilder down` it there first",
    )


def check_ownership(lab: Lab, plan: Plan) -> None:
    """Refuse (``PlanError``, exit 2) a plan whose names are taken on the host by something
    that is not this lab's: a network, domain, bridge or storage pool of that name. Volumes
    live in labbuilder's own pool and are the lab's by their names (``<lab>__...``), so the
    pool is what is checked for them."""
    with lv.LibvirtHypervisor.open(lab.libvirt_uri, readonly=True) as hypervisor:
        for net in plan.networks:
            network = hypervisor.network(net.libvirt_name)
            if network is not None:
                lv.refuse_foreign("network", net.libvirt_name, network.xml, lab.name)
        for node in plan.nodes:
            domain = hypervisor.domain(node.domain)
            if domain is not None:
                lv.refuse_foreign("domain", node.domain, domain.xml, lab.name)
        check_bridges(lab, plan, hypervisor.network_facts())
        hypervisor.refuse_foreign_pool(pool_name(), str(pool_dir()))
    if lab.options.isolated:
        netns.check_host()
    if lab.options.egress != Egress.NAT and not lab.options.isolated:
        from labbuilder.adapters import firewall

        firewall.check_lab_chain(lab.name)


def check_bridges(lab: Lab, plan: Plan, networks: tuple[LibvirtNetworkFact, ...]) -> None:
    """A planned bridge held by another owner's libvirt network, or (on this host) by an
    interface that no libvirt network of the lab made, is refused."""
    local = urlsplit(lab.libvirt_uri).hostname in (None, "", "localhost")
    for net in plan.networks:
        holders = [n for n in networks if n.bridge == net.bridge]
        for holder in holders:
            if holder.lab != lab.name:
                owner = f"labbuilder's lab {holder.lab}" if holder.lab else "not labbuilder"
                raise PlanError(
                    f"bridge {net.bridge} of network {net.libvirt_name} is held by network "
                    f"{holder.name}, which is not labbuilder's lab {lab.name}: its owner is "
                    f"{owner}",
                    "rename the lab (bridge names derive from the lab's name), or remove "
                    f"network {holder.name}",
                )
        if local and not holders and Path("/sys/class/net", net.bridge).exists():
            raise PlanError(
                f"bridge {net.bridge} of network {net.libvirt_name} exists on the host and "
                f"is not labbuilder's lab {lab.name}: no libvirt network made it",
                "rename the lab (bridge names derive from the lab's name), or remove that "
                "interface",
            )


def check_same_plan(lab: Lab, domains: list[Domain], digest: str) -> None:
    for domain in domains:
        running = domain.metadata.get("plan")
        if running != digest:
            raise PlanError(
                f"lab {lab.name} is up with a different plan than {lab.source} gives now "
                f"(domain {domain.name})",
                "run `labbuilder down` first to rebuild it from the lab file",
            )


@dataclass
class MadeLab:
    """What every node of a lab shares once its networks exist: the pool, the base volumes
    uploaded so far (each once, whichever node needs it first) and the seed's input."""

    lab: Lab
    plan: Plan
    digest: str
    state: LabState
    pool: str
    seed: SeedInput
    volumes: dict[str, tuple[Volume, BootSpec]] = field(default_factory=dict)
    uploading: threading.Lock = field(default_factory=threading.Lock)


def prepare_lab(
    hypervisor: Hypervisor,
    lab: Lab,
    plan: Plan,
    digest: str,
    base: BaseImage,
    state: LabState,
    emit: Log,
    outside: tuple[str, ...] = (),
) -> MadeLab:
    """The lab's networks (existing ones kept), egress rules, storage pool and keys (the seed's
    user is the base image's: a role image is built from it and keeps it)."""
    make_networks(hypervisor, lab, plan, digest, state, emit, outside)
    pool = hypervisor.ensure_pool(pool_name(), str(pool_dir()))
    public_key = ensure_ssh_key(state)
    console_password = ensure_secrets(state, ("console_password",))["console_password"]
    host_keys = ensure_host_keys(state, {node.name: node.management_address for node in plan.nodes})
    state.console_dir.mkdir(parents=True, exist_ok=True)
    seed = SeedInput(
        user=base.default_user,
        password_hash=password_hash(console_password),
        ssh_public_key=public_key,
        apt_proxy=lab.options.apt_proxy,
        host_keys=host_keys,
    )
    return MadeLab(lab, plan, digest, state, pool, seed)


def make_networks(
    hypervisor: Hypervisor,
    lab: Lab,
    plan: Plan,
    digest: str,
    state: LabState,
    emit: Log,
    outside: tuple[str, ...] = (),
) -> None:
    """The lab's networks (existing ones kept), its egress rules, and an isolated lab's
    gateway namespace."""
    for net in plan.networks:
        emit(f"network {net.libvirt_name} ({net.kind}, {net.cidr})")
        xml = owned_xml(render_network_xml(plan, net, digest), state)
        hypervisor.ensure_network(net.libvirt_name, xml, lab=lab.name)
    apply_egress(lab, plan)
    if plan.gateway is not None:
        emit(f"gateway namespace {plan.gateway.namespace} (isolated: no host address)")
        netns.ensure_gateway(
            plan.gateway,
            {net.name: net.bridge for net in plan.networks},
            egress=lab.options.egress,
            allow=lab.options.egress_allow,
            log=state.directory / "logs" / "gateway.log",
            outside=outside,
        )


def create_node(
    hypervisor: Hypervisor,
    made: MadeLab,
    node: PlannedNode,
    probe: HostProbe,
    image: BaseImage,
    emit: Log,
) -> None:
    """A node's disks, seed and domain, started (an existing domain is kept, and started)."""
    lab_name = made.lab.name
    domain = hypervisor.domain(node.domain)
    if domain is None:
        emit(f"node {node.name}: disks, seed and domain")
        with made.uploading:
            if image.volume_stem not in made.volumes:
                emit(f"base image {image.name} ({image.disk.name})")
                made.volumes[image.volume_stem] = upload_base(hypervisor, made.pool, image)
            base_volume, boot = made.volumes[image.volume_stem]
        xml = node_domain_xml(
            hypervisor,
            made.pool,
            made.plan,
            node,
            made.digest,
            probe,
            image,
            base_volume,
            boot,
            made.seed,
            made.state,
        )
        hypervisor.ensure_domain(node.domain, owned_xml(xml, made.state), lab=lab_name)
    elif not domain.active:
        hypervisor.ensure_domain(node.domain, "", lab=lab_name)


def owned_xml(xml: str, state: LabState) -> str:
    """A network's or domain's XML with where its lab keeps its state and lock in its
    labbuilder metadata: host-wide facts for `gc` and `list`, whoever runs them."""
    return lv.with_metadata(
        xml, state=str(state.directory.absolute()), lock=str(lab_lock_path(state.lab))
    )


def upload_base(hypervisor: Hypervisor, pool: str, image: BaseImage) -> tuple[Volume, BootSpec]:
    """The shared, read-only base volume of an image (and its kernel and initrd), uploaded once."""
    stem = image.volume_stem
    volume = hypervisor.ensure_uploaded_file(pool, f"{stem}.qcow2", image.disk)
    boot = BootSpec()
    if image.kernel is not None and image.initrd is not None:
        kernel = hypervisor.ensure_uploaded_file(pool, f"{stem}.vmlinuz", image.kernel)
        initrd = hypervisor.ensure_uploaded_file(pool, f"{stem}.initrd", image.initrd)
        boot = BootSpec(kernel.path, initrd.path, image.cmdline)
    return volume, boot


def node_domain_xml(
    hypervisor: Hypervisor,
    pool: str,
    plan: Plan,
    node: PlannedNode,
    digest: str,
    probe: HostProbe,
    base: BaseImage,
    base_volume: Volume,
    boot: BootSpec,
    seed: SeedInput,
    state: LabState,
) -> str:
    disks = []
    for disk in node.disks:
        name = storage.lab_volume_name(plan.lab, node.name, f"{disk.device}.qcow2")
        if disk.purpose == "root":
            hypervisor.ensure_overlay(pool, name, base_volume, disk.size)
        else:
            hypervisor.ensure_empty_disk(pool, name, disk.size)
        disks.append(DiskAttachment(disk.device, pool, name, "qcow2"))
    # The seed is made anew: a seed left by an interrupted `up` may be incomplete.
    seed_name = storage.lab_volume_name(plan.lab, node.name, "seed.iso")
    if (old := hypervisor.find_volume(pool, seed_name)) is not None:
        hypervisor.delete_volume(old)
    files = render_seed_files(plan, node, digest=digest, seed=seed, flavour=base.cloud_init)
    iso = build_seed_iso(files)
    hypervisor.upload(pool, seed_name, io.BytesIO(iso), len(iso))
    seed_device = f"vd{chr(ord('a') + len(node.disks))}"
    disks.append(DiskAttachment(seed_device, pool, seed_name, "raw", readonly=True))
    compute_passthrough = probe.cpu_passthrough and node.role == "compute"
    return render_domain_xml(
        plan,
        node,
        digest=digest,
        domain_type=probe.domain_type,
        cpu_passthrough=compute_passthrough,
        disks=tuple(disks),
        boot=boot,
        console_log=str(state.console_log(node.name)),
    )


def apply_egress(lab: Lab, plan: Plan) -> None:
    """Host firewall rules for the lab's egress; an isolated lab's are in its namespace."""
    from labbuilder.adapters import firewall

    if plan.gateway is not None:
        firewall.remove_egress(lab.name)
        return
    bridges = [net.bridge for net in plan.networks]
    cidrs = [net.cidr for net in plan.networks]
    firewall.ensure_egress(lab.name, bridges, cidrs, lab.options.egress, lab.options.egress_allow)


def save_state(
    state: LabState,
    lab: Lab,
    plan: Plan,
    probe: HostProbe,
    base: BaseImage,
    images: dict[str, BaseImage],
) -> None:
    """What later commands (ssh, status, install) read back: the plan and the host's facts."""
    by_role = {str(node.role): images[node.name] for node in plan.nodes}
    record = {
        "lab": lab.name,
        "source": lab.source,
        "plan": plan_as_dict(plan),
        "acceleration": str(probe.acceleration),
        "virt_type": str(probe.virt_type),
        "user": base.default_user,
        "image": {"name": base.name, "digest": base.digest},
        "images": {role: image_record(image) for role, image in by_role.items()},
    }
    write_secret_file(state.directory / "lab.json", json.dumps(record, indent=1).encode())


def image_record(image: BaseImage) -> dict[str, Any]:
    """An image as the install report shows it: name, digest and its manifest if it has one."""
    record: dict[str, Any] = {"name": image.name, "digest": image.digest}
    manifest = image.disk.parent / "manifest.json"
    if manifest.is_file():
        data = json.loads(manifest.read_text())
        record["manifest"] = {
            key: data[key]
            for key in ("source", "builder_version", "built", "recipe_hash", "masked_units")
            if key in data
        }
        record["packages"] = len(data.get("packages", {}))
    return record
