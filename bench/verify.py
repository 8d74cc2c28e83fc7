"""Tempest against the core-path lab, timed per suite: `labbuilder verify` of a lab installed
through launch-instance (the guide's three nodes at recipe zed-debian-12's minimum sizes).

Runs Tempest's smoke tests one service at a time (identity, image, network, compute), then the
whole smoke suite (scenario tests included, the recipe's expected skips left out), and prints
per suite: seconds, tests passed, failed and skipped, and seconds per test run; the whole smoke
suite against the sum of its parts side by side (concurrency's gain).

Run as root, on a lab that is up and installed (bench/labs.py --keep leaves one):
  .venv/bin/python bench/verify.py LAB.toml [--state-dir DIR] [--pool POOL] [--suite NAME ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

from labbuilder.verify.results import TestCase

SUITES = {
    "identity": r"^tempest\.api\.identity\..*\bsmoke\b",
    "image": r"^tempest\.api\.image\..*\bsmoke\b",
    "network": r"^tempest\.api\.network\..*\bsmoke\b",
    "compute": r"^tempest\.api\.compute\..*\bsmoke\b",
    "smoke": "smoke",
}


def verify(lab_file: str, suite: str, env: dict[str, str]) -> tuple[float, dict[str, Any]]:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "labbuilder", "verify", lab_file, "--suite", suite, "--json"],
        env={**os.environ, **env}, capture_output=True, text=True, check=False,
    )  # fmt: skip
    seconds = time.monotonic() - started
    try:
        return seconds, json.loads(result.stdout)
    except ValueError:
        raise SystemExit(f"verify --suite {suite} failed:\n{result.stderr[-3000:]}") from None


def services(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per service of the report's summary: its counts and the sum of its tests' seconds."""
    table = {name: {**counts, "seconds": 0.0} for name, counts in report["summary"].items()}
    for test in report.get("tests", []):
        service = TestCase(test["test"], test["status"]).service  # as the summary counts it
        if service in table:
            table[service]["seconds"] += test["seconds"]
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("lab_file")
    parser.add_argument("--state-dir", help="LABBUILDER_STATE_DIR of the lab")
    parser.add_argument("--pool", help="LABBUILDER_POOL of the lab")
    parser.add_argument("--suite", action="append", choices=sorted(SUITES), default=[])
    args = parser.parse_args()
    env = {}
    if args.state_dir:
        env["LABBUILDER_STATE_DIR"] = args.state_dir
    if args.pool:
        env["LABBUILDER_POOL"] = args.pool
    rows: dict[str, dict[str, Any]] = {}
    for name in args.suite or list(SUITES):
        seconds, report = verify(args.lab_file, SUITES[name], env)
        counts = {"passed": 0, "failed": 0, "skipped": 0}
        for service in report["summary"].values():
            for key in counts:
                counts[key] += service[key]
        rows[name] = {"seconds": seconds, "tempest_seconds": report["seconds"], **counts,
                      "services": services(report),
                      "failures": report["failures"], "skips": report["skips"]}  # fmt: skip
        print(f"{name}: {seconds:.0f} s, {counts}", file=sys.stderr, flush=True)
    print("\n== Tempest on the core-path lab, per suite ==")
    print(f"{'suite':<10} {'seconds':>8} {'passed':>7} {'failed':>7} {'skipped':>8} {'s/test':>7}")
    for name, row in rows.items():
        ran = row["passed"] + row["failed"]
        per = row["seconds"] / ran if ran else 0.0
        print(
            f"{name:<10} {row['seconds']:8.0f} {row['passed']:7d} {row['failed']:7d} "
            f"{row['skipped']:8d} {per:7.1f}"
        )
    print("\nper service (seconds: the sum of its tests' own times, class setup not included)")
    heads = ("passed", "failed", "skipped", "seconds")
    print(f"{'suite':<10} {'service':<15} " + " ".join(f"{h:>8}" for h in heads))
    for name, row in rows.items():
        for service, counts in row["services"].items():
            print(
                f"{name:<10} {service:<15} {counts['passed']:8d} {counts['failed']:8d} "
                f"{counts['skipped']:8d} {counts['seconds']:8.0f}"
            )
    parts = [rows[n]["seconds"] for n in ("identity", "image", "network", "compute") if n in rows]
    if "smoke" in rows and len(parts) == 4:
        print(
            f"whole smoke suite {rows['smoke']['seconds']:.0f} s against its API parts one "
            f"after the other {sum(parts):.0f} s: ratio {rows['smoke']['seconds'] / sum(parts):.2f}"
        )
    for name, row in rows.items():
        for failure in row["failures"]:
            print(f"FAILED ({name}) {failure['test']}: {failure['reason']}")
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
