"""The readiness ladder's judgement of cloud-init and its stop, without a guest: cloud-init's own
status files (as Debian 12's cloud-init 22.4 and Ubuntu 14.04's 0.7.5 write them) and a domain of
libvirt's test driver."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import libvirt
import pytest

from labbuilder.adapters import libvirt as lv
from labbuilder.lifecycle.readiness import (
    NodeNotReadyError,
    NodeTarget,
    cloud_init_problem,
    kernel_stall,
    wait_ready,
)


def status(*, config_finished: float | None, errors: tuple[str, ...] = ()) -> str:
    stage = {"errors": [], "finished": 1796476534.0, "start": 1796476528.7}
    v1: dict[str, object] = {
        "datasource": "DataSourceNoCloud [seed=/dev/vdb][dsmode=net]",
        "init-local": stage,
        "init": {**stage, "errors": list(errors)},
        "modules-config": {**stage, "finished": config_finished},
        "modules-final": {"errors": [], "finished": None, "start": None},
        "stage": "modules-config" if config_finished is None else None,
    }
    return "status\n" + json.dumps({"v1": v1}, indent=1)


def test_a_node_is_ready_once_cloud_init_has_configured_it_not_after_its_final_stage() -> None:
    assert cloud_init_problem(status(config_finished=None), 0) == (
        "cloud-init has not configured the node yet"
    )
    # modules-final has not run (it waits for multi-user.target): ready all the same.
    assert cloud_init_problem(status(config_finished=1796476551.9), 0) is None


def test_cloud_init_errors_end_the_ladder_at_once() -> None:
    problem = cloud_init_problem(status(config_finished=None, errors=("no seed found",)), 0)
    assert problem == "fatal: cloud-init reported errors: no seed found"


def test_a_cloud_init_without_a_status_file_is_ready_when_it_has_finished() -> None:
    assert cloud_init_problem("waiting\n", 0) == "cloud-init has not finished"
    assert cloud_init_problem("result\n{}", 0) is None
    assert cloud_init_problem('result\n{"v1": {"errors": []}}', 0) is None
    assert cloud_init_problem('result\n{"v1": {"errors": ["x failed"]}}', 0) == (
        "fatal: cloud-init reported errors: x failed"
    )
    assert cloud_init_problem("status\n{", 0) == "cloud-init's status is being written"
    assert cloud_init_problem("", 255) == "cloud-init has not finished"


def test_a_stopped_up_ends_the_climb_at_the_next_poll(tmp_path: Path) -> None:
    conn = libvirt.open("test:///default")
    try:
        hypervisor = lv.LibvirtHypervisor(conn)  # the test driver: "test" is a running domain
        target = NodeTarget("controller", "192.0.2.11", "52:54:00:00:00:01", "debian",
                            tmp_path / "key", tmp_path / "console.log")  # fmt: skip
        stop = threading.Event()
        stop.set()
        with pytest.raises(NodeNotReadyError, match=r"node controller: stopped before 'running'"):
            wait_ready(hypervisor, "test", target, stop=stop)
        # Not stopped, the same domain climbs its first rung, then waits for its NIC's link.
        with pytest.raises(NodeNotReadyError, match=r"did not reach 'link' within 1 s"):
            wait_ready(hypervisor, "test", target, timeouts={"link": 1.0})
    finally:
        conn.close()


SOFT_LOCKUP = "[  252.101113] watchdog: BUG: soft lockup - CPU#1 stuck for 26s! [modprobe:312]"
RCU_STALL = "[   61.300214] rcu: INFO: rcu_preempt self-detected stall on CPU"


def test_a_kernel_stalled_at_boot_is_reset_once_then_named_in_the_failure(tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    console.write_text(
        "[    8.2] systemd[1]: Starting modprobe@drm.service\n"
        f"\x1b[0m{SOFT_LOCKUP}\r\n[  252.101200] Call Trace:\n[  252.101210]  <TASK>\n"
    )
    notes: list[str] = []

    def note(message: str) -> None:
        notes.append(message)
        with console.open("a") as out:  # the boot after the reset stalls too
            out.write(f"[    0.000000] Linux version 6.1.0\n{RCU_STALL}\n")

    conn = libvirt.open("test:///default")
    try:
        hypervisor = lv.LibvirtHypervisor(conn)
        target = NodeTarget("controller", "192.0.2.11", "52:54:00:00:00:01", "debian",
                            tmp_path / "key", console)  # fmt: skip
        with pytest.raises(NodeNotReadyError) as failed:
            wait_ready(hypervisor, "test", target, timeouts={"link": 1.0}, note=note)
    finally:
        conn.close()
    assert notes == [f"node controller: its kernel stalled while booting ({SOFT_LOCKUP}); reset it"]
    # The second boot's headline, not the first's: the console before the reset is not counted.
    assert f"the guest's kernel reported: {RCU_STALL}" in str(failed.value)
    assert "did not reach 'link' within 1 s" in str(failed.value)


def test_a_console_without_a_stall_has_no_headline(tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    console.write_text("[    0.329274] rcu: Preemptible hierarchical RCU implementation.\n")
    assert kernel_stall(console) is None
    assert kernel_stall(tmp_path / "missing.log") is None
    console.write_text(f"x\n{RCU_STALL}\n{SOFT_LOCKUP}\n")
    assert kernel_stall(console) == RCU_STALL
    assert kernel_stall(console, offset=len(f"x\n{RCU_STALL}\n")) == SOFT_LOCKUP
