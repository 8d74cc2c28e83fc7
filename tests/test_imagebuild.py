"""Build debian-12 with mmdebstrap (once: the cache is shared across runs) and boot it.

Images are built into ``built/`` of ``$LABBUILDER_TEST_CACHE``, else /var/cache/labbuilder-test
(the folder labbuilder.images.boot uses for that cache): the first run builds (~1.5 min per image),
later runs reuse the build. The boot test defines a NAT network and a TCG
domain, both named ``lbtest-...``, logs in over SSH with a key it generates and checks what
cloud-init did; the network, the domain and every file are removed even when it fails.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import libvirt
import paramiko
import pytest

from labbuilder.adapters import processes
from labbuilder.catalog.files import load_catalog
from labbuilder.catalog.model import BuildRecipe
from labbuilder.common.errors import ImageError
from labbuilder.images import rootfs
from labbuilder.images.build import BUILDER_VERSION, BuiltImage, build_image, recipe_hash
from labbuilder.lifecycle.seed_iso import build_seed_iso

PREFIX = "lbtest-imagebuild"
OVERLAY_SIZE = 6 * 1024**3
MAC = "52:54:00:4c:42:0a"
BOOT_TIMEOUT = 420.0
_log = logging.getLogger(__name__)


def _cache_dir() -> Path:
    """The built-images folder of the shared test cache (where ``baseimage`` looks too)."""
    cache = Path(os.environ.get("LABBUILDER_TEST_CACHE") or "/var/cache/labbuilder-test")
    path = cache / "built"
    path.mkdir(parents=True, exist_ok=True)
    for folder in (cache, path):
        folder.chmod(0o755)  # libvirt's qemu user must reach the base image
    return path


def _recipe() -> BuildRecipe:
    recipe = load_catalog()["debian-12"].build
    assert recipe is not None, "the catalog's debian-12 entry has no [build] recipe"
    return recipe


@dataclass
class Build:
    image: BuiltImage
    log: list[str]


@pytest.fixture(scope="module")
def debian12() -> Build:
    lines: list[str] = []
    started = time.monotonic()
    image = build_image("debian-12", _recipe(), _cache_dir(), log=lines.append)
    _log.info("debian-12: %s in %.1f s", "cache hit" if image.from_cache else "built",
              time.monotonic() - started)  # fmt: skip
    return Build(image, lines)


def _debugfs(image: BuiltImage, workdir: Path, *requests: str) -> list[str]:
    """Run debugfs requests against a raw copy of the image (no mount, no loop device)."""
    raw = workdir / "inspect.raw"
    if not raw.exists():
        rootfs.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", image.disk, raw])
    return [rootfs.run(["debugfs", "-R", request, raw]) for request in requests]


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-", dir="/var/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


RECIPE = BuildRecipe(
    suite="bookworm",
    mirror="http://deb.debian.org/debian",
    packages=("curl", "sudo"),
    kernel_package="linux-image-cloud-amd64",
    size="2 GiB",
)


def test_a_yielding_build_runs_its_processes_at_a_lower_cpu_priority() -> None:
    # `nice` without arguments prints its own niceness: what the build's tools would get.
    assert rootfs.run(["nice"]).strip() == "0"
    seen: dict[str, str] = {}

    def other_thread() -> None:
        seen["other"] = rootfs.run(["nice"]).strip()

    with processes.yielding():
        assert rootfs.run(["nice"]).strip() == str(processes.YIELDING_NICENESS)
        thread = threading.Thread(target=other_thread)  # a build beside it: not yielding
        thread.start()
        thread.join()
    assert seen["other"] == "0"
    assert rootfs.run(["nice"]).strip() == "0"


def test_recipe_hash_sees_what_changes_the_image_and_nothing_else() -> None:
    base = recipe_hash(RECIPE, "1")
    assert base == recipe_hash(replace(RECIPE, packages=("sudo", "curl", "sudo")), "1")
    assert base == recipe_hash(replace(RECIPE, mirror=RECIPE.mirror + "/"), "1")
    assert base == recipe_hash(replace(RECIPE, size="2048 MiB"), "1")
    assert base == recipe_hash(RECIPE, "1", extra_packages=("curl",))  # already in the recipe
    changed = {
        recipe_hash(RECIPE, "2"),
        recipe_hash(replace(RECIPE, packages=("curl",)), "1"),
        recipe_hash(replace(RECIPE, suite="trixie"), "1"),
        recipe_hash(replace(RECIPE, size="3 GiB"), "1"),
        recipe_hash(replace(RECIPE, kernel_package="linux-image-amd64"), "1"),
        recipe_hash(RECIPE, "1", extra_packages=("memcached",)),
        recipe_hash(
            RECIPE, "1", extra_packages=("memcached",), masked_units=("memcached.service",)
        ),
    }
    assert base not in changed and len(changed) == 7


def test_a_role_images_hash_covers_the_hook_that_layers_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    role = recipe_hash(RECIPE, "1", extra_packages=("memcached",))
    hook = tmp_path / "role-layer.sh"
    hook.write_text(rootfs.layer_hook().read_text() + "# changed\n")
    monkeypatch.setattr(rootfs, "layer_hook", lambda: hook)
    assert recipe_hash(RECIPE, "1", extra_packages=("memcached",)) != role
    assert recipe_hash(RECIPE, "1") == recipe_hash(RECIPE, "1", extra_packages=("curl",))


@pytest.mark.parametrize(
    ("name", "recipe", "masked", "message"),
    [
        ("Debian 12", RECIPE, (), "not a lower-case name"),
        ("x", replace(RECIPE, packages=("Bad_Name",)), (), "not a Debian package name"),
        ("x", RECIPE, ("keystone",), "not a systemd unit name"),
        ("x", replace(RECIPE, size="big"), (), "image size 'big'"),
    ],
)
def test_bad_input_is_refused_before_anything_runs(
    name: str, recipe: BuildRecipe, masked: tuple[str, ...], message: str, workdir: Path
) -> None:
    lines: list[str] = []
    with pytest.raises(ImageError, match=message):
        build_image(name, recipe, workdir, masked_units=masked, log=lines.append)
    assert lines == [] and list(workdir.iterdir()) == []


@pytest.mark.slow
@pytest.mark.integration
def test_a_failed_build_leaves_nothing_in_the_cache(workdir: Path) -> None:
    broken = replace(_recipe(), packages=("lbtest-no-such-package",))
    with pytest.raises(ImageError, match="Command: mmdebstrap"):
        build_image("lbtest-broken", broken, workdir, log=_log.debug)
    assert [path.name for path in workdir.iterdir()] == [".build-lbtest-broken.lock"]


@pytest.mark.slow
@pytest.mark.integration
def test_build_is_cached_and_carries_no_machine_identity(debian12: Build, workdir: Path) -> None:
    image = debian12.image
    lines: list[str] = []
    started = time.monotonic()
    again = build_image("debian-12", _recipe(), _cache_dir(), log=lines.append)
    cached_seconds = time.monotonic() - started
    assert again.from_cache and again.directory == image.directory
    assert not any("mmdebstrap" in line for line in lines if line.startswith("$ ")), lines
    _log.info("cached build_image: %.3f s", cached_seconds)

    assert image.recipe_hash == recipe_hash(_recipe(), BUILDER_VERSION)
    manifest = json.loads(image.manifest_path.read_text())
    assert manifest["source"] == {
        "suite": "bookworm",
        "mirror": _recipe().mirror,
        "variant": "apt",
    }
    assert manifest["recipe_hash"] == image.recipe_hash
    assert manifest["builder_version"] == BUILDER_VERSION
    for package in ("cloud-init", "openssh-server", "linux-image-cloud-amd64", "systemd"):
        assert manifest["packages"].get(package), package
    assert "chrony" not in manifest["packages"]
    assert manifest["disk"]["sha256"] == hashlib.sha256(image.disk.read_bytes()).hexdigest()
    assert image.file_size == image.disk.stat().st_size < 400 * 1024**2
    assert image.virtual_size == 2 * 1024**3
    assert image.kernel.stat().st_size > 1024**2 and image.initrd.stat().st_size > 1024**2
    _log.info("qcow2 %d bytes, virtual %d bytes", image.file_size, image.virtual_size)

    ssh, machine_id, hostname, timer, cfg = _debugfs(
        image,
        workdir,
        "ls /etc/ssh",
        "stat /etc/machine-id",
        "cat /etc/hostname",
        "stat /etc/systemd/system/apt-daily.timer",
        "cat /etc/cloud/cloud.cfg.d/99_labbuilder.cfg",
    )
    assert "sshd_config" in ssh and "ssh_host_" not in ssh
    assert "Size: 0" in machine_id
    assert hostname.splitlines()[-1] == "localhost"
    assert '"/dev/null"' in timer
    assert "datasource_list: [ NoCloud, None ]" in cfg


@pytest.mark.slow
@pytest.mark.integration
def test_role_image_is_layered_on_its_base_and_masks_units_until_configured(
    debian12: Build, workdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base = debian12.image
    assert (base.directory / rootfs.TREE_FILE).is_file() and base.manifest["tree"]
    lines: list[str] = []
    with caplog.at_level(logging.DEBUG, logger="labbuilder.tools"):
        role = build_image(
            "lbtest-role-memcached",
            _recipe(),
            workdir / "cache",
            extra_packages=("memcached",),
            masked_units=("memcached.service",),
            base=base,
            log=lines.append,
        )
    # The log callback gets the build's two sentences; apt's and dpkg's lines go to the logger.
    assert lines[0] == "image lbtest-role-memcached: building (1 role packages over its base)"
    assert re.fullmatch(r"image lbtest-role-memcached: built in \d+ s", lines[1]), lines
    assert len(lines) == 2
    tools = [r.getMessage() for r in caplog.records if r.name == "labbuilder.tools"]
    assert any(m.startswith("$ mmdebstrap --mode=unshare --variant=custom") for m in tools)
    assert any(m.startswith("Setting up memcached") for m in tools), tools[-20:]
    assert role.manifest["layered_on"] == base.directory.name
    assert role.manifest["tree"] is None and not (role.directory / rootfs.TREE_FILE).exists()
    assert role.recipe_hash != base.recipe_hash
    assert role.masked_units == ("memcached.service",)
    # Everything of the base is there, at the base's versions, plus the role's packages.
    for package, version in base.manifest["packages"].items():
        assert role.manifest["packages"].get(package) == version, package
    assert "memcached" in role.manifest["packages"]
    assert "memcached.service" not in role.manifest["enabled_units"]
    link, ssh, dpkg_cfg = _debugfs(
        role,
        workdir,
        "stat /etc/systemd/system/memcached.service",
        "ls /etc/ssh",
        "cat /etc/dpkg/dpkg.cfg.d/99mmdebstrap",
    )
    assert '"/dev/null"' in link
    assert "ssh_host_" not in ssh  # the role's build removed the identity again
    # The base's dpkg settings hold; the build's dpkg speed-up is not left in the image.
    assert "path-exclude=/usr/share/doc/*" in dpkg_cfg and "unsafe" not in dpkg_cfg


# --- booting ----------------------------------------------------------------------------------


def _free_subnet(conn: libvirt.virConnect) -> ipaddress.IPv4Network:
    """A /24 under 10.250.0.0/16 that no host route and no libvirt network uses."""
    used: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for route in json.loads(rootfs.run(["ip", "-j", "route"])):
        if route.get("dst", "default") != "default":
            used.append(ipaddress.ip_network(route["dst"], strict=False))
    for net in conn.listAllNetworks():
        for ip in ET.fromstring(net.XMLDesc()).iter("ip"):
            mask = ip.get("prefix") or ip.get("netmask") or "24"
            used.append(ipaddress.ip_network(f"{ip.get('address')}/{mask}", strict=False))
    for third in range(77, 120):
        candidate = ipaddress.IPv4Network(f"10.250.{third}.0/24")
        if not any(candidate.overlaps(other) for other in used if other.version == 4):
            return candidate
    raise AssertionError("no free /24 under 10.250.77.0-10.250.119.0")


def _network_xml(name: str, subnet: ipaddress.IPv4Network) -> str:
    return f"""<network>
  <name>{name}</name>
  <forward mode='nat'/>
  <bridge stp='off' delay='0'/>
  <ip address='{subnet[1]}' netmask='{subnet.netmask}'/>
</network>"""


def _domain_xml(
    name: str, image: BuiltImage, overlay: Path, seed: Path, net: str, log: Path
) -> str:
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>1024</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64'>hvm</type>
    <kernel>{image.kernel}</kernel>
    <initrd>{image.initrd}</initrd>
    <cmdline>{image.kernel_cmdline}</cmdline>
  </os>
  <features><acpi/></features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' discard='unmap'/>
      <source file='{overlay}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{seed}'/>
      <target dev='vdb' bus='virtio'/>
      <readonly/>
    </disk>
    <interface type='network'>
      <source network='{net}'/>
      <mac address='{MAC}'/>
      <model type='virtio'/>
    </interface>
    <serial type='pty'>
      <log file='{log}' append='off'/>
      <target port='0'/>
    </serial>
    <console type='pty'><target type='serial' port='0'/></console>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
    <memballoon model='none'/>
  </devices>
</domain>"""


def _seed(public_key: str, address: ipaddress.IPv4Interface, gateway: str) -> bytes:
    user_data = f"""#cloud-config
locale: C.UTF-8
ssh_authorized_keys:
  - {public_key}
"""
    meta_data = "instance-id: lbtest-imagebuild-1\nlocal-hostname: lbtest-node\n"
    network_config = f"""version: 2
ethernets:
  eth0:
    match:
      macaddress: "{MAC}"
    set-name: eth0
    addresses: [{address}]
    routes:
      - to: 0.0.0.0/0
        via: {gateway}
    nameservers:
      addresses: [{gateway}]
"""
    return build_seed_iso(
        {
            "user-data": user_data.encode(),
            "meta-data": meta_data.encode(),
            "network-config": network_config.encode(),
        }
    )


@dataclass
class Guest:
    domain: libvirt.virDomain
    address: str
    overlay: Path
    console: Path
    key: paramiko.RSAKey
    started: float


@pytest.fixture
def guest(debian12: Build, workdir: Path) -> Iterator[Guest]:
    conn = libvirt.open("qemu:///system")
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    name = f"{PREFIX}-{os.getpid()}"
    network: libvirt.virNetwork | None = None
    domain: libvirt.virDomain | None = None
    try:
        subnet = _free_subnet(conn)
        step = time.monotonic()
        network = conn.networkDefineXML(_network_xml(name, subnet))
        network.create()
        _log.info("network %s (%s) up in %.1f s", name, subnet, time.monotonic() - step)
        overlay, seed, console = (
            workdir / "vda.qcow2",
            workdir / "seed.iso",
            workdir / "console.log",
        )
        rootfs.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2",
                    "-b", debian12.image.disk, overlay, str(OVERLAY_SIZE)])  # fmt: skip
        key = paramiko.RSAKey.generate(2048)
        address = ipaddress.IPv4Interface(f"{subnet[10]}/{subnet.prefixlen}")
        seed.write_bytes(_seed(f"ssh-rsa {key.get_base64()} lbtest", address, str(subnet[1])))
        domain = conn.defineXML(_domain_xml(name, debian12.image, overlay, seed, name, console))
        started = time.monotonic()
        domain.create()
        _log.info("domain %s started in %.1f s", name, time.monotonic() - started)
        yield Guest(domain, str(address.ip), overlay, console, key, started)
    finally:
        if domain is not None:
            if domain.isActive():
                domain.destroy()
            domain.undefine()
        if network is not None:
            if network.isActive():
                network.destroy()
            network.undefine()
        conn.close()


def _console_tail(guest: Guest, lines: int = 40) -> str:
    try:
        text = guest.console.read_text(errors="replace")
    except OSError as exc:
        return f"(no console log: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def _connect(guest: Guest) -> paramiko.SSHClient:
    """Wait until the guest answers SSH and log in as the image's default user."""
    deadline = guest.started + BOOT_TIMEOUT
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        assert guest.domain.isActive(), "the guest stopped:\n" + _console_tail(guest)
        try:
            with socket.create_connection((guest.address, 22), timeout=3):
                pass
            client = paramiko.SSHClient()
            client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
            client.connect(guest.address, username="debian", pkey=guest.key, timeout=10,
                           banner_timeout=30, auth_timeout=30, look_for_keys=False,
                           allow_agent=False)  # fmt: skip
            return client
        except (OSError, paramiko.SSHException) as exc:
            last_error = exc
            time.sleep(3)
    raise AssertionError(f"no SSH after {BOOT_TIMEOUT} s ({last_error}):\n" + _console_tail(guest))


def _ssh(client: paramiko.SSHClient, command: str, timeout: float = 300) -> tuple[int, str]:
    _stdin, stdout, stderr = client.exec_command(command, timeout=timeout)
    out = stdout.read().decode() + stderr.read().decode()
    return stdout.channel.recv_exit_status(), out


@pytest.mark.slow
@pytest.mark.integration
def test_boots_with_a_nocloud_seed_and_grows_its_root(guest: Guest) -> None:
    client = _connect(guest)
    boot_to_ssh = time.monotonic() - guest.started
    try:
        rc, status = _ssh(client, "cloud-init status --wait --long")
        assert rc == 0 and "status: done" in status, status + _console_tail(guest)
        rc, running = _ssh(client, "systemctl is-system-running --wait; systemctl --failed")
        assert running.startswith("running"), running
        settled = time.monotonic() - guest.started

        rc, size = _ssh(client, "df -B1 --output=size / | tail -1")
        assert rc == 0 and int(size) > 0.9 * OVERLAY_SIZE, size

        rc, machine_id = _ssh(client, "cat /etc/machine-id")
        assert rc == 0 and len(machine_id.strip()) == 32, machine_id
        rc, keys = _ssh(client, "cat /etc/ssh/ssh_host_*_key.pub")
        transport = client.get_transport()
        assert transport is not None
        assert transport.get_remote_server_key().get_base64() in keys  # generated on this boot
        assert _ssh(client, "hostname")[1].strip() == "lbtest-node"
        assert _ssh(client, "locale")[1].startswith("LANG=C.UTF-8")
        assert _ssh(client, "systemctl is-enabled apt-daily.timer")[1].strip() == "masked"
        assert _ssh(client, "systemctl list-unit-files 'chrony*' --no-legend")[1].strip() == ""
        rc, datasource = _ssh(client, "cloud-id; cat /run/cloud-init/ds-identify.log | head -3")
        assert "nocloud" in datasource, datasource
    finally:
        client.close()
    overlay_bytes = guest.overlay.stat().st_blocks * 512
    assert "Linux version" in guest.console.read_text(errors="replace")  # serial console logged
    _log.info(
        "boot to SSH %.1f s, cloud-init done and system running at %.1f s, overlay %d bytes",
        boot_to_ssh, settled, overlay_bytes,
    )  # fmt: skip
