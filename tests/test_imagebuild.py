"""Build debian-12 with mmdebstrap (once: the cache is shared across runs) and its role images.

Images are built into ``built/`` of ``$LABBUILDER_TEST_CACHE``, else /var/cache/labbuilder-test
(the folder labbuilder.images.boot uses for that cache): the first run builds (~1.5 min per image),
later runs reuse the build. How the image boots (NoCloud, its root grown, an identity of its own)
is checked on every node of the suite's lab (tests/test_bringup.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from labbuilder.adapters import processes
from labbuilder.catalog.files import load_catalog
from labbuilder.catalog.model import BuildRecipe
from labbuilder.common.errors import ImageError
from labbuilder.images import rootfs
from labbuilder.images.build import BUILDER_VERSION, BuiltImage, build_image, recipe_hash

PREFIX = "lbtest-imagebuild"
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


# Booting the built image (NoCloud, the root grown, a new identity) is checked on every node of
# the suite's lab: tests/test_bringup.py.
