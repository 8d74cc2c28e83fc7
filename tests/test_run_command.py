"""`labbuilder run` for CI: up, install, reports, down in one command, on a real one-node lab
(libvirtd, TCG) with a tiny recipe: repeated fresh runs are counted and their reports kept;
a failed run keeps the lab for inspection."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
from lablib import lab_environment, one_node_lab, remove_test_pool
from lablib import run_labbuilder as labbuilder

from labbuilder.adapters import libvirt as lv

pytestmark = [pytest.mark.integration, pytest.mark.slow]
LAB = "lbtest-cli-run"
POOL = "lbtest-cli-pool"  # its own: removing the shared test pool would hit other tests' labs

RECIPE = {
    "recipe.toml": 'name = "lbtest-tiny"\ndescription = "two tiny stages"\nguide = "none"\n',
    "stages/10-hello.toml": """
name = "hello"
[[steps]]
name = "greet"
roles = ["controller"]
guide = "L1"
run = "echo hello > /root/lbtest-hello"
[[steps.checks]]
name = "greeted"
run = "cat /root/lbtest-hello"
expect = "^hello$"
""",
    "stages/20-fail.toml": """
name = "fail"
[[steps]]
name = "maybe"
roles = ["controller"]
run = "{{ 'exit 9' if settings.get('fail') else 'true' }}"
""",
}


def domains(lab: str) -> list[str]:
    conn = lv.connect("qemu:///system", readonly=True)
    try:
        return [d.name() for d in conn.listAllDomains() if d.name().startswith(f"{lab}-")]
    finally:
        conn.close()


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[dict[str, str], Path, Path]]:
    env = lab_environment(tmp_path / "state", pool=POOL)
    lab_file = tmp_path / "lab.toml"
    lab_file.write_text(one_node_lab(LAB))
    recipe = tmp_path / "recipe"
    for name, text in RECIPE.items():
        (recipe / name).parent.mkdir(parents=True, exist_ok=True)
        (recipe / name).write_text(text)
    try:
        yield env, lab_file, recipe
    finally:
        labbuilder("down", str(lab_file), env=env)
        remove_test_pool(POOL)


def test_repeated_runs_are_counted_and_their_reports_kept(
    setup: tuple[dict[str, str], Path, Path], tmp_path: Path
) -> None:
    env, lab_file, recipe = setup
    reports = tmp_path / "out"
    result = labbuilder(
        "run", str(lab_file), "--recipe", str(recipe), "--repeat", "2", "--no-snapshots",
        "--report-dir", str(reports), "--json", env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout)
    assert summary["passed"] == 2 and len(summary["runs"]) == 2
    for number, run in enumerate(summary["runs"], start=1):
        assert run["passed"] and not run["kept"]
        assert set(run["stages"]) == {"hello", "fail"}
        junit = ET.parse(reports / f"run-{number}" / "latest.xml").getroot()
        names = [case.get("name") for case in junit.iter("testcase")]
        assert "greet check: greeted" in names
        up = json.loads((reports / f"run-{number}" / "up-latest.json").read_text())
        assert up["result"] == "passed" and up["nodes"]["controller"]["rung"] == "ready"
        assert set(up["nodes"]["controller"]["rungs"]) == {"running", "link", "port 22",
                                                           "ssh login", "cloud-init"}  # fmt: skip
        # Each run's own boot of the node, from its kernel's first line: kept beside its reports.
        boot = (reports / f"run-{number}" / "console-controller.log").read_text(errors="replace")
        assert boot.count("Linux version") == 1, boot[:2000]
    assert domains(LAB) == []  # each run took its lab down


def test_a_failed_run_keeps_the_lab_unless_always_down(
    setup: tuple[dict[str, str], Path, Path], tmp_path: Path
) -> None:
    env, lab_file, recipe = setup
    recipe_toml = recipe / "recipe.toml"
    recipe_toml.write_text(recipe_toml.read_text() + "[settings]\nfail = true\n")
    result = labbuilder(
        "run", str(lab_file), "--recipe", str(recipe), "--no-snapshots",
        "--report-dir", str(tmp_path / "out"), env=env,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert "install failed: stage fail, step maybe, node controller" in result.stdout
    assert "exit code: 9" in result.stdout
    assert "0 of 1 runs passed" in result.stdout
    assert domains(LAB) == [f"{LAB}-controller"]  # kept for inspection
    report = json.loads((tmp_path / "out" / "latest.json").read_text())
    assert report["result"] == "failed"
    assert report["failure"] == {"stage": "fail", "step": "maybe", "node": "controller"}
