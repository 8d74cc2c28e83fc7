"""Role images from a download-only image, baked by booting it once (``labbuilder.images.rolebake``),
on the real libvirtd (TCG) from a real HTTP server on 127.0.0.1. No mocks.

The "download" is the locally built Debian 12 image (built once into the shared test cache, as
tests/test_imagebuild.py does), served with its kernel, its initrd and a SHA256SUMS file, and
named by a catalog entry in a temporary catalog folder that has only a ``[download]`` section.
That disk is a whole-disk ext4 without a boot loader, so the entry declares direct kernel boot
(``kernel_url``, ``initrd_url``, ``cmdline``), which a catalog entry may do for any image that
publishes its kernel next to it; the bake boots it that way.

The bake names its own temporary libvirt objects and firewall rules ``lbbake-*``; what the test
makes (storage pool, catalog entry, roles, state and cache folders) is named ``lbtest-*``. All
of it is removed even when a test fails, and the tests check that nothing is left.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from lablib import TEST_CACHE

from labbuilder.adapters import firewall, storage
from labbuilder.adapters import libvirt as lv
from labbuilder.catalog.files import load_catalog, parse_image_entry
from labbuilder.catalog.model import BaseImage, CloudInitFlavour, ImageEntry
from labbuilder.common.errors import ImageError
from labbuilder.images import bakeseed, rootfs
from labbuilder.images import store as imagestore
from labbuilder.images.bakeseed import (
    BAKE_FILES,
    PREFIX,
    BakeNetwork,
    GuestBoot,
    bake_file,
    bake_key,
    bake_seed_files,
    check_seed_files,
    input_problem,
    parse_report,
)
from labbuilder.images.boot import resolve_role_image
from labbuilder.images.build import BuiltImage, build_image
from labbuilder.images.rolebake import archive_hosts, check_image, load_baked_image

REPO = Path(__file__).resolve().parent.parent
POOL = "lbtest-rolebake-pool"
ENTRY = "lbtest-dl-debian"
ROLE = "lbtest-hello"
MASKED = "fstrim.timer"  # util-linux's, enabled in the image; harmless to mask
_log = logging.getLogger(__name__)


# --- pure parts -------------------------------------------------------------------------------


def test_bake_inputs_are_checked_before_they_reach_a_script() -> None:
    assert input_problem("controller", ("hello", "g++"), ("keystone.service",)) is None
    assert "role" in (input_problem("Controller", (), ()) or "")
    assert "package" in (input_problem("r", ("hello; reboot",), ()) or "")
    assert "unit" in (input_problem("r", (), ("keystone",)) or "")


def test_a_bad_role_is_refused_before_any_image_is_touched(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="not a lower-case name"):
        resolve_role_image(
            "debian-12", role="Bad Role", packages=("hello",), masked_units=(), cache_dir=tmp_path
        )
    assert list(tmp_path.iterdir()) == []


def test_a_bake_may_reach_its_distributions_archive_only() -> None:
    catalog = load_catalog()
    assert archive_hosts(catalog["ubuntu-24.04"]) == ("archive.ubuntu.com", "security.ubuntu.com")
    assert archive_hosts(catalog["debian-12"]) == ("deb.debian.org", "security.debian.org")


def test_bake_key_sees_what_changes_the_image() -> None:
    boot = GuestBoot(cmdline="root=LABEL=lbroot")
    key = functools.partial(bake_key, virtual_size=4 * 2**30, boot=boot)
    base = key("d1", ("hello", "curl"), ("a.service",))
    assert base == key("d1", ("curl", "hello", "hello"), ("a.service",))
    others = {
        key("d2", ("hello", "curl"), ("a.service",)),
        key("d1", ("hello",), ("a.service",)),
        key("d1", ("hello", "curl"), ()),
        bake_key("d1", ("hello", "curl"), ("a.service",), virtual_size=5 * 2**30, boot=boot),
        bake_key("d1", ("hello", "curl"), ("a.service",), virtual_size=4 * 2**30, boot=GuestBoot()),
    }
    assert base not in others and len(others) == 5


def test_report_lines_are_read_back_whatever_surrounds_them() -> None:
    text = (
        "garbage\r\nLBBAKE BEGIN\r\nLBBAKE OS Debian GNU/Linux 12 (bookworm)\r\n"
        "LBBAKE STEP apt-get update\nLBBAKE PKG hello 2.10-3\nLBBAKE PKG libc6 2.36-9+deb12u9\n"
        "[  12.3] random kernel line\nLBBAKE MASKED fstrim.timer masked\nLBBAKE INSTALLED\n"
        "LBBAKE LEFT /etc/machine-id\nLBBAKE DONE\n"
    )
    report = parse_report(text)
    assert report.begun and report.installed and report.done
    assert report.os == "Debian GNU/Linux 12 (bookworm)"
    assert report.packages == {"hello": "2.10-3", "libc6": "2.36-9+deb12u9"}
    assert report.masked == {"fstrim.timer": "masked"}
    assert report.steps == ("apt-get update",) and report.left == ("/etc/machine-id",)
    failed = parse_report("LBBAKE BEGIN\nLBBAKE FAIL packages not in the guest's archive: x\n")
    assert failed.failures == ("packages not in the guest's archive: x",) and not failed.done


def test_seed_scripts_are_valid_shell_and_cloud_config(tmp_path: Path) -> None:
    network = BakeNetwork("lbbake-0", "lbbk0", "10.9.8.0/24", (("deb.debian.org", "192.0.2.7"),))
    seeds = [
        bake_seed_files(
            instance_id="i-1",
            network=network,
            mac="52:54:00:00:00:01",
            flavour=flavour,
            packages=("hello",),
            masked_units=(MASKED,),
        )  # fmt: skip
        for flavour in CloudInitFlavour
    ]
    seeds.append(
        check_seed_files(
            instance_id="i-2",
            network=network,
            mac="52:54:00:00:00:02",
            flavour=CloudInitFlavour.V2,
            script="hello\n",
        )  # fmt: skip
    )
    scripts: list[Path] = []
    for number, files in enumerate(seeds):
        user_data = files["user-data"].decode()
        assert user_data.startswith("#cloud-config\n")
        config = json.loads(user_data.split("\n", 1)[1])
        assert config["users"] == [] and config["runcmd"] == [["sh", "/run/lbbake/main.sh"]]
        for item in config["write_files"]:
            if item["path"].endswith(".sh"):
                script = tmp_path / f"{number}-{Path(item['path']).name}"
                script.write_text(item["content"])
                checked = subprocess.run(["sh", "-n", script], capture_output=True, text=True)
                assert checked.returncode == 0, (item["path"], checked.stderr)
                scripts.append(script)
        network_config = json.loads(files["network-config"])
        assert network_config["ethernets"]["eth0"]["addresses"] == ["10.9.8.10/24"]
    main = json.loads(seeds[0]["user-data"].decode().split("\n", 1)[1])["write_files"][1]
    assert main["content"] == "packages=hello\nunits=fstrim.timer\n" + bake_file("main.sh")
    # The scripts as the guest gets them, and the image hooks beside the bake's files.
    assert len(scripts) == 3 * len(CloudInitFlavour) + 4
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (scripts/setup-host --test installs it)")
    hooks = sorted((REPO / "images").rglob("*.sh"))
    assert {p.name for p in hooks} >= {
        "role-layer.sh",
        *(n for n in BAKE_FILES if n.endswith(".sh")),
    }
    checked = subprocess.run(
        ["shellcheck", "-s", "sh", "-S", "warning", "-f", "gcc", *map(str, scripts + hooks)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout[-5000:]


def test_the_files_a_bake_writes_are_data_files_and_in_its_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in BAKE_FILES:
        assert bake_file(name) == (REPO / "images" / "bake" / name).read_text()
    with pytest.raises(ValueError):
        bake_file("../hooks/role-layer.sh")
    # A changed script is a changed bake: its key covers the files it writes.
    key = functools.partial(bake_key, "d1", ("hello",), (), virtual_size=2**30, boot=GuestBoot())
    before = key()
    monkeypatch.setattr(bakeseed, "bake_file", lambda name: bake_file(name) + "#\n")
    assert key() != before


def test_direct_kernel_boot_downloads_are_checked_in_the_catalog() -> None:
    head = (
        'name = "x"\ndescription = "x"\nos_family = "debian"\nrelease = "12"\n'
        'cloud_init = "v2"\ndefault_user = "debian"\nconsole = "ttyS0"\n[download]\n'
        'url = "https://example.org/x.qcow2"\nformat = "qcow2"\n'
    )
    listed = 'checksum_url = "https://example.org/SHA256SUMS"\n'
    boot = (
        'kernel_url = "https://example.org/x.vmlinuz"\n'
        'initrd_url = "https://example.org/x.initrd"\ncmdline = "root=LABEL=lbroot"\n'
    )
    entry = parse_image_entry(head + listed + boot, "x.toml")
    assert entry.download is not None and entry.download.cmdline == "root=LABEL=lbroot"
    with pytest.raises(ImageError, match="not cmdline"):
        parse_image_entry(head + listed + boot.rsplit("cmdline", 1)[0], "x.toml")
    with pytest.raises(ImageError, match="needs 'download.checksum_url'"):
        parse_image_entry(head + f'checksum = "{"0" * 64}"\n' + boot, "x.toml")


# --- the served download --------------------------------------------------------------------


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass
class Setup:
    built: BuiltImage
    catalog: dict[str, ImageEntry]
    cache: Path
    served: Path
    log: list[str]

    def note(self, line: str) -> None:
        self.log.append(line)
        _log.info("%s", line)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    recipe = load_catalog()["debian-12"].build
    assert recipe is not None
    built = build_image("debian-12", recipe, TEST_CACHE / "built")  # cached after the first run
    served = tmp_path_factory.mktemp("lbtest-served")
    files = {
        "lbtest-debian.qcow2": built.disk,
        "lbtest-debian.vmlinuz": built.kernel,
        "lbtest-debian.initrd": built.initrd,
    }
    sums = []
    for name, path in files.items():
        shutil.copyfile(path, served / name)
        sums.append(f"{hashlib.sha256((served / name).read_bytes()).hexdigest()}  {name}\n")
    (served / "SHA256SUMS").write_text("".join(sums))
    handler = functools.partial(_QuietHandler, directory=str(served))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    folder = tmp_path_factory.mktemp("lbtest-catalog")
    (folder / f"{ENTRY}.toml").write_text(
        f"""name = "{ENTRY}"
description = "the built Debian 12 image, served as a download with its kernel"
os_family = "debian"
release = "12"
cloud_init = "v2"
default_user = "debian"
console = "ttyS0"

[download]
url = "{url}/lbtest-debian.qcow2"
checksum_url = "{url}/SHA256SUMS"
algorithm = "sha256"
format = "qcow2"
kernel_url = "{url}/lbtest-debian.vmlinuz"
initrd_url = "{url}/lbtest-debian.initrd"
cmdline = "{rootfs.KERNEL_CMDLINE}"
"""
    )
    cache = Path(tempfile.mkdtemp(prefix="lbtest-rolebake-cache-", dir="/var/tmp"))
    state = tmp_path_factory.mktemp("lbtest-state")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LABBUILDER_POOL", POOL)
        patch.setenv("LABBUILDER_STATE_DIR", str(state))
        patch.setenv("LABBUILDER_CACHE_DIR", str(cache))
        try:
            yield Setup(built, load_catalog(folder), cache, served, [])
        finally:
            server.shutdown()
            server.server_close()
            conn = lv.connect("qemu:///system")
            try:
                pool = storage.find_pool(conn, POOL)
                if pool is not None:
                    storage.remove_pool(pool)
            finally:
                conn.close()
            shutil.rmtree(cache, ignore_errors=True)


def _role_image(setup: Setup, packages: tuple[str, ...], role: str = ROLE) -> BaseImage:
    return resolve_role_image(
        ENTRY,
        role=role,
        packages=packages,
        masked_units=(MASKED,),
        cache_dir=setup.cache,
        log=setup.note,
        catalog=setup.catalog,
    )


def leftovers(setup: Setup) -> dict[str, list[str]]:
    """The bake's temporary objects still on the host, and its temporary folders."""
    conn = lv.connect("qemu:///system", readonly=True)
    try:
        pool = storage.find_pool(conn, POOL)
        found = {
            "domains": [d.name() for d in conn.listAllDomains() if d.name().startswith(PREFIX)],
            "networks": [n.name() for n in conn.listAllNetworks() if n.name().startswith(PREFIX)],
            "volumes": [
                v.name() for v in (pool.listAllVolumes(0) if pool else []) if PREFIX in v.name()
            ],
        }
    finally:
        conn.close()
    found["firewall"] = sorted(lab for lab in firewall.owned_labs() if lab.startswith(PREFIX))
    built = setup.cache / "built"
    found["work"] = sorted(p.name for p in built.glob(".bake-*") if p.is_dir())
    found["state"] = sorted(p.name for p in (Path(os.environ["LABBUILDER_STATE_DIR"]) / "labs").glob("*"))  # fmt: skip
    return {kind: names for kind, names in found.items() if names}


def _debugfs(disk: Path, workdir: Path, *requests: str) -> list[str]:
    """Run debugfs requests against a raw copy of a whole-disk ext4 (no mount, no loop)."""
    raw = workdir / "inspect.raw"
    if not raw.exists():
        rootfs.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", disk, raw])
    return [rootfs.run(["debugfs", "-R", request, raw]) for request in requests]


# --- baking ---------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.integration
def test_a_download_is_baked_into_a_role_image_once(setup: Setup, tmp_path: Path) -> None:
    """Beside it (each bake is a 1-vCPU guest), a bake that asks for a package the archive
    lacks fails naming it, and leaves nothing."""
    failed: list[BaseException] = []

    def broken() -> None:
        try:
            _role_image(setup, ("hello", "lbtest-no-such-package"), role="lbtest-broken")
        except BaseException as err:  # noqa: BLE001 - checked below
            failed.append(err)

    other = threading.Thread(target=broken)
    started = time.monotonic()
    other.start()
    try:
        image = _role_image(setup, ("hello",))
    finally:
        other.join()
    bake_seconds = time.monotonic() - started
    (failure,) = failed
    assert isinstance(failure, ImageError), failure
    assert "lbtest-no-such-package" in failure.message
    assert "not in the guest's archive" in failure.message
    assert not list((setup.cache / "built").glob(f"{ENTRY}-lbtest-broken-*"))
    assert leftovers(setup) == {}
    assert image.name == f"{ENTRY}-{ROLE}" and image.kernel is not None
    assert image.disk.parent.parent == setup.cache / "built"
    assert re.fullmatch(rf"{ENTRY}-{ROLE}-[0-9a-f]{{16}}", image.disk.parent.name)

    baked = load_baked_image(image.disk.parent)
    manifest = baked.manifest
    assert manifest["kind"] == "bake" and manifest["role"] == ROLE
    assert re.fullmatch(r"[0-9][0-9a-z.+~:-]*", manifest["installed"]["hello"])
    assert manifest["packages"]["hello"] == manifest["installed"]["hello"]
    for package in ("cloud-init", "openssh-server", "linux-image-cloud-amd64"):
        assert manifest["packages"].get(package), package
    assert manifest["masked_units"] == [MASKED]
    served_digest = hashlib.sha256((setup.served / "lbtest-debian.qcow2").read_bytes()).hexdigest()
    assert manifest["source"]["digest"] == served_digest
    assert manifest["source"]["image"] == ENTRY and manifest["source"]["verified"] is True
    assert manifest["source"]["url"].endswith("/lbtest-debian.qcow2")
    assert manifest["boot"]["method"] == "direct-kernel"
    assert manifest["disk"]["sha256"] == image.digest == hashlib.sha256(image.disk.read_bytes()).hexdigest()  # fmt: skip
    assert (image.disk.parent / "console.log").stat().st_size > 0
    # The guest's freed blocks were discarded (qcow2 v3 overlay + fstrim), so a tiny package
    # makes a role image hardly bigger than its base.
    assert baked.file_size < setup.built.file_size + 32 * 2**20, baked.file_size
    shown = imagestore.show(image.name, setup.cache)
    assert shown["installed"] == manifest["installed"] and shown["path"] == str(image.disk)

    # The saved disk: the package is in, the unit masked, no machine's identity left.
    hello, ssh, machine_id, hostname, cloud, timer, lists = _debugfs(
        image.disk,
        tmp_path,
        "stat /usr/bin/hello",
        "ls /etc/ssh",
        "stat /etc/machine-id",
        "cat /etc/hostname",
        "ls /var/lib/cloud",
        f"stat /etc/systemd/system/{MASKED}",
        "ls /var/lib/apt/lists",
    )
    assert "Type: regular" in hello, hello
    assert "sshd_config" in ssh and "ssh_host_" not in ssh, ssh
    assert "Size: 0" in machine_id, machine_id
    assert hostname.splitlines()[-1] == "localhost", hostname
    assert "instance" not in cloud, cloud
    assert '"/dev/null"' in timer, timer
    assert "InRelease" not in lists and "Packages" not in lists, lists

    # Again: a cache hit, no guest.
    setup.log.clear()
    again_started = time.monotonic()
    again = _role_image(setup, ("hello",))
    again_seconds = time.monotonic() - again_started
    assert again == image
    assert any("cache hit" in line for line in setup.log), setup.log
    assert not any("booting" in line for line in setup.log), setup.log
    assert again_seconds < 30

    # A clone of it boots as a lab node would: a new machine with the package and the mask.
    check_started = time.monotonic()
    report = check_image(
        image,
        "hello; dpkg-query -W -f='version ${Version}\\n' hello; "
        f"echo unit $(systemctl is-enabled {MASKED}); echo id $(cat /etc/machine-id); "
        "echo keys $(ls /etc/ssh | grep -c '^ssh_host_.*_key$'); echo host $(hostname)",
    )
    check_seconds = time.monotonic() - check_started
    output = "\n".join(report.output)
    assert "Hello, world!" in report.output, output
    assert f"version {manifest['installed']['hello']}" in report.output, output
    assert "unit masked" in report.output, output
    (machine,) = [line.split()[1] for line in report.output if line.startswith("id ")]
    assert re.fullmatch(r"[0-9a-f]{32}", machine), output
    (keys,) = [int(line.split()[1]) for line in report.output if line.startswith("keys ")]
    assert keys >= 1, output
    assert leftovers(setup) == {}
    _log.info(
        "bake %.1f s (guest %.1f s), qcow2 %d bytes (base %d), virtual %d; cached call %.2f s; "
        "check boot %.1f s",
        bake_seconds, manifest["guest_seconds"], baked.file_size, setup.built.file_size,
        baked.virtual_size, again_seconds, check_seconds,
    )  # fmt: skip
