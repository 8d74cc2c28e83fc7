"""Image figures: base image size, overlay bytes right after a node boots, local build time
cold and cached, and the bytes a second pull downloads (must be 0).

Run as root on a host with libvirt and mmdebstrap: .venv/bin/python bench/images.py
The cold build goes to a temporary cache (about 75 s natively); the pulls are served by a local
HTTP server; the boot uses a one-node lab with free subnets (``lbbench-`` prefix), removed after.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from lablib import lab_environment, one_node_lab, remove_test_pool  # noqa: E402

from labbuilder.adapters import libvirt as lv  # noqa: E402
from labbuilder.adapters import storage  # noqa: E402
from labbuilder.catalog import find_image  # noqa: E402
from labbuilder.imagebuild import build_image  # noqa: E402
from labbuilder.imagecache import pull  # noqa: E402
from labbuilder.imagemodel import (  # noqa: E402
    ChecksumAlgorithm,
    DiskFormat,
    DownloadSource,
    ImageEntry,
)


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


def main() -> None:
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
