"""Image figures: base image size, overlay bytes right after a node boots, local build time
cold and cached, and the bytes a second pull downloads (must be 0).

Run as root on a host with libvirt and mmdebstrap: .venv/bin/python bench/images.py
The cold build goes to a temporary cache (about 75 s natively); the pulls are served by a local
HTTP server; the boot uses a one-node lab with free subnets (``lbbench-`` prefix), removed after.

``--cold``: the first ``up`` of the default lab on a fresh host (three nodes, recipe
zed-debian-12, role images), side by side in one run: the images built the way labbuilder built
them before (the base, then each role image from scratch with the packages of every chapter,
one after another), and a real ``labbuilder up`` with an empty image cache (role images with the
lab's chapters only, layered on the base, side by side, the controller's with its database
schemas first in line for the CPU, one image for the network and compute nodes as the recipe
says, the probe beside them,
each node booted as soon as its image is there, ready once cloud-init has configured it). The
"before" figure adds the new ``up``'s time after its images to the old images: a lower bound of
the old ``up``.
Target: that ``up`` within 300 s.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from lablib import (  # noqa: E402
    lab_environment,
    one_node_lab,
    remove_test_pool,
    three_node_lab,
)

from labbuilder.adapters import libvirt as lv  # noqa: E402
from labbuilder.adapters import storage  # noqa: E402
from labbuilder.catalog.files import find_image  # noqa: E402
from labbuilder.catalog.model import (  # noqa: E402
    ChecksumAlgorithm,
    DiskFormat,
    DownloadSource,
    ImageEntry,
)
from labbuilder.images.build import build_image  # noqa: E402
from labbuilder.images.cache import pull  # noqa: E402
from labbuilder.recipe.files import load_recipe  # noqa: E402


def timed_builds(cache: Path) -> tuple[float, float, Path]:
    entry = find_image("debian-12")
    assert entry.build is not None
    started = time.monotonic()
    built = build_image("debian-12", entry.build, cache)
    cold = time.monotonic() - started
    started = time.monotonic()
    build_image("debian-12", entry.build, cache)
    return cold, time.monotonic() - started, built.disk


def second_pull_bytes(disk: Path, work: Path) -> tuple[int, int]:
    served = work / "served"
    served.mkdir()
    (served / "image.qcow2").write_bytes(disk.read_bytes())
    digest = hashlib.sha256((served / "image.qcow2").read_bytes()).hexdigest()
    (served / "SHA256SUMS").write_text(f"{digest}  image.qcow2\n")
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    entry = ImageEntry(
        name="bench-image", description="", os_family="debian", release="12",
        cloud_init=find_image("debian-12").cloud_init, default_user="debian", console="ttyS0",
        download=DownloadSource(f"{base}/image.qcow2", f"{base}/SHA256SUMS", None,
                                ChecksumAlgorithm.SHA256, DiskFormat.QCOW2),
        build=None,
    )  # fmt: skip
    try:
        first = pull(entry, work / "cache").bytes_downloaded
        second = pull(entry, work / "cache").bytes_downloaded
    finally:
        server.shutdown()
    return first, second


def overlay_after_boot(work: Path) -> int:
    lab = work / "lab.toml"
    lab.write_text(one_node_lab("lbbench-overlay"))
    env = {**os.environ, **lab_environment(work / "state")}
    command = [sys.executable, "-m", "labbuilder"]
    subprocess.run([*command, "up", str(lab)], env=env, check=True, capture_output=True)
    try:
        conn = lv.connect("qemu:///system")
        pool = storage.find_pool(conn, env["LABBUILDER_POOL"])
        assert pool is not None
        volume = pool.storageVolLookupByName("lbbench-overlay__controller__vda.qcow2")
        allocation: int = volume.info()[2]
        conn.close()
        return allocation
    finally:
        subprocess.run([*command, "down", str(lab)], env=env, check=True, capture_output=True)
        remove_test_pool()


def images_before(cache: Path) -> float:
    """Seconds to build the default lab's images as labbuilder did before: the base, then each
    role's image from scratch (every package installed by mmdebstrap), one after another."""
    entry = find_image("debian-12")
    assert entry.build is not None
    recipe = load_recipe("zed-debian-12")
    started = time.monotonic()
    build_image("debian-12", entry.build, cache, log=print)
    every_chapter = [stage.name for stage in recipe.stages if stage.optional]
    for role in ("controller", "network", "compute"):
        wanted = recipe.role_image(role, every_chapter)
        build_image(
            f"debian-12-{role}",
            entry.build,
            cache,
            extra_packages=tuple(wanted.packages),
            masked_units=tuple(wanted.masked_units),
            log=print,
        )
    return time.monotonic() - started


def first_up(work: Path) -> tuple[float, float]:
    """A real first ``labbuilder up`` of the default lab's three nodes with an empty image
    cache: (seconds until its last image was built, seconds until every node was ready)."""
    work.mkdir(mode=0o755)
    lab = work / "lab.toml"
    lab.write_text(three_node_lab("lbbench-first-up", role_images=True))
    pool = "lbbench-images-pool"
    env = {
        **os.environ,
        **lab_environment(work / "state", pool=pool),
        "LABBUILDER_CACHE_DIR": str(work / "cache"),
    }
    command = [sys.executable, "-m", "labbuilder"]
    images_done = None
    started = time.monotonic()
    try:
        with subprocess.Popen(
            [*command, "up", str(lab)], env=env, stderr=subprocess.PIPE, text=True
        ) as proc:
            assert proc.stderr is not None
            for line in proc.stderr:
                print("   ", line.rstrip())
                if re.search(r"image \S+: built in", line):
                    images_done = time.monotonic() - started
        total = time.monotonic() - started
        if proc.returncode != 0:
            raise SystemExit(f"labbuilder up failed with exit {proc.returncode}")
    finally:
        subprocess.run([*command, "down", str(lab)], env=env, check=False, capture_output=True)
        remove_test_pool(pool)
    assert images_done is not None
    return images_done, total


def cold_first_up() -> None:
    with tempfile.TemporaryDirectory(prefix="lbbench-images-", dir="/var/tmp") as folder:
        work = Path(folder)
        Path(folder).chmod(0o755)
        before = images_before(work / "before")
        images, total = first_up(work / "now")
    boot = total - images
    print("first up of the default lab (3 nodes, zed-debian-12 role images), empty cache:")
    print(f"  images as before (base, then each role from scratch): {before:7.0f} s")
    print(f"  images now (the lab's chapters, side by side):        {images:7.0f} s"
          f"  ({images / before:.2f}x)")  # fmt: skip
    print(f"  the rest of up after its last image (nodes to ready): {boot:7.0f} s")
    print(f"  first up before (its images + the same rest):         {before + boot:7.0f} s")
    print(f"  first up now:                                         {total:7.0f} s"
          f"  ({total / (before + boot):.2f}x; target 300 s)")  # fmt: skip


def main() -> None:
    if sys.argv[1:] == ["--cold"]:
        cold_first_up()
        return
    with tempfile.TemporaryDirectory(prefix="lbbench-images-") as folder:
        work = Path(folder)
        cold, cached, disk = timed_builds(work / "build")
        first, second = second_pull_bytes(disk, work)
        overlay = overlay_after_boot(work)
        size = disk.stat().st_size
    print(f"base image (debian-12, qcow2 file):  {size / 2**20:8.1f} MB")
    print(f"overlay right after boot:            {overlay / 2**20:8.1f} MB")
    print(f"local build cold:                    {cold:8.1f} s")
    print(f"local build cached:                  {cached * 1000:8.1f} ms  ({cold / cached:.0f}x)")
    print(f"first pull downloaded:               {first:8d} bytes")
    print(f"second pull downloaded:              {second:8d} bytes (must be 0)")


if __name__ == "__main__":
    main()
