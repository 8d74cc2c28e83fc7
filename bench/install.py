"""The install pipeline measured: recipe zed-debian-12 through the image service on a fresh
three-node lab, on the fast path (one in-guest API process per stage) and, with --faithful too,
the faithful path (the guide's CLI commands) on a second fresh lab.

Prints, per path: `up` seconds, install seconds per stage and node, a finished lab's re-run
seconds and the first-run/re-run ratio, snapshot restore seconds, apt runs and bytes of packages
fetched inside the guests, and the targets of the install-pipeline issue side by side:
  up + install through the image service <= 12 min (fast path), re-run <= 30 s,
  snapshot restore <= 15 s, apt bytes near zero (role images).

With --full instead: the whole recipe, every chapter through "launch an instance", on the
five-node lab zed-full (controller, network, compute1, block1, object1) on the fast path. Prints
`up` seconds, seconds per stage and node and which stages dominate, peak memory per node (two
ways: the guest's own MemTotal - MemAvailable sampled over SSH every 20 s during the install,
and the QEMU process's peak resident set, VmHWM, on the host at the end), the disk the lab takes
in the storage pool (volume allocations, stage snapshots included), then runs the checks of
tests/test_install_full.py on the lab (the instance ACTIVE, its floating IP answering ping from
the router's namespace and from this host), and the issue's target side by side:
  up through a verified instance <= 60 min (fast path).
It also prints the core path's share of that run: `up`, the stages that are not optional
chapters, and launch-instance through the floating IP's ping.

With --core: the same on the core path itself, the guide's three nodes at the smallest sizes
recipe zed-debian-12 declares (its minimums per role: the lab file sets no size) with no optional
chapter (no block1, object1, dashboard, volume, object or stack).

Run as root on a host with libvirt:
  .venv/bin/python bench/install.py [--faithful] [--until STAGE]
  .venv/bin/python bench/install.py --full|--core [--keep] [--workdir DIR]
Labs use free subnets, the ``lbbench-`` prefix, and are removed afterwards (--keep: kept).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from lablib import full_lab, lab_environment, remove_test_pool, three_node_lab  # noqa: E402

from labbuilder.adapters import libvirt as lv  # noqa: E402
from labbuilder.adapters import storage  # noqa: E402
from labbuilder.adapters.ssh import SSHSession  # noqa: E402
from labbuilder.lifecycle.state import gateway_namespace  # noqa: E402
from labbuilder.recipe.files import load_recipe  # noqa: E402

CORE_TARGET = 1800.0  # the core path (up to a verified instance) on this host
FULL_TARGET = 3600.0  # seconds: up through a verified instance on the five-node lab
# What the core path (no optional chapter) skips of recipe zed-debian-12: the optional stages
# (the recipe says which), and launch-instance's steps that use them (no-ops without them).
INSTANCE_STAGE = "launch-instance"
INSTANCE_CHAPTER_STEPS = ("volume", "object", "stack")
SAMPLE_EVERY = 20.0  # seconds between memory samples

BENCH_POOL = "lbbench-install-pool"
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


def bench_environment(work: Path) -> dict[str, str]:
    """The test environment with the bench's own pool: tests remove theirs when they end."""
    return {**lab_environment(work / "state"), "LABBUILDER_POOL": BENCH_POOL}


def remove_bench_pool(work: Path) -> None:
    os.environ.update(bench_environment(work))
    remove_test_pool(BENCH_POOL)


def measure(path: str, until: str, work: Path) -> dict[str, Any]:
    name = f"lbbench-{path}"
    env = bench_environment(work)
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


# --- the full pipeline (--full) ---------------------------------------------------------------


class MemorySampler:
    """Samples MemTotal - MemAvailable in every node of a lab over SSH, keeping the peak."""

    def __init__(self, state: Path) -> None:
        self.record = json.loads((state / "lab.json").read_text())
        self.key = state / "id_ed25519"
        self.peak: dict[str, int] = {}  # bytes
        self.total: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=120)

    def _run(self) -> None:
        sessions: dict[str, SSHSession] = {}
        try:
            while not self._stop.is_set():
                for node in self.record["plan"]["nodes"]:
                    with contextlib.suppress(Exception):  # a busy guest skips a sample
                        self._sample(sessions, node)
                self._stop.wait(SAMPLE_EVERY)
        finally:
            for session in sessions.values():
                session.close()

    def _sample(self, sessions: dict[str, SSHSession], node: dict[str, Any]) -> None:
        name = node["name"]
        if name not in sessions:
            address = node["nics"][0]["address"]
            namespace = gateway_namespace(self.record)
            sessions[name] = SSHSession(address, self.record["user"], self.key, namespace=namespace)
        text = sessions[name].run("cat /proc/meminfo", timeout=60).check(name).stdout
        fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in text.splitlines()}
        used = fields["MemTotal"] - fields["MemAvailable"]
        self.total[name] = fields["MemTotal"]
        self.peak[name] = max(self.peak.get(name, 0), used)


def qemu_peaks(lab: str) -> dict[str, int]:
    """Peak resident memory (VmHWM) of each node's QEMU process on the host, in bytes."""
    peaks = {}
    for pidfile in Path("/run/libvirt/qemu").glob(f"{lab}-*.pid"):
        node = pidfile.stem[len(lab) + 1 :]
        with contextlib.suppress(OSError, ValueError):
            status = Path(f"/proc/{int(pidfile.read_text().strip())}/status").read_text()
            line = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
            peaks[node] = int(line.split()[1]) * 1024
    return peaks


def lab_disk(lab: str, pool_name: str) -> tuple[int, int]:
    """(bytes allocated, bytes of capacity) of the lab's volumes in the storage pool."""
    conn = lv.connect("qemu:///system", readonly=True)
    try:
        pool = storage.find_pool(conn, pool_name)
        if pool is None:
            return 0, 0
        infos = [volume.info() for volume in storage.lab_volumes(pool, lab)]
        return sum(info[2] for info in infos), sum(info[1] for info in infos)
    finally:
        conn.close()


def measure_full(
    work: Path, keep: bool, core: bool = False, isolated: bool = False
) -> dict[str, Any]:
    name = "lbbench-core" if core else "lbbench-full"
    env = bench_environment(work)
    lab_file = work / f"{name}.toml"
    lab_file.write_text(full_lab(name, core=core, isolated=isolated))
    state = work / "state" / "labs" / name
    result: dict[str, Any] = {"path": "fast", "lab": name}
    try:
        started = time.monotonic()
        up = labbuilder("up", str(lab_file), env=env)
        if up.returncode != 0:
            raise SystemExit(f"up failed:\n{up.stdout}\n{up.stderr}")
        result["up_seconds"] = time.monotonic() - started
        result["sizes"] = node_sizes(state)
        begin = time.monotonic()
        with MemorySampler(state) as sampler:
            run = labbuilder(
                "install", str(lab_file), "--recipe", "zed-debian-12", "--json", env=env
            )
        result["install_seconds"] = time.monotonic() - begin
        result["memory_peak"] = sampler.peak
        result["memory_total"] = sampler.total
        result["qemu_peak"] = qemu_peaks(name)
        result["disk_allocated"], result["disk_capacity"] = lab_disk(name, env["LABBUILDER_POOL"])
        report: dict[str, Any] = {}
        with contextlib.suppress(ValueError):
            report = json.loads(run.stdout)
        result["result"] = report.get("result", "error")
        result["stages"] = {
            stage["name"]: {
                "seconds": stage["seconds"],
                "snapshot_seconds": stage["snapshot_seconds"],
                "by_node": _by_node(stage["steps"]),
                "failed": [s["step"] for s in stage["steps"] if s["status"] == "failed"],
            }
            for stage in report.get("stages", [])
        }
        if run.returncode != 0:
            result["failure"] = (run.stdout[-3000:] if not report else "") + run.stderr[-3000:]
            return result
        result["verified"] = verify_instance(state)
        result["verified_seconds"] = time.monotonic() - started
        result["core_seconds"] = core_path_seconds(result, report)
    finally:
        if not keep:
            labbuilder("down", str(lab_file), env=env)
    return result


def core_path_seconds(result: dict[str, Any], report: dict[str, Any]) -> float:
    """Seconds from `up` to the instance verified, counting only what the core path runs:
    `up`, the stages that are not optional chapters (each with its snapshot), and in
    launch-instance the steps before the optional chapters' parts (up to and including the
    network node's ping of the floating IP, which runs after the controller's `facts`).
    On the five-node lab this is an upper bound of the three-node core path's figure: the
    chapters' extra nodes idle beside it. On the core lab it is the run itself."""
    optional = {stage.name for stage in load_recipe("zed-debian-12").stages if stage.optional}
    total = result["up_seconds"]
    for stage in report.get("stages", []):
        if stage["name"] in optional:
            continue
        if stage["name"] == INSTANCE_STAGE:
            total += sum(
                step["seconds"]
                for step in stage["steps"]
                # The fast path runs consecutive API steps as one ("volume..stack").
                if step["step"].split("..")[0] not in INSTANCE_CHAPTER_STEPS
            )
        else:
            total += stage["seconds"] + (stage["snapshot_seconds"] or 0.0)
    return total


def verify_instance(state: Path) -> dict[str, Any]:
    """tests/test_install_full.py's checks of the instance, on the bench's lab."""
    from test_install_full import host_ping, instance_facts, router_ping

    facts = instance_facts(state)
    record = json.loads((state / "lab.json").read_text())
    namespace = gateway_namespace(record)
    return {
        "status": facts["status"],
        "floating_ip": facts["FLOATING_IP"],
        "router_ping": " 0% packet loss" in router_ping(state, facts),
        "host_ping": host_ping(facts["FLOATING_IP"], namespace).returncode == 0,
    }


def node_sizes(state: Path) -> dict[str, str]:
    """Each node's vCPUs, memory and root disk as `up` planned them (and whether the recipe's
    minimum set them)."""
    plan = json.loads((state / "lab.json").read_text())["plan"]
    sizes = {}
    for node in plan["nodes"]:
        text = f"{node['vcpus']} vCPUs / {node['memory'] / 1024**3:g} GB / "
        text += f"{node['disks'][0]['size'] / 1024**3:g} GB disk"
        if node.get("recipe_minimum"):
            text += f" (recipe minimum: {', '.join(node['recipe_minimum'])})"
        sizes[node["name"]] = text
    return sizes


def print_full(result: dict[str, Any]) -> None:
    gib = 1024**3
    what = "core path (no optional chapter)" if result["lab"] == "lbbench-core" else "full pipeline"
    print(f"\n== {what}, fast path, lab {result['lab']} ==")
    for node, size in result.get("sizes", {}).items():
        print(f"  {node:<24}{size}")
    print(f"up                        {result['up_seconds']:8.1f} s")
    stages = result.get("stages", {})
    for stage, data in stages.items():
        nodes = ", ".join(f"{n} {s:.0f} s" for n, s in data["by_node"].items())
        snap = data["snapshot_seconds"]
        snap_text = f"  snapshot {snap:.1f} s" if snap is not None else ""
        failed = f"  FAILED: {', '.join(data['failed'])}" if data["failed"] else ""
        print(f"  {stage:<24}{data['seconds']:8.1f} s   ({nodes}){snap_text}{failed}")
    install = result["install_seconds"]
    print(f"install                   {install:8.1f} s   ({result['result']})")
    ranked = sorted(stages.items(), key=lambda item: item[1]["seconds"], reverse=True)
    top = ", ".join(f"{n} {d['seconds'] / install:.0%}" for n, d in ranked[:4] if install)
    print(f"dominant stages           {top}")
    print("peak memory per node      guest used (MemTotal - MemAvailable, sampled) / host VmHWM")
    for node in sorted(set(result["memory_peak"]) | set(result["qemu_peak"])):
        used = result["memory_peak"].get(node, 0) / gib
        total = result["memory_total"].get(node, 0) / gib
        host = result["qemu_peak"].get(node, 0) / gib
        print(f"  {node:<24}{used:6.2f} GiB of {total:5.2f} GiB   QEMU {host:5.2f} GiB")
    print(
        f"disk in the pool          {result['disk_allocated'] / gib:8.2f} GiB allocated "
        f"(capacity {result['disk_capacity'] / gib:.0f} GiB; stage snapshots included)"
    )
    if "verified" in result:
        verified = result["verified"]
        total = result["verified_seconds"]
        print(
            f"instance                  {verified['status']}, floating IP "
            f"{verified['floating_ip']}: router namespace ping "
            f"{'ok' if verified['router_ping'] else 'FAILED'}, host ping "
            f"{'ok' if verified['host_ping'] else 'FAILED'}"
        )
        print(
            f"up through a verified instance {total:8.1f} s   target <= {FULL_TARGET:.0f} s: "
            f"ratio {total / FULL_TARGET:.2f}"
        )
        if result["lab"] == "lbbench-core":
            core = result["core_seconds"]
            print(
                f"  the core path (up, stages, their snapshots) {core:8.1f} s   target <= "
                f"{CORE_TARGET:.0f} s: ratio {core / CORE_TARGET:.2f}"
            )
        if result["lab"] == "lbbench-full":
            core = result["core_seconds"]
            print(
                f"  of which the core path    {core:8.1f} s   (up, the stages that are not "
                f"optional chapters, launch-instance through the ping: ratio "
                f"{core / FULL_TARGET:.2f})"
            )
    else:
        print(f"install failed:\n{result.get('failure', '')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faithful", action="store_true", help="also measure the faithful path")
    parser.add_argument("--until", default="image", help="last stage (default: image)")
    parser.add_argument(
        "--full", action="store_true", help="every chapter on the five-node lab zed-full"
    )
    parser.add_argument(
        "--core",
        action="store_true",
        help="like --full, on the guide's three nodes sized as zed-full, with no optional "
        "chapter: the core path to a verified instance",
    )
    parser.add_argument(
        "--isolated",
        action="store_true",
        help="with --full/--core: the guide's own addresses, the lab isolated (its gateways in a "
        "namespace of its own; the host's ping of the floating IP from there)",
    )
    parser.add_argument("--keep", action="store_true", help="with --full/--core: keep the lab")
    parser.add_argument(
        "--workdir",
        help="with --full/--core: keep the lab file and state directory here (to resume a kept lab "
        "with `labbuilder install --from STAGE`) instead of a temporary directory",
    )
    args = parser.parse_args()
    if args.full or args.core:
        with contextlib.ExitStack() as stack:
            if args.workdir:
                work = Path(args.workdir).resolve()
                work.mkdir(parents=True, exist_ok=True)
            else:
                temporary = tempfile.TemporaryDirectory(prefix="lbbench-install-")
                work = Path(stack.enter_context(temporary))
            try:
                full = measure_full(work, args.keep, core=args.core, isolated=args.isolated)
            finally:
                if not args.keep:
                    remove_bench_pool(work)
        print_full(full)
        print(json.dumps(full, indent=1))
        return
    paths = ["fast", "faithful"] if args.faithful else ["fast"]
    results = []
    with tempfile.TemporaryDirectory(prefix="lbbench-install-") as tmp:
        try:
            for path in paths:
                results.append(measure(path, args.until, Path(tmp)))
        finally:
            remove_bench_pool(Path(tmp))
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
