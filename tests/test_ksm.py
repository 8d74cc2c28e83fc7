"""KSM: what `doctor` reports and what `doctor --enable-ksm` does, on a folder laid out like
/sys/kernel/mm/ksm (the host's own is changed only by the command a user runs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from labbuilder.adapters import hostprobe
from labbuilder.common.errors import HostError
from labbuilder.host.findings import ENABLE_KSM, ksm_finding
from labbuilder.model.probe import HostProbeFacts, KsmFacts


def ksm_folder(tmp_path: Path, run: int, sharing: int = 0, shared: int = 0) -> Path:
    folder = tmp_path / "ksm"
    folder.mkdir()
    (folder / "run").write_text(f"{run}\n")
    (folder / "pages_sharing").write_text(f"{sharing}\n")
    (folder / "pages_shared").write_text(f"{shared}\n")
    return folder


def test_enable_ksm_starts_it_once(tmp_path: Path) -> None:
    folder = ksm_folder(tmp_path, 0)
    assert hostprobe.read_ksm(folder) == KsmFacts(0, 0, 0)
    assert hostprobe.enable_ksm(dry_run=True, folder=folder) == [f"echo 1 > {folder}/run"]
    assert (folder / "run").read_text() == "0\n"  # a dry run changes nothing
    assert hostprobe.enable_ksm(dry_run=False, folder=folder) == [f"echo 1 > {folder}/run"]
    assert hostprobe.read_ksm(folder).run == 1
    assert hostprobe.enable_ksm(dry_run=False, folder=folder) == []  # running already


def test_a_kernel_without_ksm_is_said_and_refused(tmp_path: Path) -> None:
    assert hostprobe.read_ksm(tmp_path / "none") == KsmFacts(None)
    with pytest.raises(HostError, match="has no KSM"):
        hostprobe.enable_ksm(dry_run=False, folder=tmp_path / "none")


def test_doctor_says_what_ksm_means_for_labs(tmp_path: Path) -> None:
    off = ksm_finding(HostProbeFacts(uri="x", ksm=KsmFacts(0)))
    assert off.detail == "available, not running" and off.fix == ENABLE_KSM
    assert "1.5 times" in off.consequence
    on = ksm_finding(
        HostProbeFacts(uri="x", ksm=hostprobe.read_ksm(ksm_folder(tmp_path, 1, 2560, 100)))
    )
    assert on.detail == "running: 2560 guest pages share 100 (10 MB saved)"
    assert on.fix is None


def test_this_hosts_ksm_is_read() -> None:
    facts = hostprobe.read_ksm()
    if Path("/sys/kernel/mm/ksm/run").exists():
        assert facts.run in (0, 1, 2)
    else:
        assert facts.run is None
