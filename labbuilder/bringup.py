"""``up``: from a lab to running, reachable nodes — networks, volumes, seeds, domains, readiness.

Idempotent: what exists and matches the plan is kept, what is missing is created, so a running
lab is a no-op and a partial one (say, after a killed ``up``) is completed. If creating the lab
fails and the lab did not exist before, everything made so far is removed again.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from labbuilder import probecache, registry
from labbuilder.adapters import libvirt as lv
from labbuilder.adapters import storage
from labbuilder.baseimage import BaseImage, resolve_base_image, resolve_role_image
from labbuilder.errors import PlanError
from labbuilder.hostfacts import gather_host_facts
from labbuilder.labstate import (
    LabState,
    ensure_host_keys,
    ensure_secrets,
    ensure_ssh_key,
    lab_lock,
    lab_state,
    password_hash,
    write_secret_file,
)
from labbuilder.model import Egress, Lab, LibvirtNetworkFact, Plan, PlannedNode
from labbuilder.paths import lab_lock_path, pool_dir, pool_name, state_root
from labbuilder.planner import plan as make_plan
from labbuilder.planview import plan_as_dict
from labbuilder.probe import HostProbe
from labbuilder.readiness import NodeTarget, RungCallback, wait_ready
from labbuilder.recipefile import load_recipe
from labbuilder.render import (
    BootSpec,
    DiskAttachment,
    SeedInput,
    plan_hash,
    render_domain_xml,
    render_network_xml,
    render_seed_files,
)
from labbuilder.seed_iso import build_seed_iso
from labbuilder.teardown import remove_lab_objects

Log = Callable[[str], None]


@dataclass(frozen=True)
class UpResult:
    plan: Plan
    probe: HostProbe
    seconds: float
    rungs: dict[str, dict[str, float]]  # node -> rung -> seconds from its start
    created: bool  # False when the lab was already up


def up(
    lab: Lab,
    *,
    auto_subnets: bool = False,
    log: Log | None = None,
    on_rung: RungCallback | None = None,
    timeouts: dict[str, float] | None = None,
    state: LabState | None = None,
) -> UpResult:
    emit = log or (lambda _message: None)
    start = time.monotonic()
    state = state or lab_state(lab.name)
    with lab_lock(state, "labbuilder up"):
        gathered = gather_host_facts(lab, state_root())
        plan = make_plan(lab, gathered.facts, auto_subnets=auto_subnets)
        check_registration(lab, state)
        check_ownership(lab, plan)
        digest = plan_hash(plan)
        base = resolve_base_image(lab.image, log=emit)
        images = role_images(lab, plan, base, emit)
        emit("probing the host")
        probe = probecache.probe(lab.libvirt_uri, kernel=base.kernel)
        emit(
            f"guests run under {probe.acceleration}; compute nodes use virt_type {probe.virt_type}"
        )
        conn = lv.connect(lab.libvirt_uri)
        try:
            existing = lv.owned_domains(conn, lab.name)
            check_same_plan(lab, existing, digest)
            fresh = not existing and not lv.owned_networks(conn, lab.name)
            # Registered before anything is made: a killed `up` leaves what `down`/`gc` find.
            registry.register(lab.name, state.directory, lab.libvirt_uri)
            try:
                domains = create_lab(conn, lab, plan, digest, probe, images, state, emit)
            except BaseException:
                if fresh:
                    emit("creating the lab failed; removing what was made")
                    remove_lab_objects(conn, lab.name)
                    registry.unregister(lab.name)
                raise
            save_state(state, lab, plan, probe, base, images)
            targets = {
                node.name: NodeTarget(
                    name=node.name,
                    address=node.management_address,
                    mac=node.nics[0].mac,
                    user=base.default_user,
                    key_path=state.key_path,
                    console_log=state.console_log(node.name),
                )
                for node in plan.nodes
            }
            with ThreadPoolExecutor(max_workers=len(plan.nodes)) as pool:
                futures = {
                    name: pool.submit(
                        wait_ready, domains[name], target, timeouts=timeouts, on_rung=on_rung
                    )
                    for name, target in targets.items()
                }
                rungs = {name: future.result() for name, future in futures.items()}
        finally:
            conn.close()
    return UpResult(plan, probe, time.monotonic() - start, rungs, created=fresh)


def role_images(lab: Lab, plan: Plan, base: BaseImage, emit: Log) -> dict[str, BaseImage]:
    """Each node's image: its role's image from the lab's recipe, or the lab's plain image.

    Roles that want the same packages share one image (network, compute: chrony only, say);
    the distinct images are made side by side, at most one per host core."""
    images = {node.name: base for node in plan.nodes}
    if not lab.options.role_images:
        return images
    recipe = load_recipe(lab.recipe)
    Content = tuple[tuple[str, ...], tuple[str, ...]]
    roles: dict[Content, str] = {}  # content -> the first role that wants it
    content_of: dict[str, Content] = {}
    for node in plan.nodes:
        wanted = recipe.role_image(str(node.role))
        content = (tuple(sorted(wanted.packages)), tuple(sorted(wanted.masked_units)))
        roles.setdefault(content, str(node.role))
        content_of[node.name] = content

    def resolve(content: Content) -> BaseImage:
        packages, masked_units = content
        return resolve_role_image(
            lab.image,
            role=roles[content],
            packages=packages,
            masked_units=masked_units,
            libvirt_uri=lab.libvirt_uri,
            log=emit,
        )

    workers = max(1, min(len(roles), os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="image") as pool:
        futures = {content: pool.submit(resolve, content) for content in roles}
        made = {content: future.result() for content, future in futures.items()}
    return {name: made[content] for name, content in content_of.items()}


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
    conn = lv.connect(lab.libvirt_uri, readonly=True)
    try:
        for net in plan.networks:
            network = lv.find_network(conn, net.libvirt_name)
            if network is not None:
                lv.refuse_foreign("network", net.libvirt_name, network.XMLDesc(0), lab.name)
        for node in plan.nodes:
            domain = lv.find_domain(conn, node.domain)
            if domain is not None:
                lv.refuse_foreign("domain", node.domain, domain.XMLDesc(0), lab.name)
        check_bridges(lab, plan, lv.network_facts(conn))
        pool = storage.lookup_pool(conn, pool_name())
        if pool is not None:
            storage.refuse_foreign_pool(pool, str(pool_dir()))
    finally:
        conn.close()
    if lab.options.egress != Egress.NAT:
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


def check_same_plan(lab: Lab, domains: list[Any], digest: str) -> None:
    for domain in domains:
        running = lv.lab_metadata(domain.XMLDesc(0)).get("plan")
        if running != digest:
            raise PlanError(
                f"lab {lab.name} is up with a different plan than {lab.source} gives now "
                f"(domain {domain.name()})",
                "run `labbuilder down` first to rebuild it from the lab file",
            )


def create_lab(
    conn: Any,
    lab: Lab,
    plan: Plan,
    digest: str,
    probe: HostProbe,
    images: dict[str, BaseImage],
    state: LabState,
    emit: Log,
) -> dict[str, Any]:
    """Networks, volumes and domains of the lab (existing ones kept); domains by node name."""
    for net in plan.networks:
        emit(f"network {net.libvirt_name} ({net.kind}, {net.cidr})")
        xml = owned_xml(render_network_xml(plan, net, digest), state)
        lv.ensure_network(conn, net.libvirt_name, xml, lab=lab.name)
    apply_egress(lab, plan)

    pool = storage.ensure_pool(conn, pool_name(), str(pool_dir()))
    volumes: dict[str, tuple[Any, BootSpec]] = {}
    for image in {image.volume_stem: image for image in images.values()}.values():
        emit(f"base image {image.name} ({image.disk.name})")
        volumes[image.volume_stem] = upload_base(conn, pool, image)
    base = next(iter(images.values()))

    public_key = ensure_ssh_key(state)
    console_password = ensure_secrets(state, ("console_password",))["console_password"]
    host_keys = ensure_host_keys(state, {node.name: node.management_address for node in plan.nodes})
    seed = SeedInput(
        user=base.default_user,
        password_hash=password_hash(console_password),
        ssh_public_key=public_key,
        apt_proxy=lab.options.apt_proxy,
        host_keys=host_keys,
    )
    state.console_dir.mkdir(parents=True, exist_ok=True)

    def create_node(node: PlannedNode) -> Any:
        domain = lv.find_domain(conn, node.domain)
        if domain is None:
            emit(f"node {node.name}: disks, seed and domain")
            image = images[node.name]
            base_volume, boot = volumes[image.volume_stem]
            xml = node_domain_xml(
                conn, pool, plan, node, digest, probe, image, base_volume, boot, seed, state
            )
            domain = lv.ensure_domain(conn, node.domain, owned_xml(xml, state), lab=lab.name)
        elif not domain.isActive():
            domain = lv.ensure_domain(conn, node.domain, "", lab=lab.name)
        return domain

    # All nodes are created and started together: QEMU's start-up is the slow part.
    with ThreadPoolExecutor(max_workers=len(plan.nodes)) as workers:
        futures = {node.name: workers.submit(create_node, node) for node in plan.nodes}
        return {name: future.result() for name, future in futures.items()}


def owned_xml(xml: str, state: LabState) -> str:
    """A network's or domain's XML with where its lab keeps its state and lock in its
    labbuilder metadata: host-wide facts for `gc` and `list`, whoever runs them."""
    return lv.with_metadata(
        xml, state=str(state.directory.absolute()), lock=str(lab_lock_path(state.lab))
    )


def upload_base(conn: Any, pool: Any, image: BaseImage) -> tuple[Any, BootSpec]:
    """The shared, read-only base volume of an image (and its kernel and initrd), uploaded once."""
    volume = storage.ensure_uploaded_file(conn, pool, f"{image.volume_stem}.qcow2", image.disk)
    boot = BootSpec()
    if image.kernel is not None and image.initrd is not None:
        kernel = storage.ensure_uploaded_file(
            conn, pool, f"{image.volume_stem}.vmlinuz", image.kernel
        )
        initrd = storage.ensure_uploaded_file(
            conn, pool, f"{image.volume_stem}.initrd", image.initrd
        )
        boot = BootSpec(kernel.path(), initrd.path(), image.cmdline)
    return volume, boot


def node_domain_xml(
    conn: Any,
    pool: Any,
    plan: Plan,
    node: PlannedNode,
    digest: str,
    probe: HostProbe,
    base: BaseImage,
    base_volume: Any,
    boot: BootSpec,
    seed: SeedInput,
    state: LabState,
) -> str:
    disks = []
    for disk in node.disks:
        name = storage.lab_volume_name(plan.lab, node.name, f"{disk.device}.qcow2")
        if disk.purpose == "root":
            storage.ensure_overlay(pool, name, base_volume, disk.size)
        else:
            storage.ensure_empty_disk(pool, name, disk.size)
        disks.append(DiskAttachment(disk.device, pool.name(), name, "qcow2"))
    # The seed is made anew: a seed left by an interrupted `up` may be incomplete.
    seed_name = storage.lab_volume_name(plan.lab, node.name, "seed.iso")
    if (old := storage.find_volume(pool, seed_name)) is not None:
        storage.delete_volume(old)
    files = render_seed_files(plan, node, digest=digest, seed=seed, flavour=base.cloud_init)
    iso = build_seed_iso(files)
    storage.upload(conn, pool, seed_name, io.BytesIO(iso), len(iso))
    seed_device = f"vd{chr(ord('a') + len(node.disks))}"
    disks.append(DiskAttachment(seed_device, pool.name(), seed_name, "raw", readonly=True))
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
    from labbuilder.adapters import firewall

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


def load_state_record(state: LabState) -> dict[str, Any] | None:
    path = state.directory / "lab.json"
    if not path.exists():
        return None
    record: dict[str, Any] = json.loads(path.read_text())
    return record
