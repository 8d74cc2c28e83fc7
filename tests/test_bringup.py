"""A real lab on the real libvirtd (qemu:///system, TCG): the guide's three nodes come up wired
as the guide says, `up` again is a no-op; a killed `up` is cleaned up by `down`, and a second
`up` while one runs is refused. The lab is the suite's shared one (conftest.guide_lab): this
module runs before test_install_e2e.py, which ends with `down` leaving nothing.

The lab uses free subnets (the guide's external network may hold this host's package mirror),
egress "none", its own state directory and storage pool, and names starting with ``lbtest-``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import GUIDE_HEARTBEAT, GUIDE_LAB
from lablib import lab_environment, lab_leftovers, one_node_lab, remove_labs
from lablib import run_labbuilder as labbuilder

from labbuilder.adapters.ssh import SSHSession

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """An environment of its own for the killed `up` (the shared lab has another)."""
    environment = lab_environment(tmp_path_factory.mktemp("state"))
    yield environment
    remove_labs(["lbtest-killed"], environment)


@pytest.fixture(scope="module")
def lab(guide_lab: dict[str, Any]) -> dict[str, Any]:
    """The suite's shared three-node lab (conftest.guide_lab), fresh: this module runs first."""
    return guide_lab


def nodes(lab: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {node["name"]: node for node in lab["record"]["plan"]["nodes"]}


def ssh(lab: dict[str, Any], node: str, command: str, timeout: float = 120) -> str:
    address = nodes(lab)[node]["nics"][0]["address"]
    with SSHSession(address, lab["record"]["user"], lab["key"]) as session:
        return session.run(command, timeout=timeout).check(node).stdout


def test_every_node_has_its_hostname_and_static_addresses(lab: dict[str, Any]) -> None:
    for name, node in nodes(lab).items():
        assert ssh(lab, name, "hostname").strip() == name
        shown = ssh(lab, name, "ip -4 -o addr show")
        configured = {(line.split()[1], line.split()[3]) for line in shown.splitlines()}
        for nic in node["nics"]:
            if nic["address"]:
                assert (nic["device"], f"{nic['address']}/{nic['prefix']}") in configured, shown
        hosts = ssh(lab, name, "cat /etc/hosts")
        assert "127.0.1.1" not in hosts
        for other in nodes(lab).values():
            assert f"{other['nics'][0]['address']} {other['name']}" in hosts


def test_each_node_is_a_new_cloud_init_machine_with_its_root_grown(lab: dict[str, Any]) -> None:
    """The built image as every node boots it (through its role image): NoCloud's cloud-init
    done, no unit failed, the root grown to the planned disk, an identity of its own
    (machine-id, host key: the one known_hosts holds), the image's locale and masked units."""
    checks = {
        "status": "cloud-init status --wait --long; cloud-id",
        "failed": "systemctl list-units --failed --no-legend --plain",
        "size": "df -B1 --output=size / | tail -1",
        "machine-id": "cat /etc/machine-id",
        "host-key": "sudo -n cat /etc/ssh/ssh_host_ed25519_key.pub",
        "locale": "locale",
        "apt-daily": "systemctl is-enabled apt-daily.timer || true",
    }
    # One session per node, the nodes at once: each SSH login costs seconds under emulation.
    script = "".join(f"echo '=== {key}'; {command}\n" for key, command in checks.items())

    def look(name: str) -> dict[str, str]:
        sections = ssh(lab, name, script, timeout=600).split("=== ")[1:]  # seven commands
        return {key: text.strip() for key, _, text in (s.partition("\n") for s in sections)}

    with ThreadPoolExecutor(max_workers=len(nodes(lab))) as pool:
        seen = dict(zip(nodes(lab), pool.map(look, nodes(lab)), strict=True))
    ids = set()
    for name, node in nodes(lab).items():
        found = seen[name]
        assert set(found) == set(checks), found
        assert "status: done" in found["status"] and "nocloud" in found["status"], found
        assert found["failed"] == "", (name, found["failed"])
        assert int(found["size"]) > 0.9 * node["disks"][0]["size"], (name, found["size"])
        assert re.fullmatch(r"[0-9a-f]{32}", found["machine-id"]), found["machine-id"]
        ids.add(found["machine-id"])
        assert found["host-key"].split()[1] in (lab["state"] / "known_hosts").read_text()
        assert found["locale"].startswith("LANG=C.UTF-8")
        assert found["apt-daily"] == "masked"
    assert len(ids) == len(nodes(lab))
    console = (lab["state"] / "console" / "controller.log").read_text(errors="replace")
    assert "Linux version" in console  # the serial console is logged


def test_nodes_reach_each_other_on_management_and_tunnel_networks(lab: dict[str, Any]) -> None:
    all_nodes = nodes(lab)
    compute = all_nodes["compute1"]
    assert "1 received" in ssh(lab, "network", f"ping -c 1 -W 5 {compute['nics'][0]['address']}")
    assert "1 received" in ssh(lab, "network", f"ping -c 1 -W 5 {compute['nics'][1]['address']}")
    assert "1 received" in ssh(
        lab, "controller", f"ping -c 1 -W 5 {all_nodes['network']['nics'][0]['address']}"
    )
    assert "1 received" in ssh(lab, "compute1", "ping -c 1 -W 5 controller")


def test_the_external_nic_is_up_without_an_address(lab: dict[str, Any]) -> None:
    link = ssh(lab, "network", "ip -o link show eth2")
    assert "state UP" in link or "LOWER_UP" in link, link
    assert ssh(lab, "network", "ip -4 -o addr show dev eth2").strip() == ""


def test_ssh_config_works_with_plain_ssh(lab: dict[str, Any], tmp_path: Path) -> None:
    result = labbuilder("ssh-config", str(lab["file"]), env=lab["env"])
    assert result.returncode == 0, result.stderr
    config = tmp_path / "ssh_config"
    config.write_text(result.stdout)
    answer = subprocess.run(
        ["ssh", "-F", str(config), "-o", "BatchMode=yes", "controller", "hostname"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert answer.stdout.strip() == "controller", answer.stderr


def test_labbuilder_ssh_runs_a_command(lab: dict[str, Any]) -> None:
    result = labbuilder("ssh", "--file", str(lab["file"]), "controller", "hostname", env=lab["env"])
    assert result.stdout.strip() == "controller", result.stderr


STAMPED = re.compile(r"^(\d\d:\d\d:\d\d) (.+)$")
# The raw output of mmdebstrap, apt, dpkg and of labbuilder's own host commands.
RAW = re.compile(
    r"^(\$ |Get:|Hit:|Ign:|Fetched |Unpacking |Setting up |Selecting previously |"
    r"Preparing to unpack |Processing triggers |Reading package lists|[IWE]: )"
)


def test_up_in_a_ci_log_shows_phases_and_heartbeats_and_logs_the_detail(
    lab: dict[str, Any],
) -> None:
    """The shared lab's `up` ran as a CI log gets it (output captured, not a terminal; role
    images built there when the cache was empty): only timestamped phase lines, heartbeats while
    the nodes boot, no external tool's raw output, pure JSON on stdout, the detail in up.log."""
    lines = lab["up_stderr"].splitlines()
    assert lines, "up printed no progress"
    assert "\x1b" not in lab["up_stderr"] and "┘" not in lab["up_stderr"], lab["up_stderr"]
    stamped = [STAMPED.match(line) for line in lines]
    assert all(stamped), [line for line, match in zip(lines, stamped, strict=True) if not match]
    texts = [match.group(2) for match in stamped if match]
    assert not [text for text in texts if RAW.match(text)], lab["up_stderr"]
    assert any(text.startswith(f"network {GUIDE_LAB}-") for text in texts), texts
    assert "probing the host" in texts, texts

    # While the nodes boot (from the first node's start to the last one ready), heartbeats.
    first = next(i for i, t in enumerate(texts) if re.match(r"node \w+: domain running", t))
    ready = max(i for i, t in enumerate(texts) if "configured by cloud-init: ready" in t)
    beats = [t for t in texts[first:ready] if re.fullmatch(r"still running: .+ \(\d+ s\)", t)]
    assert len(beats) >= 2, texts
    times = [datetime.strptime(m.group(1), "%H:%M:%S") for m in stamped[first : ready + 1] if m]
    gaps = [(b - a).total_seconds() % 86400 for a, b in zip(times, times[1:], strict=False)]
    assert max(gaps) <= GUIDE_HEARTBEAT + 2, (gaps, texts)  # never silent for long

    # The detail is in the lab's up.log: every phase line, and the host commands run.
    log = Path(lab["env"]["LABBUILDER_STATE_DIR"]) / "reports" / GUIDE_LAB / "up.log"
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    detail = log.read_text()
    runs = [line for line in detail.splitlines() if line.startswith("==== ")]
    assert runs and "labbuilder up" in runs[0] and lab["file"] in runs[0], runs
    logged = detail.split(runs[0])[1].split("==== ")[0]
    for text in texts:
        if not text.startswith("still running: "):
            assert text in logged, text
    assert re.search(r"^\d\d:\d\d:\d\d \$ ip6?tables", logged, re.MULTILINE), logged


def test_status_shows_running_nodes(lab: dict[str, Any]) -> None:
    result = labbuilder("status", str(lab["file"]), "--json", env=lab["env"])
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert {n["name"]: n["state"] for n in status["nodes"]} == {
        "controller": "running", "network": "running", "compute1": "running"
    }  # fmt: skip
    assert status["virt_type"] in ("kvm", "qemu")


def test_a_running_lab_counts_the_memory_its_nodes_hold_as_its_own(lab: dict[str, Any]) -> None:
    """`up` on a running lab checks memory as a new lab would, minus what its nodes hold:
    otherwise the host's memory in use by the lab itself makes `up` refuse it."""
    from labbuilder.api.facade import load_lab
    from labbuilder.host.facts import gather_host_facts, read_memory_available

    nodes_memory = sum(node["memory"] for node in nodes(lab).values())
    before = read_memory_available()
    facts = gather_host_facts(load_lab(Path(lab["file"])), Path(lab["env"]["LABBUILDER_STATE_DIR"]))
    after = read_memory_available()
    assert before is not None and after is not None and facts.facts.memory_available is not None
    held = facts.facts.memory_available - min(before, after)
    # libvirt reports a running guest's current memory: its planned size, give or take a balloon.
    assert 0.9 * nodes_memory <= held <= 1.1 * nodes_memory + abs(before - after)


def test_up_again_is_a_no_op(lab: dict[str, Any]) -> None:
    started = time.monotonic()
    result = labbuilder("up", str(lab["file"]), "--json", env=lab["env"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["created"] is False
    assert time.monotonic() - started < lab["up_seconds"]


def test_killed_up_is_cleaned_by_down_and_a_second_up_is_refused(
    env: dict[str, str], tmp_path: Path
) -> None:
    lab_file = tmp_path / "lab.toml"
    lab_file.write_text(one_node_lab("lbtest-killed"))
    process = subprocess.Popen(
        [sys.executable, "-m", "labbuilder", "up", str(lab_file)],
        env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while not lab_leftovers("lbtest-killed")["domains"]:
            if process.poll() is not None:
                pytest.fail(f"up ended before creating its domain: {process.stderr.read()}")  # type: ignore[union-attr]
            assert time.monotonic() < deadline
            time.sleep(0.5)
        second = labbuilder("up", str(lab_file), env=env, timeout=120)
        assert second.returncode == 2
        assert "another labbuilder command is changing lab lbtest-killed" in second.stderr
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    result = labbuilder("down", str(lab_file), env=env)
    assert result.returncode == 0, result.stderr
    assert lab_leftovers("lbtest-killed") == {"domains": [], "networks": [], "volumes": []}
