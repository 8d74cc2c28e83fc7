"""Labs from templates against labs installed from scratch, on this host, side by side in one run.

One core-path lab (the guide's three nodes at recipe zed-debian-12's minimum sizes, isolated,
the guide's own addresses) is brought up and installed from scratch, timed to "after image" and
to "after launch-instance"; a template is saved at each of those stages. Then, per template, a
new lab of the same plan is made from it (`up --from-template`) and its last stage's checks are
run again (`install --only STAGE`), three times one after the other: seconds to running with
the checks passing (the median lab's, every one listed), against the same lab installed from
scratch, and the disk the added lab takes against the template's. Each
stamped lab is timed alone on the host (the first lab's guests paused meanwhile).

Memory per added lab, from the "after launch-instance" template, as the host's used memory
(MemTotal - MemAvailable): with KSM off, one lab beside the first; then with KSM on, once its
merging settles; and the first alone again, KSM settled, once the added lab is down (a third lab
of 25 GB of disks does not fit this host's disk policy beside them). How many labs of
each fit: the planner's policy (full sizes against the host's memory less 1 GB, x1.5 with KSM)
and what the measured memory per added lab allows.

Targets (the templates issue): a lab from a template running with its last stage's checks
passing in <= 60 s; each added lab's disk <= 10% of the template's; with KSM each added lab's
memory <= 50% of the first's.

Run as root on a host with libvirt (about 40 minutes here):
  .venv/bin/python bench/labs.py [--workdir DIR] [--keep]
Labs are named ``lbbench-labs*``, templates ``lbbench-*``; all are removed afterwards, KSM is
left as it was.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from install import lab_disk, labbuilder, qemu_peaks  # noqa: E402
from lablib import full_lab, lab_environment, remove_test_pool  # noqa: E402

from labbuilder.lab.planner import HOST_MEMORY_RESERVE, KSM_OVERCOMMIT  # noqa: E402

POOL = "lbbench-labs-pool"
SAMPLES = 3  # labs stamped from each template, one after the other: the median one counts
FIRST = "lbbench-labs"
STAGES = {"image": "lbbench-image", "launch-instance": "lbbench-launch"}
KSM = Path("/sys/kernel/mm/ksm")
STAMP_TARGET = 60.0
DISK_TARGET = 0.10
MEMORY_TARGET = 0.50
GIB = 1024**3


def meminfo() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, value = line.split(":", 1)
        fields[key] = int(value.split()[0]) * 1024
    return fields


def used_memory(settle: float = 20.0) -> int:
    """The host's used memory (MemTotal - MemAvailable) after ``settle`` seconds."""
    time.sleep(settle)
    info = meminfo()
    return info["MemTotal"] - info["MemAvailable"]


def ksm_settings() -> dict[str, str]:
    return {
        name: (KSM / name).read_text().strip()
        for name in ("run", "pages_to_scan", "sleep_millisecs")
    }


def ksm_set(**values: str | int) -> None:
    for name, value in values.items():
        (KSM / name).write_text(f"{value}\n")


def ksm_restore(saved: dict[str, str]) -> None:
    """KSM back to the settings ``ksm_settings`` read (its pages unmerged if it was off)."""
    ksm_set(run=2 if saved["run"] == "0" else saved["run"])
    if saved["run"] == "0":
        time.sleep(5)
        ksm_set(run=0)
    ksm_set(pages_to_scan=saved["pages_to_scan"], sleep_millisecs=saved["sleep_millisecs"])


def ksm_sharing() -> int:
    return int((KSM / "pages_sharing").read_text())


def ksm_off() -> None:
    """Unmerge every page (run = 2), then stop KSM."""
    ksm_set(run=2)
    deadline = time.monotonic() + 300
    while int((KSM / "pages_shared").read_text()) and time.monotonic() < deadline:
        time.sleep(2)
    ksm_set(run=0)


def ksm_settle(timeout: float = 900.0) -> tuple[float, int]:
    """Run KSM briskly until the pages it shares stop growing (by < 1% in 60 s); (seconds,
    pages sharing)."""
    ksm_set(pages_to_scan=4000, sleep_millisecs=20, run=1)
    started = time.monotonic()
    last = -1
    while time.monotonic() - started < timeout:
        time.sleep(60)
        now = ksm_sharing()
        if last >= 0 and now - last <= max(last // 100, 256):
            return time.monotonic() - started, now
        last = now
    return time.monotonic() - started, ksm_sharing()


@contextlib.contextmanager
def paused(lab: str) -> Iterator[None]:
    """The lab's guests paused (no CPU, memory kept), resumed afterwards."""
    conn = libvirt.open("qemu:///system")
    try:
        domains = [d for d in conn.listAllDomains() if d.name().startswith(f"{lab}-")]
        for domain in domains:
            domain.suspend()
        try:
            yield
        finally:
            for domain in domains:
                domain.resume()
    finally:
        conn.close()


def lab_file(work: Path, name: str) -> Path:
    path = work / f"{name}.toml"
    path.write_text(full_lab(name, core=True, isolated=True))
    return path


def timed(*args: str, env: dict[str, str]) -> tuple[float, dict[str, Any]]:
    started = time.monotonic()
    result = labbuilder(*args, env=env)
    seconds = time.monotonic() - started
    if result.returncode != 0:
        raise SystemExit(
            f"labbuilder {' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    data: dict[str, Any] = {}
    with contextlib.suppress(ValueError):
        data = json.loads(result.stdout)
    return seconds, data


def stamp(work: Path, name: str, template: str, stage: str, env: dict[str, str]) -> dict[str, Any]:
    """``SAMPLES`` labs made from ``template`` one after the other (each taken down before the
    next; the last one stays up): each one's seconds to running with its stage's checks
    passing. The figures are the median sample's, with every sample listed: one stamp's time
    varies by tens of percent with what the guests' services happen to do at that moment."""
    path = lab_file(work, name)
    samples = []
    for index in range(SAMPLES):
        if index:
            labbuilder("down", str(path), env=env)
        up_seconds, _ = timed("up", str(path), "--from-template", template, "--json", env=env)
        check_seconds, report = timed("install", str(path), "--only", stage, "--json", env=env)
        checks = [c for s in report["stages"] for step in s["steps"] for c in step["checks"]]
        samples.append(
            {
                "up_seconds": up_seconds,
                "check_seconds": check_seconds,
                "checks": len(checks),
                "checks_passed": all(c["passed"] for c in checks) and report["result"] == "passed",
            }
        )
    allocated, capacity = lab_disk(name, POOL)
    ranked = sorted(samples, key=lambda x: x["up_seconds"] + x["check_seconds"])
    return {
        **ranked[len(ranked) // 2],
        "checks_passed": all(x["checks_passed"] for x in samples),
        "samples": [x["up_seconds"] + x["check_seconds"] for x in samples],
        "disk_allocated": allocated,
        "disk_capacity": capacity,
    }


def work_folder(given: str | None, stack: contextlib.ExitStack, prefix: str) -> Path:
    """``--workdir`` (made if missing), else a temporary folder removed when ``stack`` ends."""
    if given:
        work = Path(given).resolve()
        work.mkdir(parents=True, exist_ok=True)
        return work
    return Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=prefix)))


def keep_partial(work: Path, result: dict[str, Any]) -> None:
    """What was measured so far, in case a later phase fails."""
    (work / "labs-result.json").write_text(json.dumps(result, indent=1, default=str))


def run(work: Path, keep: bool) -> dict[str, Any]:
    env = {**lab_environment(work / "state"), "LABBUILDER_POOL": POOL}
    os.environ.update(env)
    result: dict[str, Any] = {"stamped": {}}
    first = lab_file(work, FIRST)
    ksm_off()
    result["used_before"] = used_memory(settle=5)
    result["disk_free"] = shutil.disk_usage(work).free
    started = time.monotonic()
    result["up_seconds"], _ = timed("up", str(first), env=env)
    seconds, _ = timed("install", str(first), "--until", "image", "--json", env=env)
    result["scratch_image"] = time.monotonic() - started
    result["save_image"], saved = timed(
        "template", "save", STAGES["image"], "--stage", "image", str(first), "--json", env=env
    )
    result["templates"] = {"image": saved}
    keep_partial(work, result)
    seconds, report = timed("install", str(first), "--json", env=env)
    result["scratch_launch"] = result["scratch_image"] + seconds
    result["first_result"] = report.get("result")
    result["save_launch"], saved = timed(
        "template", "save", STAGES["launch-instance"], "--stage", "launch-instance", str(first),
        "--json", env=env,
    )  # fmt: skip
    result["templates"]["launch-instance"] = saved
    # The first lab's stage snapshots (its memory at every stage) are in the templates now:
    # deleted, as a trainer would, so that the disk policy leaves room for the added labs.
    timed("snapshot", "delete", "--all", str(first), "--json", env=env)
    keep_partial(work, result)
    result["first_qemu"] = sum(qemu_peaks(FIRST).values())
    result["used_first"] = used_memory()

    # Each stamped lab is timed alone on the host, as a user making a lab from a template
    # would have it: the first lab's guests are paused meanwhile (they keep their memory).
    with paused(FIRST):
        for stage, template in STAGES.items():
            name = f"{FIRST}-{stage.split('-')[0]}"
            result["stamped"][stage] = stamp(work, name, template, stage, env)
            keep_partial(work, result)
            if stage == "image":
                labbuilder("down", str(work / f"{name}.toml"), env=env)
    # Memory: KSM off, one lab beside the first; then KSM on, its merging settled; then the
    # first alone, KSM settled again. (A third lab of 25 GB of disks does not fit this host's
    # disk beside the first, with its stage snapshots, and the added one: the disk policy.)
    result["used_one_added"] = used_memory()
    keep_partial(work, result)
    result["ksm_settle_one"] = ksm_settle()
    result["used_one_added_ksm"] = used_memory(settle=5)
    keep_partial(work, result)
    labbuilder("down", str(work / f"{FIRST}-launch.toml"), env=env)
    result["ksm_settle_first"] = ksm_settle()
    result["used_first_ksm"] = used_memory(settle=5)
    plan = json.loads((work / "state" / "labs" / FIRST / "lab.json").read_text())["plan"]
    result["lab_memory"] = sum(node["memory"] for node in plan["nodes"])
    result["memory_total"] = meminfo()["MemTotal"]
    if not keep:
        labbuilder("down", str(first), env=env)
        for template in STAGES.values():
            labbuilder("template", "delete", template, env=env)
    return result


def print_result(r: dict[str, Any]) -> None:
    out = print
    out("\n== labs from templates against labs installed from scratch ==")
    out(f"first lab: up {r['up_seconds']:.0f} s; install result {r['first_result']}")
    for stage, scratch in (("image", r["scratch_image"]), ("launch-instance", r["scratch_launch"])):
        stamped = r["stamped"][stage]
        template = r["templates"][stage]
        total = stamped["up_seconds"] + stamped["check_seconds"]
        size = template["disk_bytes"] + template["memory_bytes"]
        verdict = "passed" if stamped["checks_passed"] else "FAILED"
        save = r["save_" + stage.split("-")[0]]
        share = stamped["disk_allocated"] / size
        out(f"\nafter {stage}:")
        out(f"  from scratch (up + install)  {scratch:8.1f} s")
        out(
            f"  from the template            {total:8.1f} s  (up {stamped['up_seconds']:.1f} s, "
            f"{stamped['checks']} checks {stamped['check_seconds']:.1f} s, {verdict})"
        )
        samples = ", ".join(f"{x:.1f}" for x in stamped.get("samples", [total]))
        out(f"    the median of {len(stamped.get('samples', [total]))} labs stamped: {samples} s")
        out(
            f"    target <= {STAMP_TARGET:.0f} s: ratio {total / STAMP_TARGET:.2f}; "
            f"{scratch / total:.0f}x faster than from scratch"
        )
        out(
            f"  template save                {save:8.1f} s; template {size / GIB:.2f} GiB "
            f"(disks {template['disk_bytes'] / GIB:.2f}, "
            f"memory {template['memory_bytes'] / GIB:.2f})"
        )
        out(
            f"  disk per added lab           {stamped['disk_allocated'] / 2**20:8.0f} MiB, "
            f"{share:.1%} of the template; target <= {DISK_TARGET:.0%}: "
            f"ratio {share / DISK_TARGET:.2f}"
        )
    first = r["used_first"] - r["used_before"]
    plain = r["used_one_added"] - r["used_first"]
    merged = r["used_one_added_ksm"] - r["used_first_ksm"]
    settled, sharing = r["ksm_settle_one"]
    out("\nmemory (host MemTotal - MemAvailable):")
    out(f"  the first lab                {first / GIB:8.2f} GiB")
    out(f"    its QEMUs' peak resident   {r['first_qemu'] / GIB:8.2f} GiB")
    out(
        f"  per added lab, KSM off       {plain / GIB:8.2f} GiB, {plain / first:.0%} of the first's"
    )
    out(
        f"  per added lab, KSM on        {merged / GIB:8.2f} GiB, "
        f"{merged / first:.0%} of the first's"
    )
    out(
        f"    target <= {MEMORY_TARGET:.0%}: ratio {merged / first / MEMORY_TARGET:.2f} "
        f"(KSM settled in {settled:.0f} s, {sharing} pages sharing)"
    )
    room = r["memory_total"] - HOST_MEMORY_RESERVE
    lab = r["lab_memory"]
    with_ksm = math.floor((r["memory_total"] - r["used_first_ksm"]) / merged) if merged > 0 else 0
    out("\nlabs of this plan that fit this host:")
    out(
        f"  planner's policy: {math.floor(room / lab)} without KSM, "
        f"{math.floor(room * KSM_OVERCOMMIT / lab)} with KSM "
        f"(each {lab / GIB:.0f} GiB at full size)"
    )
    available = r["memory_total"] - r["used_first"]
    out(f"  measured: 1 + {math.floor(available / plain)} without KSM, 1 + {with_ksm} with KSM")
    disks = r["stamped"]["launch-instance"]["disk_capacity"]
    out(
        f"  disk policy (disks at full size, {disks / GIB:.0f} GiB a lab, against "
        f"{r['disk_free'] / GIB:.0f} GiB free): {math.floor(r['disk_free'] / disks)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", help="keep the labs' files and state here")
    parser.add_argument("--keep", action="store_true", help="keep the first lab and the templates")
    args = parser.parse_args()
    saved = ksm_settings()
    with contextlib.ExitStack() as stack:
        work = work_folder(args.workdir, stack, "lbbench-labs-")
        try:
            result = run(work, args.keep)
        finally:
            env = {**lab_environment(work / "state"), "LABBUILDER_POOL": POOL}
            for extra in ("image", "launch"):
                path = work / f"{FIRST}-{extra}.toml"
                if path.exists():
                    labbuilder("down", str(path), env=env)
            if not args.keep:
                labbuilder("down", str(work / f"{FIRST}.toml"), env=env)
                for template in STAGES.values():
                    labbuilder("template", "delete", template, env=env)
                os.environ["LABBUILDER_POOL"] = POOL
                remove_test_pool(POOL)
            ksm_restore(saved)
    print_result(result)
    print(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
