"""The fast path's warm Python against a plain ``python3``, on the controller of a lab that is up
and installed through the clients stage (such as one `bench/install.py --core --keep --workdir
DIR` kept): seconds per openstacksdk check, each way, side by side, and the ratio.

Each round runs the same three checks of recipe zed-debian-12 (list the users, list the images,
list the networks, as admin) once with ``python3 -c`` (the baseline: every call imports
openstacksdk) and once with ``python3 /usr/local/lib/labbuilder/warmpython.py -c`` (a forked child
of a server that imported it once). The first warm call of a run starts the server when none
runs: its seconds are printed apart.

Run as root, with the lab's environment (LABBUILDER_STATE_DIR of the kept lab):
  .venv/bin/python bench/warmpython.py LAB_FILE [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from labbuilder.adapters.ssh import SSHSession  # noqa: E402
from labbuilder.recipe.render import WARM_PYTHON_PATH  # noqa: E402

CHECKS = {
    "users": "print(sorted(u.name for u in c.list_users()))",
    "images": "print([i.name for i in c.image.images()])",
    "networks": "print([n.name for n in c.network.networks()])",
}
STOP_SERVER = (
    "pid=$(cat /run/labbuilder/warmpython.lock 2>/dev/null); "
    '[ -n "$pid" ] && kill "$pid" 2>/dev/null; sleep 1; true'
)


def timed(session: SSHSession, python: str, body: str) -> float:
    code = f"import openstack; c = openstack.connect(); {body}"
    command = f". /root/admin-openrc && {python} -c {json.dumps(code)}"
    begin = time.monotonic()
    session.run("sudo -n bash -c %s", command, timeout=600).check("controller")
    return time.monotonic() - begin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lab_file", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    name = tomllib.loads(args.lab_file.read_text())["name"]
    state = Path(os.environ.get("LABBUILDER_STATE_DIR", "/var/lib/labbuilder")) / "labs" / name
    record = json.loads((state / "lab.json").read_text())
    controller = next(n for n in record["plan"]["nodes"] if n["name"] == "controller")
    warm = f"python3 {WARM_PYTHON_PATH}"
    with SSHSession(controller["nics"][0]["address"], record["user"], state / "id_ed25519") as ssh:
        ssh.run("sudo -n bash -c %s", f"test -x {WARM_PYTHON_PATH}").check(
            "controller (run `labbuilder install` with this version first)"
        )
        ssh.run("sudo -n bash -c %s", STOP_SERVER).check("controller")
        start = timed(ssh, warm, "print(c.current_project_id)")
        plain: dict[str, list[float]] = {check: [] for check in CHECKS}
        warmed: dict[str, list[float]] = {check: [] for check in CHECKS}
        for _ in range(args.rounds):
            for check, body in CHECKS.items():
                plain[check].append(timed(ssh, "python3", body))
                warmed[check].append(timed(ssh, warm, body))
    print(f"\n== openstacksdk checks on {name}'s controller, median of {args.rounds} rounds ==")
    print(f"first warm call (starts the server)  {start:6.1f} s")
    print(f"{'check':<12}{'python3':>10}{'warm':>10}{'ratio':>8}")
    for check in CHECKS:
        cold, hot = statistics.median(plain[check]), statistics.median(warmed[check])
        print(f"{check:<12}{cold:9.1f}s{hot:9.1f}s{hot / cold:8.2f}")
    cold = statistics.median([s for v in plain.values() for s in v])
    hot = statistics.median([s for v in warmed.values() for s in v])
    print(f"{'all':<12}{cold:9.1f}s{hot:9.1f}s{hot / cold:8.2f}")


if __name__ == "__main__":
    main()
