"""Live snapshots of a two-node lab (the guide's controller, 2 GB, and network node, 512 MB):
seconds to take a snapshot of the whole lab (pause all, snapshot all, resume all), seconds to
restore it (pause all, revert all, resume all) and to set the guests' clocks afterwards, and
the disk each snapshot costs (growth of the lab's volumes in the pool, and the memory state
kept in the nodes' qcow2 disks, from their snapshot tables).

Run as root on a host with libvirt: .venv/bin/python bench/snapshots.py [--rounds N]
The lab uses free subnets, the ``lbbench-`` prefix and a pool of its own, and everything is
removed at the end, also after a failure.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from lablib import TEST_CACHE, lab_environment, remove_labs, two_node_lab  # noqa: E402

from labbuilder.adapters import libvirt as lv  # noqa: E402
from labbuilder.adapters import storage  # noqa: E402
from labbuilder.adapters.ssh import SSHSession  # noqa: E402
from labbuilder.lifecycle import snapshots  # noqa: E402
from labbuilder.lifecycle.state import lab_state  # noqa: E402

LAB = "lbbench-snap"
POOL = "lbbench-snap-pool"
URI = "qemu:///system"


def lab_bytes(conn: object) -> int:
    pool = storage.find_pool(conn, POOL)
    assert pool is not None
    return sum(int(volume.info()[2]) for volume in storage.lab_volumes(pool, LAB))


def guest_work(state_dir: Path, round_: int) -> None:
    """Change something on every node between snapshots, as an install stage would."""
    from labbuilder.lifecycle.state import load_state_record

    record = load_state_record(lab_state(LAB, state_dir / "labs" / LAB))
    assert record is not None
    for node in record["plan"]["nodes"]:
        address = node["nics"][0]["address"]
        key = state_dir / "labs" / LAB / "id_ed25519"
        with SSHSession(address, record["user"], key) as session:
            session.run("dd if=/dev/urandom of=stage%s bs=1M count=16 status=none", round_).check(
                node["name"]
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="snapshots to take and restore")
    args = parser.parse_args()
    os.environ.setdefault("LABBUILDER_CACHE_DIR", str(TEST_CACHE))  # share the built image
    with tempfile.TemporaryDirectory(prefix="lbbench-snap-") as folder:
        work = Path(folder)
        env = {**lab_environment(work / "state"), "LABBUILDER_POOL": POOL}
        os.environ.update(env)
        lab_file = work / "lab.toml"
        lab_file.write_text(two_node_lab(LAB))
        try:
            run(lab_file, work / "state", args.rounds)
        finally:
            remove_labs([LAB], env)


def run(lab_file: Path, state_dir: Path, rounds: int) -> None:
    command = [sys.executable, "-m", "labbuilder"]
    started = time.monotonic()
    subprocess.run([*command, "up", str(lab_file)], check=True, capture_output=True)
    print(f"lab {LAB} (controller 2 GB, network 512 MB) up in {time.monotonic() - started:.0f} s")
    conn = lv.connect(URI)
    try:
        creates, grown, recorded = [], [], []
        for round_ in range(rounds):
            guest_work(state_dir, round_)
            before = lab_bytes(conn)
            started = time.monotonic()
            info = snapshots.take_snapshot(lv.LibvirtHypervisor(conn), LAB, f"stage{round_}")
            creates.append(time.monotonic() - started)
            grown.append(lab_bytes(conn) - before)
            recorded.append(sum(info.disk_bytes.values()))
            nodes = ", ".join(f"{n} {b / 2**20:.0f} MB" for n, b in info.disk_bytes.items())
            print(
                f"take stage{round_}: {creates[-1]:.2f} s, pool +{grown[-1] / 2**20:.0f} MB "
                f"(per node {nodes})"
            )
        restores, clocks = [], []
        for round_ in reversed(range(rounds)):
            restores.append(
                snapshots.restore_snapshot(lv.LibvirtHypervisor(conn), LAB, f"stage{round_}")
            )
            started = time.monotonic()
            skew = snapshots.sync_clocks(lab_state(LAB, state_dir / "labs" / LAB))
            clocks.append(time.monotonic() - started)
            print(
                f"restore stage{round_}: {restores[-1]:.2f} s, clocks set in {clocks[-1]:.2f} s "
                f"(moved {max(skew.values()):.0f} s)"
            )
        total = lab_bytes(conn)
        started = time.monotonic()
        deleted = snapshots.delete_snapshots(lv.LibvirtHypervisor(conn), LAB, after="stage0")
        delete_seconds = time.monotonic() - started
        print(
            f"delete {len(deleted)} snapshots: {delete_seconds:.2f} s, "
            f"pool {(lab_bytes(conn) - total) / 2**20:+.0f} MB"
        )
    finally:
        conn.close()
    started = time.monotonic()
    subprocess.run([*command, "down", str(lab_file)], check=True, capture_output=True)
    print(f"down (with snapshot stage0 left): {time.monotonic() - started:.1f} s")
    print()
    print(f"create seconds:          {statistics.median(creates):.2f} (median of {rounds})")
    print(f"restore seconds:         {statistics.median(restores):.2f} (median of {rounds})")
    print(f"  + clock sync seconds:  {statistics.median(clocks):.2f}")
    print(f"disk bytes per snapshot: {int(statistics.median(grown))} (pool growth, median)")
    print(f"  memory state per snapshot (all nodes): {int(statistics.median(recorded))}")


if __name__ == "__main__":
    main()
