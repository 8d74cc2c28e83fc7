"""Neutron's API under concurrent load, served two ways side by side on one lab's controller:
the recipe's earlier setting (Debian's uWSGI layout with one process of four threads, in which
eventlet's monkey-patched locks are shared by real threads) and the recipe's own (its networking
stage's configure step: single-threaded processes).

For each way it rewrites /etc/neutron/neutron-api-uwsgi.ini, restarts neutron-api, and runs
bench/guest/neutron_load.py in the controller: CLIENTS concurrent clients, each ROUNDS times
creating a security group with an ICMP and a TCP 22 rule and a floating IP, then deleting them,
every request with a deadline. A request past its deadline counts as a hang. It prints requests
answered, hangs, errors and latencies per way, and leaves the recipe's way in place.

Run as root against a lab installed through initial-networks, with its environment
(LABBUILDER_STATE_DIR of the lab):
  .venv/bin/python bench/neutron_api.py LAB_FILE [--clients 4] [--rounds 10] [--timeout 60]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from labbuilder.adapters.ssh import SSHSession  # noqa: E402
from labbuilder.recipe.files import load_recipe  # noqa: E402

INI = "/etc/neutron/neutron-api-uwsgi.ini"
# Each way: the shell that sets it. The baseline is the recipe's earlier setting (Debian's layout,
# fewer workers); the recipe's own is read from its networking stage's configure step.
BASELINE = (
    f"sed -i 's/^processes = .*/processes = 1/; s/^threads = .*/threads = 4/' {INI}\n"
    f"sed -i '/^harakiri = /d' {INI}\n"
)


def recipe_way() -> str:
    step = next(
        s for s in load_recipe("zed-debian-12").stage("networking").steps if s.name == "configure"
    )
    return step.run


LOAD = Path(__file__).resolve().parent / "guest" / "neutron_load.py"


def serve(ssh: SSHSession, way: str) -> float:
    """Serve neutron's API the way ``way`` (shell) sets it; seconds until it answers again."""
    script = (
        f"{way}\n"
        "systemctl restart neutron-api\n"
        "for i in $(seq 1 300); do\n"
        "  curl -sf -m 5 http://controller:9696/ >/dev/null && exit 0; sleep 2\n"
        "done\n"
        "exit 1\n"
    )
    begin = time.monotonic()
    ssh.run_script(script, timeout=900).check("controller")
    return time.monotonic() - begin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lab_file", type=Path)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--network", default="ext-net")
    args = parser.parse_args()
    name = tomllib.loads(args.lab_file.read_text())["name"]
    state = Path(os.environ.get("LABBUILDER_STATE_DIR", "/var/lib/labbuilder")) / "labs" / name
    record = json.loads((state / "lab.json").read_text())
    controller = next(n for n in record["plan"]["nodes"] if n["name"] == "controller")
    results = {}
    with SSHSession(
        controller["nics"][0]["address"], record["user"], state / "id_ed25519",
        known_hosts=state / "known_hosts", node="controller",
    ) as ssh:  # fmt: skip
        ssh.run_script(f"cat > /root/neutron_load.py <<'LOAD'\n{LOAD.read_text()}\nLOAD\n").check(
            "controller"
        )
        ways = {"1 process, 4 threads (before)": BASELINE, "recipe's": recipe_way()}
        for way, shell in ways.items():
            started = serve(ssh, shell)
            run = ssh.run_script(
                ". /root/admin-openrc\n"
                f"python3 /root/neutron_load.py {args.network} {args.clients} {args.rounds} "
                f"{args.timeout}\n",
                timeout=args.clients * args.rounds * args.timeout * 6 + 600,
            ).check("controller")
            results[way] = json.loads(run.stdout.strip().splitlines()[-1])
            results[way]["start"] = round(started, 1)
            print(f"{way}: {json.dumps(results[way])}", flush=True)
    made = args.clients * args.rounds * 6
    print(f"\n== neutron's API, {args.clients} clients x {args.rounds} rounds ({made} requests) ==")
    print(
        f"{'way':<34}{'answered':>9}{'hangs':>7}{'errors':>8}"
        f"{'p50 s':>7}{'p95 s':>7}{'max s':>7}{'total s':>9}"
    )
    for way, r in results.items():
        print(
            f"{way:<34}{r['answered']:>9}{len(r['timeouts']):>7}{len(r['errors']):>8}"
            f"{r['p50']:>7}{r['p95']:>7}{r['max']:>7}{r['seconds']:>9}"
        )


if __name__ == "__main__":
    main()
