"""The install pipeline measured: recipe zed-debian-12 through the image service on a fresh
three-node lab, on the fast path (one in-guest API process per stage) and, with --faithful too,
the faithful path (the guide's CLI commands) on a second fresh lab.

Prints, per path: `up` seconds, install seconds per stage and node, a finished lab's re-run
seconds and the first-run/re-run ratio, snapshot restore seconds, apt runs and bytes of packages
fetched inside the guests, and the targets of the install-pipeline issue side by side:
  up + install through the image service <= 12 min (fast path), re-run <= 30 s,
  snapshot restore <= 15 s, apt bytes near zero (role images).

Run as root on a host with libvirt: .venv/bin/python bench/install.py [--faithful] [--until STAGE]
Labs use free subnets, the ``lbbench-`` prefix, and are removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from lablib import lab_environment, remove_test_pool, three_node_lab  # noqa: E402

from labbuilder.adapters.ssh import SSHSession  # noqa: E402

APT_PROBE = (
    "grep -c '^Start-Date' /var/log/apt/history.log 2>/dev/null || true; "
    "du -sb /var/cache/apt/archives 2>/dev/null | cut -f1"
)


def labbuilder(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "labbuilder", *args],
        env={**os.environ, **env}, capture_output=True, text=True, check=False,
    )  # fmt: skip


def apt_usage(state: Path) -> dict[str, tuple[int, int]]:
    """(apt runs so far, bytes in apt's package cache) per node."""
    record = json.loads((state / "lab.json").read_text())
    usage = {}
    for node in record["plan"]["nodes"]:
        with SSHSession(node["nics"][0]["address"], record["user"], state / "id_ed25519") as ssh:
            out = ssh.run("sudo -n sh -c %s", APT_PROBE).check(node["name"]).stdout.split()
            usage[node["name"]] = (int(out[0] or 0), int(out[1]) if len(out) > 1 else 0)
    return usage


def measure(path: str, until: str, work: Path) -> dict[str, Any]:
    name = f"lbbench-{path}"
    env = lab_environment(work / "state")
    lab_file = work / f"{name}.toml"
    lab_file.write_text(three_node_lab(name, role_images=True))
    state = work / "state" / "labs" / name
    result: dict[str, Any] = {"path": path}
    try:
        started = time.monotonic()
        up = labbuilder("up", str(lab_file), env=env)
        if up.returncode != 0:
            raise SystemExit(f"up failed:\n{up.stdout}\n{up.stderr}")
        result["up_seconds"] = time.monotonic() - started
        before = apt_usage(state)
        flags = ["--faithful"] if path == "faithful" else []
        begin = time.monotonic()
        first = labbuilder("install", str(lab_file), "--until", until, "--json", *flags, env=env)
        result["install_seconds"] = time.monotonic() - begin
        if first.returncode != 0:
            raise SystemExit(f"install failed:\n{first.stdout[-3000:]}\n{first.stderr[-3000:]}")
        report = json.loads(first.stdout)
        result["stages"] = {
            stage["name"]: {
                "seconds": stage["seconds"],
                "snapshot_seconds": stage["snapshot_seconds"],
                "by_node": _by_node(stage["steps"]),
            }
            for stage in report["stages"]
        }
        after = apt_usage(state)
        result["apt_runs"] = sum(after[n][0] - before[n][0] for n in after)
        result["apt_bytes"] = sum(max(0, after[n][1] - before[n][1]) for n in after)
        begin = time.monotonic()
        again = labbuilder("install", str(lab_file), "--until", until, "--json", *flags, env=env)
        result["rerun_seconds"] = time.monotonic() - begin
        if again.returncode != 0:
            raise SystemExit(f"re-run failed:\n{again.stdout[-3000:]}")
        begin = time.monotonic()
        restore = labbuilder("snapshot", "restore", "identity", str(lab_file), env=env)
        result["restore_seconds"] = time.monotonic() - begin
        if restore.returncode != 0:
            raise SystemExit(f"restore failed:\n{restore.stdout}\n{restore.stderr}")
        listed = labbuilder("snapshot", "list", str(lab_file), "--json", env=env)
        snaps = json.loads(listed.stdout) if listed.returncode == 0 else []
        result["snapshot_disk_bytes"] = sum(sum(s["disk_bytes"].values()) for s in snaps)
    finally:
        labbuilder("down", str(lab_file), env=env)
    return result


def _by_node(steps: list[dict[str, Any]]) -> dict[str, float]:
    """Seconds each node spent on its steps (a step's seconds include its checks)."""
    totals: dict[str, float] = {}
    for step in steps:
        totals[step["node"]] = totals.get(step["node"], 0.0) + step["seconds"]
    return {node: round(seconds, 1) for node, seconds in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faithful", action="store_true", help="also measure the faithful path")
    parser.add_argument("--until", default="image", help="last stage (default: image)")
    args = parser.parse_args()
    paths = ["fast", "faithful"] if args.faithful else ["fast"]
    results = []
    with tempfile.TemporaryDirectory(prefix="lbbench-install-") as tmp:
        try:
            for path in paths:
                results.append(measure(path, args.until, Path(tmp)))
        finally:
            os.environ.update(lab_environment(Path(tmp) / "state"))
            remove_test_pool()
    for result in results:
        total = result["up_seconds"] + result["install_seconds"]
        print(f"\n== {result['path']} path ==")
        print(f"up                      {result['up_seconds']:8.1f} s")
        for stage, data in result["stages"].items():
            nodes = ", ".join(f"{n} {s:.0f} s" for n, s in data["by_node"].items())
            snap = data["snapshot_seconds"]
            snap_text = f"  snapshot {snap:.1f} s" if snap is not None else ""
            print(f"  {stage:<22}{data['seconds']:8.1f} s   ({nodes}){snap_text}")
        print(f"install                 {result['install_seconds']:8.1f} s")
        print(f"up + install            {total:8.1f} s   target <= 720 s: ratio {total / 720:.2f}")
        print(
            f"re-run                  {result['rerun_seconds']:8.1f} s   target <= 30 s: ratio "
            f"{result['rerun_seconds'] / 30:.2f}; first run / re-run "
            f"{result['install_seconds'] / result['rerun_seconds']:.0f}x"
        )
        print(
            f"snapshot restore        {result['restore_seconds']:8.1f} s   target <= 15 s: ratio "
            f"{result['restore_seconds'] / 15:.2f}"
        )
        print(f"snapshot disk           {result['snapshot_disk_bytes'] / 1e9:8.2f} GB (all stages)")
        print(f"apt inside the guests   {result['apt_runs']} runs, {result['apt_bytes']} bytes")
    if len(results) == 2:
        fast, faithful = results
        ratio = faithful["install_seconds"] / fast["install_seconds"]
        print(f"\nfaithful / fast install: {ratio:.2f}")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
