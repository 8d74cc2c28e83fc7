"""Role images from downloaded images: boot the base once under libvirt, install, save the disk.

A downloaded cloud image cannot be changed in a chroot the way a local build is
(``labbuilder.images.build``), so ``bake`` boots it once: a thin overlay on the base, a NoCloud
seed whose scripts (``labbuilder.images.bakeseed``) mask the role's units, install its packages with
apt, report their versions, remove the per-machine identity and power the guest off. The
overlay is then flattened into a compressed qcow2 in the cache:
``<cache>/built/<base>-<role>-<key[:16]>/`` holds ``disk.qcow2``, ``manifest.json`` (source
image and digest, every installed package's version, masked units, bake version and time),
the kernel and initrd when the base boots by direct kernel boot, and the bake's ``console.log``
and ``report.log``. The key (``bakeseed.bake_key``) covers the base's digest, the packages,
the masked units, the size and the guest scripts, so an unchanged bake is a cache hit that
boots nothing.

The guest runs on a temporary NAT network on a free /24, whose DNS answers only the
distribution archive's names and whose firewall rules (``adapters.firewall``, egress
``allow``) let it reach only those addresses. Every temporary libvirt object — domain, network,
overlay and seed volumes — and the firewall rules are named ``lbbake-<key[:10]>`` and carry
that name as their lab in labbuilder's metadata: they are removed when the bake ends, however
it ends, and ``labbuilder gc`` finds them after a crash. The bake is built in a hidden
directory next to its final place and renamed into place when complete.

Needs root on the libvirt host it bakes on (the overlay is read back from the storage pool's
directory), so ``libvirt_uri`` must be a local one.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from labbuilder import __version__
from labbuilder.adapters import firewall, storage
from labbuilder.adapters import libvirt as lv
from labbuilder.adapters.hypervisor import Hypervisor
from labbuilder.adapters.processes import process_alive
from labbuilder.catalog.model import BaseImage, ImageEntry
from labbuilder.common.errors import HostError, ImageError
from labbuilder.common.filelock import file_lock
from labbuilder.common.paths import KERNEL_FILE, built_images_dir, pool_dir, pool_name, state_root
from labbuilder.host import probecache
from labbuilder.host.facts import nameservers, read_routes
from labbuilder.images import rootfs
from labbuilder.images.bakeseed import (
    BAKE_VERSION,
    PREFIX,
    BakeNetwork,
    GuestBoot,
    Report,
    bake_key,
    bake_seed_files,
    check_seed_files,
    domain_xml,
    guest_mac,
    input_problem,
    network_xml,
    parse_report,
)
from labbuilder.images.build import check_root_and_space
from labbuilder.lab.planner import free_subnets
from labbuilder.lifecycle.readiness import console_tail
from labbuilder.lifecycle.seed_iso import build_seed_iso
from labbuilder.lifecycle.state import lab_lock, lab_state
from labbuilder.lifecycle.teardown import remove_lab_objects
from labbuilder.model import guide
from labbuilder.model.lab import Egress, GiB

Log = Callable[[str], None]

MANIFEST_FORMAT = 1
MANIFEST_KIND = "bake"
DISK_FILE = "disk.qcow2"
INITRD_FILE = "initrd.img"
MANIFEST_FILE = "manifest.json"
CONSOLE_FILE = "console.log"
REPORT_FILE = "report.log"
# A guest that prints nothing (console or report) for DEFAULT_TIMEOUT seconds is stuck; one that
# keeps working may take up to MAX_SECONDS (a role's packages under TCG take long).
DEFAULT_TIMEOUT = 900.0
MAX_SECONDS = 4 * 3600.0
MIN_VIRTUAL_SIZE = 4 * GiB  # room for a role's packages; below the guide's 5 GB node disks
POLL = 2.0
# The distribution archives a bake guest may reach, by the catalog's os_family.
ARCHIVE_HOSTS: dict[str, tuple[str, ...]] = {
    "debian": ("deb.debian.org", "security.debian.org"),
    "ubuntu": ("archive.ubuntu.com", "security.ubuntu.com"),
}
# What the guest's finish.sh removes (recorded in the manifest; the script is the authority).
IDENTITY_REMOVED = (
    "/etc/ssh/ssh_host_*",
    "/etc/machine-id (emptied)",
    "/var/lib/dbus/machine-id",
    "/var/lib/cloud/* and /var/log/cloud-init*.log (cloud-init clean --logs)",
    "/var/lib/rabbitmq/.erlang.cookie",
    "/etc/hostname (reset to localhost)",
    "/var/lib/systemd/random-seed",
    "/var/lib/systemd/credential.secret",
    "cloud-init's rendered network configuration",
    "/var/lib/dhcp/*.leases",
    "/var/lib/apt/lists/*",
    "/var/log/journal/*",
)
_PANIC = re.compile(r"Kernel panic|VFS: Unable to mount root|Attempted to kill init")
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BakedImage:
    """A baked role image in the cache: a read-only qcow2 plus, for direct kernel boot, the
    base's kernel and initrd."""

    name: str  # "<base>-<role>"
    role: str
    directory: Path
    disk: Path
    kernel: Path | None
    initrd: Path | None
    cmdline: str | None
    virtual_size: int
    file_size: int
    sha256: str  # of the qcow2 file
    bake_key: str
    masked_units: tuple[str, ...]
    manifest_path: Path
    manifest: Mapping[str, Any] = field(compare=False, repr=False)
    from_cache: bool = False


def archive_hosts(entry: ImageEntry) -> tuple[str, ...]:
    """The archive host names a bake of ``entry`` may reach: its build mirror (if it has a
    recipe) and its distribution's archive and security hosts (both families' if unknown)."""
    hosts = list(ARCHIVE_HOSTS.get(entry.os_family, ()))
    if not hosts:
        hosts = [host for family in ARCHIVE_HOSTS.values() for host in family]
    if entry.build is not None:
        hosts.insert(0, urlsplit(entry.build.mirror).hostname or "")
    return tuple(dict.fromkeys(host for host in hosts if host))


def bake(
    base: BaseImage,
    *,
    role: str,
    packages: Sequence[str],
    masked_units: Sequence[str],
    cache_dir: Path,
    archive: Sequence[str],
    source: Mapping[str, Any],
    libvirt_uri: str = "qemu:///system",
    timeout: float = DEFAULT_TIMEOUT,
    log: Log | None = None,
) -> BakedImage:
    """The role image of ``base`` with ``packages`` installed and ``masked_units`` masked, baked
    now or found in ``cache_dir``'s ``built/`` folder.

    ``archive`` names the hosts the guest may reach (``archive_hosts``); ``source`` is the
    base's provenance for the manifest (url, digest, ...). ``timeout`` is how long the guest
    may print nothing before it is taken to hang. Raises ``ImageError`` naming what failed in
    the guest (a package that is not in its archive, say), with the last console lines when
    the guest did not finish.
    """
    emit = log or _log.info
    name = f"{base.name}-{role}"
    problem = input_problem(role, packages, masked_units)
    if problem is not None:
        raise ImageError(f"role image {name}: {problem}")
    virtual_size = max(_virtual_size(base.disk), MIN_VIRTUAL_SIZE)
    boot = GuestBoot(cmdline=base.cmdline if base.kernel is not None else None)
    key = bake_key(base.digest, packages, masked_units, virtual_size=virtual_size, boot=boot)
    built = built_images_dir(cache_dir)
    final = built / f"{name}-{key[:16]}"
    if (cached := _load_cached(final, key)) is not None:
        emit(f"image {name}: cache hit {final}")
        return cached
    _check_host(built)
    with file_lock(built / f".bake-{name}.lock"):
        if (cached := _load_cached(final, key)) is not None:
            emit(f"image {name}: baked meanwhile by another process: {final}")
            return cached
        _remove_stale_work(built, name)
        work = built / f".bake-{name}-{key[:16]}-{os.getpid()}"
        work.mkdir(mode=0o755)
        try:
            job = _Job(name, role, key, base, virtual_size, work, libvirt_uri, timeout, emit)
            _bake_into(job, packages, masked_units, archive, source)
            if final.exists():
                shutil.rmtree(final)
            work.rename(final)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    emit(f"image {name}: baked {final}")
    return load_baked_image(final, from_cache=False)


def check_image(
    base: BaseImage,
    script: str,
    *,
    libvirt_uri: str = "qemu:///system",
    timeout: float = DEFAULT_TIMEOUT,
    log: Log | None = None,
) -> Report:
    """Boot a throw-away clone of ``base`` once, as a lab node's first boot (a new cloud-init
    instance, no network beyond the host), run the shell ``script`` in it, power it off and
    remove everything. The report's ``output`` holds the script's output lines."""
    emit = log or _log.info
    run_id = f"{PREFIX}check-{secrets.token_hex(4)}"
    work = Path(tempfile.mkdtemp(prefix=f"{run_id}-", dir="/var/tmp"))
    work.chmod(0o755)
    try:
        job = _Job(
            f"{base.name}-check", "check", run_id, base, _virtual_size(base.disk), work,
            libvirt_uri, timeout, emit,
        )  # fmt: skip
        with (
            lv.LibvirtHypervisor.open(libvirt_uri) as hypervisor,
            _temporary_objects(hypervisor, run_id),
        ):
            network = _network(hypervisor, run_id, ())
            files = check_seed_files(
                instance_id=run_id,
                network=network,
                mac=guest_mac(secrets.token_hex(3)),
                flavour=base.cloud_init,
                script=script,
            )
            report, _overlay = _run_guest(hypervisor, job, run_id, network, files)
        if not report.done:
            raise _unfinished(job, "the check boot")
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)


def load_baked_image(directory: Path, *, from_cache: bool = True) -> BakedImage:
    """Read a bake directory's manifest back into a ``BakedImage``."""
    manifest_path = directory / MANIFEST_FILE
    try:
        manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        disk, boot = manifest["disk"], manifest["boot"]
        direct = boot["method"] == "direct-kernel"
        return BakedImage(
            name=manifest["name"],
            role=manifest["role"],
            directory=directory,
            disk=directory / disk["file"],
            kernel=directory / boot["kernel"] if direct else None,
            initrd=directory / boot["initrd"] if direct else None,
            cmdline=boot["cmdline"] if direct else None,
            virtual_size=disk["virtual_size"],
            file_size=disk["file_size"],
            sha256=disk["sha256"],
            bake_key=manifest["bake_key"],
            masked_units=tuple(manifest["masked_units"]),
            manifest_path=manifest_path,
            manifest=manifest,
            from_cache=from_cache,
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ImageError(
            f"cannot read the role image manifest {manifest_path}: {exc}",
            hint=f"remove {directory} and bake the image again",
        ) from exc


def is_bake(directory: Path) -> bool:
    """Whether a folder of ``built/`` holds a baked role image (rather than a local build)."""
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("kind") == MANIFEST_KIND


# --- the bake ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    name: str
    role: str
    key: str
    base: BaseImage
    virtual_size: int
    work: Path
    uri: str
    timeout: float
    log: Log

    @property
    def console(self) -> Path:
        return self.work / CONSOLE_FILE

    @property
    def report(self) -> Path:
        return self.work / REPORT_FILE


def _bake_into(
    job: _Job,
    packages: Sequence[str],
    masked_units: Sequence[str],
    archive: Sequence[str],
    source: Mapping[str, Any],
) -> None:
    started = time.monotonic()
    bake_id = f"{PREFIX}{job.key[:10]}"
    domain_type = _domain_type(job.uri, job.base.kernel)
    disk = job.work / DISK_FILE
    with (
        lv.LibvirtHypervisor.open(job.uri) as hypervisor,
        _temporary_objects(hypervisor, bake_id),
    ):
        network = _network(hypervisor, bake_id, archive)
        files = bake_seed_files(
            instance_id=f"{bake_id}-{job.key[10:16]}",
            network=network,
            mac=guest_mac(job.key),
            flavour=job.base.cloud_init,
            packages=packages,
            masked_units=masked_units,
        )
        guest_started = time.monotonic()
        report, overlay = _run_guest(hypervisor, job, bake_id, network, files, domain_type)
        guest_seconds = time.monotonic() - guest_started
        _check_report(job, report, packages, masked_units)
        job.log(f"image {job.name}: flattening the guest's disk")
        rootfs.run(
            ["qemu-img", "convert", "-f", "qcow2", "-O", "qcow2", "-c",
             "-o", "compression_type=zstd", overlay, disk],
        )  # fmt: skip
    base = job.base
    boot: dict[str, Any] = {"method": "disk"}
    if base.kernel is not None and base.initrd is not None:
        shutil.copyfile(base.kernel, job.work / KERNEL_FILE)
        shutil.copyfile(base.initrd, job.work / INITRD_FILE)
        boot = {
            "method": "direct-kernel",
            "kernel": KERNEL_FILE,
            "initrd": INITRD_FILE,
            "cmdline": base.cmdline,
        }
    manifest = {
        "format": MANIFEST_FORMAT,
        "kind": MANIFEST_KIND,
        "name": job.name,
        "role": job.role,
        "bake_key": job.key,
        "bake_version": BAKE_VERSION,
        "labbuilder_version": __version__,
        "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "build_seconds": round(time.monotonic() - started, 1),
        "guest_seconds": round(guest_seconds, 1),
        "domain_type": domain_type,
        "source": {"base": base.name, "digest": base.digest, **source},
        "os": report.os,
        "arch": report.arch,
        "extra_packages": sorted(set(packages)),
        "installed": {package: report.packages[package] for package in sorted(set(packages))},
        "masked_units": sorted(set(masked_units)),
        "packages": dict(sorted(report.packages.items())),
        "identity_removed": list(IDENTITY_REMOVED),
        "boot": boot,
        "disk": {
            "file": DISK_FILE,
            "format": "qcow2",
            "virtual_size": job.virtual_size,
            "file_size": disk.stat().st_size,
            "sha256": _sha256(disk),
        },
        "logs": {"console": CONSOLE_FILE, "report": REPORT_FILE},
    }
    (job.work / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    job.work.chmod(0o755)
    for path in job.work.iterdir():
        path.chmod(0o444 if path == disk else 0o644)


def _check_report(
    job: _Job, report: Report, packages: Sequence[str], masked_units: Sequence[str]
) -> None:
    """Refuse a bake whose guest did not do everything it was asked to."""
    if report.failures:
        details = "".join(f"\n  {line}" for line in report.logs)
        raise ImageError(
            f"role image {job.name}: the bake failed in the guest: "
            + "; ".join(report.failures)
            + details,
            hint="check the names against the image's archive (`apt-cache policy NAME` in a "
            "guest of the image); the apt errors are above",
        )
    if not (report.installed and report.done):
        raise _unfinished(job, "the bake")
    missing = sorted(set(packages) - set(report.packages))
    if missing:
        raise ImageError(
            f"role image {job.name}: apt-get succeeded, but dpkg lists no {', '.join(missing)}",
            hint="a virtual package name installs another package: name that one instead",
        )
    unmasked = sorted(u for u in set(masked_units) if report.masked.get(u) != "masked")
    if unmasked:
        states = ", ".join(f"{u} is {report.masked.get(u) or 'unknown'}" for u in unmasked)
        raise ImageError(
            f"role image {job.name}: units are not masked in the guest: {states}",
            hint="name each unit in full as systemctl knows it, e.g. 'keystone.service'",
        )
    if report.left:
        raise ImageError(
            f"role image {job.name}: per-machine identity is left in the guest: "
            + ", ".join(report.left),
            hint="the image's clean-up missed these; report it as a labbuilder bug",
        )


def _unfinished(job: _Job, what: str) -> ImageError:
    return ImageError(
        f"image {job.name}: the guest powered off before {what} finished\n"
        f"last console lines ({job.console}):\n{console_tail(job.console)}",
        hint="the base image must run cloud-init from a NoCloud seed and use systemd",
    )


# --- the guest --------------------------------------------------------------------------------


@contextlib.contextmanager
def _temporary_objects(hypervisor: Hypervisor, owner: str) -> Iterator[None]:
    """Remove every object labelled ``owner`` before (a killed run's) and after the body; hold
    ``owner``'s lab lock meanwhile, so that ``labbuilder gc`` leaves them alone."""
    state = lab_state(owner)
    try:
        with lab_lock(state, "a role image bake"):
            try:
                remove_lab_objects(hypervisor, owner)
                yield
            finally:
                try:
                    remove_lab_objects(hypervisor, owner)
                finally:
                    (state.directory / "lock").unlink(missing_ok=True)
    finally:
        with contextlib.suppress(OSError):
            state.directory.rmdir()


def _network(hypervisor: Hypervisor, name: str, archive: Sequence[str]) -> BakeNetwork:
    """A NAT network on a free /24 whose guests reach only the addresses of ``archive``.

    Bakes running side by side (one per role) take turns, so that each sees the other's
    network when it looks for a free subnet."""
    addresses = _resolve(archive)
    lock = state_root() / ".bake-network.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(lock):
        return _create_network(hypervisor, name, addresses)


def _create_network(
    hypervisor: Hypervisor, name: str, addresses: list[tuple[str, str]]
) -> BakeNetwork:
    taken = [route.destination for route in read_routes() if route.destination != "0.0.0.0/0"]
    taken += [cidr for network in hypervisor.network_facts() for cidr in network.cidrs]
    taken += [d.cidr for defaults in guide.NETWORKS.values() for d in defaults]  # labs' own
    taken += [f"{address}/32" for _, address in addresses]
    taken += [f"{server}/32" for server in nameservers()]
    subnet = next(free_subnets(24, taken), None)
    if subnet is None:
        raise HostError(
            "no free /24 subnet for the bake's network",
            hint="remove unused libvirt networks (`labbuilder gc`)",
        )
    network = BakeNetwork(
        name=name, bridge=f"lbbk{name[-10:]}", subnet=subnet, archive=tuple(addresses)
    )
    hypervisor.ensure_network(name, network_xml(network))
    egress = Egress.ALLOW if addresses else Egress.NONE
    firewall.ensure_egress(
        name, [network.bridge], [subnet], egress, sorted({a for _, a in addresses})
    )
    return network


def _resolve(hosts: Sequence[str]) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for host in hosts:
        try:
            infos = socket.getaddrinfo(host, 80, socket.AF_INET, socket.SOCK_STREAM)
        except OSError:
            _log.info("archive host %s does not resolve on this host; the bake skips it", host)
            continue
        found += [(host, address) for address in sorted({str(info[4][0]) for info in infos})]
    if hosts and not found:
        raise ImageError(
            f"none of the archive hosts {', '.join(hosts)} resolves on this host",
            hint="a bake installs packages from the distribution's archive: check the "
            "host's DNS and network",
        )
    return found


def _run_guest(
    hypervisor: Hypervisor,
    job: _Job,
    owner: str,
    network: BakeNetwork,
    files: Mapping[str, bytes],
    domain_type: str | None = None,
) -> tuple[Report, str]:
    """Boot the guest on an overlay of the base, wait until it powers off, return its report
    and the overlay's path."""
    pool = hypervisor.ensure_pool(pool_name(), str(pool_dir()))
    base = job.base
    base_volume = hypervisor.ensure_uploaded_file(pool, f"{base.volume_stem}.qcow2", base.disk)
    boot = GuestBoot()
    if base.kernel is not None and base.initrd is not None:
        stem = base.volume_stem
        kernel = hypervisor.ensure_uploaded_file(pool, f"{stem}.vmlinuz", base.kernel)
        initrd = hypervisor.ensure_uploaded_file(pool, f"{stem}.initrd", base.initrd)
        boot = GuestBoot(kernel.path, initrd.path, base.cmdline)
    disk_name = storage.lab_volume_name(owner, "bake", "disk.qcow2")
    seed_name = storage.lab_volume_name(owner, "bake", "seed.iso")
    overlay = hypervisor.ensure_overlay(pool, disk_name, base_volume, job.virtual_size)
    iso = build_seed_iso(files)
    hypervisor.upload(pool, seed_name, io.BytesIO(iso), len(iso))
    xml = domain_xml(
        name=owner,
        role=job.role,
        domain_type=domain_type or _domain_type(job.uri, base.kernel),
        boot=boot,
        pool=pool,
        disk_volume=disk_name,
        seed_volume=seed_name,
        network=network.name,
        mac=_mac_of(files),
        console_log=job.console,
        report_log=job.report,
    )
    job.log(f"image {job.name}: booting {base.name} once ({owner}, network {network.subnet})")
    domain = hypervisor.ensure_domain(owner, xml)
    report = _wait_powered_off(hypervisor, domain.name, job)
    return report, overlay.path


def _wait_powered_off(hypervisor: Hypervisor, domain: str, job: _Job) -> Report:
    """Wait until the guest powers off; give up when it shows no sign of life (no new console
    or report output) for ``job.timeout`` seconds, or after ``MAX_SECONDS`` in all."""
    started = time.monotonic()
    last_output, alive = (-1, -1), started
    shown = 0
    while True:
        state = hypervisor.domain_state(domain)
        text = _read(job.report)
        report = parse_report(text)
        output = (len(text), _size(job.console))
        if output != last_output:
            last_output, alive = output, time.monotonic()
        for step in report.steps[shown:]:
            job.log(f"image {job.name}: {step}")
        shown = len(report.steps)
        if state == "shut off":
            return report
        if state in ("crashed", "paused"):
            raise ImageError(
                f"image {job.name}: the guest is {state}\n"
                f"last console lines ({job.console}):\n{console_tail(job.console)}",
                hint="see the whole console log above; the base image may not boot here",
            )
        if _PANIC.search(console_tail(job.console, 60)):
            raise ImageError(
                f"image {job.name}: the guest's kernel failed\n"
                f"last console lines ({job.console}):\n{console_tail(job.console)}",
                hint="the base image does not boot with this kernel command line",
            )
        now = time.monotonic()
        if now - alive > job.timeout or now - started > MAX_SECONDS:
            silent = now - alive > job.timeout
            why = f"printed nothing for {job.timeout:.0f} s" if silent else "did not finish"
            raise ImageError(
                f"image {job.name}: the guest {why} in {now - started:.0f} s and was stopped\n"
                f"last console lines ({job.console}):\n{console_tail(job.console)}",
                hint="the base image must run cloud-init from a NoCloud seed (its console "
                "shows whether it did)",
            )
        time.sleep(POLL)


def _mac_of(files: Mapping[str, bytes]) -> str:
    config = json.loads(files["network-config"])
    mac: str = config["ethernets"]["eth0"]["match"]["macaddress"]
    return mac


def _domain_type(uri: str, kernel: Path | None) -> str:
    return str(probecache.probe(uri, kernel=kernel).domain_type)


# --- the cache --------------------------------------------------------------------------------


def _virtual_size(disk: Path) -> int:
    info = json.loads(rootfs.run(["qemu-img", "info", "-U", "--output=json", disk]))
    size: int = info["virtual-size"]
    return size


def _load_cached(final: Path, key: str) -> BakedImage | None:
    if not (final / MANIFEST_FILE).is_file():
        return None
    try:
        baked = load_baked_image(final)
    except ImageError:
        return None
    if baked.bake_key != key or not baked.disk.is_file():
        return None
    if baked.disk.stat().st_size != baked.file_size:
        return None
    return baked


def _check_host(built: Path) -> None:
    check_root_and_space(
        built, "baking a role image", "the guest's disk is read from libvirt's pool", "a bake"
    )


def _remove_stale_work(built: Path, name: str) -> None:
    """Remove temporary bake directories of ``name`` left by processes that died."""
    for path in built.glob(f".bake-{name}-*"):
        pid = path.name.rsplit("-", 1)[-1]
        if path.is_dir() and pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _read(path: Path) -> str:
    try:
        return path.read_bytes().decode(errors="replace")
    except OSError:
        return ""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest()
