"""The install pipeline for real: recipe zed-debian-12 through the image service on a real
three-node lab (libvirtd, TCG guests booted from role images) on the fast path, then the
identity stage again on the faithful path; a re-run is a no-op; stage snapshots bring the lab
back; a failing step stops with its report and `--from` resumes; `down` leaves nothing.

Guests reach nothing outside the lab (egress "none"): the role images carry every package.
The lab uses free subnets, its own state directory and pool, and names starting with lbtest-.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from browser import artifacts, board_cells, chromium, wait_for
from conftest import GUIDE_LAB, GUIDE_POOL
from lablib import gateway_leftovers, lab_leftovers
from lablib import run_labbuilder as labbuilder

from labbuilder.adapters import libvirt as lv
from labbuilder.adapters import storage
from labbuilder.adapters.ssh import SSHSession

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def lab(guide_lab: dict[str, Any]) -> dict[str, Any]:
    """The suite's shared three-node lab (conftest.guide_lab), after test_bringup.py's checks."""
    return guide_lab


def ssh(lab: dict[str, Any], node: str, command: str) -> str:
    planned = next(n for n in lab["record"]["plan"]["nodes"] if n["name"] == node)
    address = planned["nics"][0]["address"]
    with SSHSession(address, lab["record"]["user"], lab["state"] / "id_ed25519") as session:
        return session.run("sudo -n bash -c %s", command, timeout=600).check(node).stdout


def install(lab: dict[str, Any], *args: str) -> tuple[int, dict[str, Any], str]:
    result = labbuilder("install", lab["file"], "--json", *args, env=lab["env"])
    report: dict[str, Any] = {}
    with contextlib.suppress(ValueError):  # the assertion on the exit code shows the output
        report = json.loads(result.stdout)
    return result.returncode, report, result.stdout + result.stderr


def steps(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [step for stage in report["stages"] for step in stage["steps"]]


def test_fast_path_through_the_image_service(lab: dict[str, Any]) -> None:
    code, report, output = install(lab, "--until", "image")
    assert code == 0, output
    assert report["result"] == "passed" and report["api_path"] == "fast"
    by_key = {(s["node"], s["stage"], s["step"]): s for s in steps(report)}
    assert all(s["status"] in ("ok", "guarded", "skipped") for s in steps(report))
    assert by_key[("controller", "environment", "packages")]["status"] == "guarded"  # role image
    # The controller's image holds the schemas its build made: the guide's syncs find them done.
    for stage in ("identity", "image"):
        assert by_key[("controller", stage, "db-sync")]["status"] == "guarded", stage
    merged = by_key[("controller", "identity", "service-project..demo")]
    assert merged["path"] == "fast" and merged["status"] == "ok"
    assert by_key[("controller", "image", "identity")]["path"] == "fast"
    assert by_key[("controller", "image", "upload")]["path"] == "fast"
    images = ssh(
        lab, "controller", ". /root/admin-openrc && openstack image list -f value -c Name -c Status"
    )
    assert "lbtest active" in images.splitlines(), images
    # Each stage's snapshot paused the guests; their clocks were stepped to the host's after it.
    before = time.time()
    guest = float(ssh(lab, "controller", "date +%s.%N"))
    assert before - 5 < guest < time.time() + 5, (before, guest)
    assert report["images"]["controller"]["manifest"]["recipe_hash"]

    junit = ET.parse(lab["state"] / "reports" / "latest.xml").getroot()
    suites = {suite.get("name"): suite for suite in junit.findall("testsuite")}
    assert set(suites) == {
        f"zed-debian-12.{n}" for n in ("environment", "identity", "clients", "image")
    }
    cases = [case for suite in suites.values() for case in suite.findall("testcase")]
    expected = sum(1 + len(s["checks"]) for s in steps(report))
    assert len(cases) == expected
    assert not [case for case in cases if case.find("failure") is not None]


def test_a_rerun_of_a_finished_lab_runs_nothing(lab: dict[str, Any]) -> None:
    code, report, output = install(lab, "--until", "image")
    assert code == 0, output
    statuses = {s["status"] for s in steps(report)}
    assert statuses <= {"done-before", "skipped"}, statuses


# Tempest's identity and image API tests that a lab through the image stage can run: the API's
# discovery, tokens, a domain made and removed as the admin, an image registered, uploaded and
# read back, the image API's versions.
VERIFY_SUITES = (
    r"tempest\.api\.identity\.v3\.test_api_discovery\.",
    r"tempest\.api\.identity\.v3\.test_tokens\.TokensV3Test\.test_create_token",
    r"tempest\.api\.identity\.admin\.v3\.test_domains\.DomainsTestJSON\.test_create_update_delete_domain",
    r"tempest\.api\.image\.v2\.test_images\.BasicOperationsImagesTest\.test_register_upload_get_image_file",
    r"tempest\.api\.image\.v2\.test_versions\.",
)


def test_verify_runs_tempests_identity_and_image_tests_against_the_lab(
    lab: dict[str, Any],
) -> None:
    """`labbuilder verify` for real, on the lab through the image stage: Debian's Tempest on
    this host, configured from the lab, its results one JUnit case per test."""
    args = [arg for suite in VERIFY_SUITES for arg in ("--suite", suite)]
    result = labbuilder("verify", lab["file"], *args, "--json", env=lab["env"], timeout=1800)
    secrets = json.loads((lab["state"] / "secrets.json").read_text())
    assert secrets["ADMIN_PASS"] not in result.stdout + result.stderr
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    report = json.loads(result.stdout)
    assert report["result"] == "passed" and report["tempest"] == "33.0.0"
    summary = report["summary"]
    assert set(summary) == {"identity", "image"}, summary
    assert summary["identity"]["passed"] >= 6 and summary["image"]["passed"] >= 2, summary
    assert not report["failures"]
    assert "SSH server" in report["ssh_validation"]
    ran = {test["test"] for test in report["tests"] if test["status"] == "passed"}
    assert any(t.endswith("test_register_upload_get_image_file") for t in ran), ran

    reports = lab["state"] / "reports"
    junit = ET.parse(reports / "verify-latest.xml").getroot()
    suites = {suite.get("name"): suite for suite in junit.findall("testsuite")}
    assert set(suites) == {"tempest.identity", "tempest.image"}
    cases = [case for suite in suites.values() for case in suite.findall("testcase")]
    assert len(cases) == len(report["tests"])
    assert not [case for case in cases if case.find("failure") is not None]
    assert {case.get("classname") + "." + case.get("name") for case in cases} >= ran
    # the install's own report is still there, beside it
    assert (reports / "latest.xml").exists()
    workspace = max((lab["state"] / "verify").iterdir())
    conf = workspace / "etc" / "tempest.conf"
    assert conf.stat().st_mode & 0o777 == 0o600
    assert secrets["ADMIN_PASS"] in conf.read_text()


def test_a_suite_of_expected_skips_only_is_reported_without_running_tempest(
    lab: dict[str, Any],
) -> None:
    """A suite whose every test is one of the recipe's expected skips (here the SSH scenario
    that the offline test image cannot serve) passes with each test skipped for the recipe's
    reason; Tempest itself is not run (it fails a run that selects nothing)."""
    suite = r"^tempest\.scenario\.test_server_basic_ops\."
    result = labbuilder("verify", lab["file"], "--suite", suite, "--json", env=lab["env"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["result"] == "passed" and report["tempest_exit_code"] == 0, report
    tests = report["tests"]
    assert tests and {t["status"] for t in tests} == {"skipped"}, tests
    assert all("test_server_basic_ops" in t["test"] for t in tests), tests
    assert all("curl" in t["reason"] for t in tests), tests  # the recipe's own reason
    assert report["summary"] == {"scenario": {"passed": 0, "failed": 0, "skipped": len(tests)}}
    workspace = max((lab["state"] / "verify").iterdir())
    assert not (workspace / ".stestr").exists() or not any(
        p.name.isdigit() for p in (workspace / ".stestr").iterdir()
    ), "Tempest ran"
    junit = ET.parse(lab["state"] / "reports" / "verify-latest.xml").getroot()
    cases = junit.findall("testsuite/testcase")
    assert len(cases) == len(tests) and all(c.find("skipped") is not None for c in cases)


def test_the_faithful_path_runs_the_guides_commands(lab: dict[str, Any]) -> None:
    """The identity stage again on the faithful path: its API steps run as the guide's CLI
    commands (their markers differ from the fast path's merged step); the rest is done."""
    code, report, output = install(lab, "--only", "identity", "--faithful")
    assert code == 0, output
    assert report["result"] == "passed" and report["api_path"] == "faithful"
    identity = report["stages"][0]
    ran = {s["step"]: s for s in identity["steps"] if s["status"] in ("ok", "guarded")}
    assert set(ran) == {"service-project", "demo"}
    assert all(s["path"] == "faithful" for s in ran.values())
    assert all(c["passed"] for s in ran.values() for c in s["checks"])
    assert {s["status"] for s in identity["steps"] if s["step"] not in ran} == {"done-before"}


def test_stage_snapshots_bring_the_whole_lab_back(lab: dict[str, Any]) -> None:
    listed = labbuilder("snapshot", "list", lab["file"], "--json", env=lab["env"])
    assert listed.returncode == 0, listed.stderr
    snapshots = {s["name"]: s for s in json.loads(listed.stdout)}
    assert {"environment", "identity", "clients", "image"} <= set(snapshots)
    assert all(s["complete"] for s in snapshots.values())

    back = labbuilder("snapshot", "restore", "clients", lab["file"], env=lab["env"])
    assert back.returncode == 0, back.stdout + back.stderr
    markers = ssh(lab, "controller", "ls /var/lib/labbuilder/steps")
    assert "clients.env-files" in markers and not [
        m for m in markers.split() if m.startswith("image.")
    ]
    assert ssh(lab, "controller", "systemctl is-active glance-api || true").strip() != "active"

    again = labbuilder("snapshot", "restore", "image", lab["file"], env=lab["env"])
    assert again.returncode == 0, again.stdout + again.stderr
    assert "image.upload" in ssh(lab, "controller", "ls /var/lib/labbuilder/steps")
    assert ssh(lab, "controller", "systemctl is-active glance-api").strip() == "active"


BROKEN_RECIPE = {
    "recipe.toml": 'name = "lbtest-broken"\ndescription = "fails once"\nguide = "none"\n',
    "stages/10-first.toml": """
name = "first"
[[steps]]
name = "mark"
roles = ["controller"]
run = "date +%s%N > /root/lbtest-first"
""",
    "stages/20-broken.toml": """
name = "broken"
guide = "L1-2"
[[steps]]
name = "fail"
roles = ["controller"]
guide = "L2"
run = '''
echo "looking for /root/lbtest-fixed"
test -f /root/lbtest-fixed || { echo "lbtest: not fixed yet" >&2; exit 7; }
'''
[[steps]]
name = "after"
roles = ["all"]
after = ["fail"]
run = "touch /root/lbtest-after"
""",
}


def test_a_failing_step_stops_with_its_report_and_from_resumes(
    lab: dict[str, Any], tmp_path: Path
) -> None:
    recipe = tmp_path / "broken"
    for name, text in BROKEN_RECIPE.items():
        (recipe / name).parent.mkdir(parents=True, exist_ok=True)
        (recipe / name).write_text(text)
    result = labbuilder(
        "install", lab["file"], "--recipe", str(recipe), "--no-snapshots", env=lab["env"]
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "install failed: stage broken, step fail, node controller" in result.stdout
    assert "exit code: 7" in result.stdout
    assert "lbtest: not fixed yet" in result.stdout
    assert "guide:     L2" in result.stdout
    resume = f"resume with: labbuilder install {lab['file']} --recipe {recipe} --from broken"
    assert resume in result.stdout
    assert "missing" in ssh(lab, "network", "test -f /root/lbtest-after || echo missing")
    first = ssh(lab, "controller", "cat /root/lbtest-first")

    ssh(lab, "controller", "touch /root/lbtest-fixed")
    resumed = labbuilder(
        "install", lab["file"], "--recipe", str(recipe), "--no-snapshots", "--from", "broken",
        env=lab["env"],
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert ssh(lab, "controller", "cat /root/lbtest-first") == first  # stage first not re-run
    ssh(lab, "network", "test -f /root/lbtest-after")


STAMPED = "lbtest-stamped"
TEMPLATE = "lbtest-image"
CLASS = "lbtest-cls"


def console_prompt(port: int, files: Path, name: str, node: str) -> str:
    """What a node's serial console shows after Enter, through the class's entry as the
    handout says (`ssh -t ... console NODE`), until a login prompt (Ctrl-] then leaves)."""
    console = subprocess.Popen(
        ["ssh", "-tt", "-p", str(port), "-i", str(files / name), "-o", "BatchMode=yes",
         "-o", f"UserKnownHostsFile={files / f'{name}.known_hosts'}", "root@127.0.0.1",
         "console", node],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    assert console.stdin is not None and console.stdout is not None
    seen = b""
    try:
        deadline = time.monotonic() + 90
        while b"login:" not in seen and time.monotonic() < deadline:
            console.stdin.write(b"\r")
            console.stdin.flush()
            ready, _, _ = select.select([console.stdout], [], [], 5)
            if ready:
                seen += os.read(console.stdout.fileno(), 4096)
        console.stdin.write(b"\x1d")
        console.stdin.flush()
        console.wait(timeout=30)
    finally:
        if console.poll() is None:
            console.kill()
            console.wait()
    return seen.decode(errors="replace")


def class_test(env: dict[str, str], lab_text: str, folder: Path) -> None:
    """A class of two students from the template: both labs up at once, isolated with the
    same addresses, each student reaching their own lab's nodes with plain OpenSSH through the
    class's entry (their files as handed out) and refused for the other's; one lab reset to
    the template while the other keeps its work; `class down` leaves nothing of either."""
    folder.mkdir()
    (folder / "lab.toml").write_text(lab_text)
    class_file = folder / "class.toml"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    class_file.write_text(
        f'name = "{CLASS}"\nlab = "lab.toml"\ntemplate = "{TEMPLATE}"\n'
        '[[students]]\nname = "alice"\n[[students]]\nname = "bob"\n'
        f'[limits]\naccess_port = {port}\naccess_address = "127.0.0.1"\n'
        'access_host = "127.0.0.1"\ncheck_every = 15\n'
    )
    classes = Path(env["LABBUILDER_STATE_DIR"]) / "classes" / CLASS / "students"

    def student_ssh(student: str, *command: str) -> subprocess.CompletedProcess[str]:
        """As the student would, with the files handed out saved in ~/.ssh (here: their
        folder)."""
        files = classes / student
        config = files / f"{CLASS}-{student}.ssh_config"
        local = folder / f"{student}.ssh_config"
        local.write_text(config.read_text().replace("~/.ssh/", f"{files}/"))
        return subprocess.run(
            ["ssh", "-F", str(local), "-o", "BatchMode=yes", *command],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip

    try:
        up = labbuilder("class", "up", str(class_file), "--json", env=env)
        assert up.returncode == 0, up.stdout + up.stderr
        assert [(r["student"], r["action"]) for r in json.loads(up.stdout)] == [
            ("alice", "stamped"), ("bob", "stamped"),
        ]  # fmt: skip
        status = json.loads(
            labbuilder("class", "status", str(class_file), "--json", env=env).stdout
        )
        assert [lab["lab"] for lab in status["labs"]] == [f"{CLASS}-alice", f"{CLASS}-bob"]
        assert all({n["state"] for n in lab["nodes"]} == {"running"} for lab in status["labs"])
        assert status["entry"] == {"port": port, "running": True}

        for student in ("alice", "bob"):
            handout = (classes / student / "handout.md").read_text()
            assert f"**{CLASS}-{student}**" in handout and "| `ADMIN_PASS` | `" in handout
            made = student_ssh(student, "controller", "hostname; sudo touch /root/work")
            assert made.returncode == 0 and made.stdout.strip() == "controller", made.stderr
        marked = student_ssh("alice", "controller", "sudo touch /root/alice-work")
        assert marked.returncode == 0, marked.stderr
        files = classes / "alice"
        across = subprocess.run(
            ["ssh", "-p", str(port), "-i", str(files / f"{CLASS}-alice"), "-o", "BatchMode=yes",
             "-o", f"UserKnownHostsFile={files / f'{CLASS}-alice.known_hosts'}",
             "root@127.0.0.1", "relay", f"{CLASS}-bob-controller", "22"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert across.returncode != 0 and f"is not in lab {CLASS}-alice" in across.stderr

        assert "login:" in console_prompt(port, files, f"{CLASS}-alice", "controller")

        board_test(class_file, env)

        reset = labbuilder(
            "class", "reset", str(class_file), "--student", "bob", "--to", "image", env=env
        )
        assert reset.returncode == 0, reset.stdout + reset.stderr
        after = student_ssh("bob", "controller", "ls /root")
        assert after.returncode == 0 and "work" not in after.stdout.split(), after.stderr
        assert "alice-work" in student_ssh("alice", "controller", "ls /root").stdout
    finally:
        down = labbuilder("class", "down", str(class_file), env=env)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not (Path(env["LABBUILDER_STATE_DIR"]) / "classes" / CLASS).exists()
    for student in ("alice", "bob"):
        assert lab_leftovers(f"{CLASS}-{student}", GUIDE_POOL) == {
            "domains": [], "networks": [], "volumes": [],
        }  # fmt: skip
        assert gateway_leftovers(f"{CLASS}-{student}") == {
            "namespaces": [], "veths": [], "uplinks": [],
        }  # fmt: skip


def board_test(class_file: Path, env: dict[str, str]) -> None:
    """The trainer's board of the class, as a trainer runs it, in Debian's chromium: both
    students' labs pass their stages through image (later stages not done); glance-api stopped
    by hand in alice's lab turns her image stage red while bob's stays green. A screenshot is
    kept in artifacts/."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    board = subprocess.Popen(
        [sys.executable, "-m", "labbuilder", "class", "board", str(class_file), "--port", str(port)],
        env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    try:
        with chromium() as driver, board_evidence(url, board, driver):

            def seen() -> dict[tuple[str, str], str]:
                assert board.poll() is None, board.communicate()[0]
                with contextlib.suppress(Exception):
                    driver.get(url)
                    return board_cells(driver)
                return {}

            def through_image() -> dict[tuple[str, str], str] | None:
                cells = seen()
                passing = all(
                    cells.get((student, stage)) == "passed"
                    for student in ("alice", "bob")
                    for stage in ("environment", "identity", "image")
                )
                return cells if passing else None

            def red() -> dict[tuple[str, str], str] | None:
                cells = seen()
                return cells if cells.get(("alice", "image")) == "failed" else None

            cells = wait_for("both labs passing through image", through_image, 300, every=2)
            assert cells[("alice", "compute")] == cells[("bob", "compute")] == "not done", cells
            # The trainer steps into alice's lab (`class ssh`) and stops glance-api by hand.
            command = ("class", "ssh", str(class_file), "alice", "controller")
            stopped = labbuilder(*command, "sudo systemctl stop glance-api", env=env)
            assert stopped.returncode == 0, stopped.stderr
            since = time.monotonic()
            cells = wait_for("alice's image stage red", red, 150, every=2)
            seconds = time.monotonic() - since
            assert cells[("bob", "image")] == "passed", cells
            driver.save_screenshot(str(artifacts() / "board-class.png"))
            (artifacts() / "board-class.txt").write_text(
                f"a stopped glance-api showed red on the board after {seconds:.0f} s\n"
            )
    finally:
        os.killpg(board.pid, signal.SIGINT)
        output = board.communicate(timeout=60)[0]
    assert board.returncode == 130, output
    assert f"the board is on {url}" in output, output
    refused = labbuilder("class", "ssh", str(class_file), "mallory", "controller", env=env)
    assert refused.returncode == 2 and "there is no student 'mallory'" in refused.stderr


@contextlib.contextmanager
def board_evidence(url: str, board: subprocess.Popen[str], driver: Any) -> Iterator[None]:
    """On a failure inside, what the board served (its JSON: each cell's status and first
    failing check) and a screenshot go to artifacts/ and into the failure's message."""
    try:
        yield
    except AssertionError as failure:
        served = "(not served)"
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(urllib.request.urlopen(url + "board.json", timeout=30).read())
            served = json.dumps(data, indent=1)
        (artifacts() / "board-class-failed.json").write_text(served)
        with contextlib.suppress(Exception):
            driver.save_screenshot(str(artifacts() / "board-class-failed.png"))
        raise AssertionError(f"{failure}\nthe board served:\n{served[-6000:]}") from failure


def killed_save_then_gc(lab: dict[str, Any]) -> None:
    """kill -9 of a `template save` once it has saved the nodes' memory and copied a node's
    disks (the lab paused at its stage, shut off); `gc` brings the lab back to its own state,
    running, and removes the unfinished template, its disk copies and the lab's snapshot."""
    env = lab["env"]
    name = "lbtest-killed"
    partial = Path(env["LABBUILDER_STATE_DIR"]) / "templates" / f".{name}.partial"
    command = [sys.executable, "-m", "labbuilder", "template", "save", name]
    saving = subprocess.Popen(
        [*command, "--stage", "image", lab["file"]],
        env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not (partial / "controller.seed.iso").exists():
            assert saving.poll() is None, saving.communicate()[0]
            assert time.monotonic() < deadline, "the save never reached its disk copies"
            time.sleep(0.2)
    finally:
        os.killpg(saving.pid, 9)
        saving.wait()
    assert partial.is_dir() and template_volumes(name)

    result = labbuilder("gc", "--match", GUIDE_LAB, "--json", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    removed = json.loads(result.stdout)
    assert removed["labs"][GUIDE_LAB]["returned"] == "template-return", removed
    assert str(partial) in removed["templates"], removed
    assert not partial.exists() and template_volumes(name) == []
    listed = labbuilder("snapshot", "list", lab["file"], "--json", env=env)
    assert "template-return" not in {s["name"] for s in json.loads(listed.stdout)}
    status = json.loads(labbuilder("status", lab["file"], "--json", env=env).stdout)
    assert {node["state"] for node in status["nodes"]} == {"running"}, status
    assert "image.upload" in ssh(lab, "controller", "ls /var/lib/labbuilder/steps")


def template_volumes(name: str) -> list[str]:
    conn = lv.connect("qemu:///system")
    try:
        pool = storage.find_pool(conn, GUIDE_POOL)
        assert pool is not None
        pool.refresh(0)
        return [v.name() for v in pool.listAllVolumes(0) if f"template-{name}--" in v.name()]
    finally:
        conn.close()


def test_a_template_outlives_its_lab_and_a_lab_stamped_from_it_goes_on(
    lab: dict[str, Any], tmp_path: Path
) -> None:
    """Last of the shared lab's tests. A template of the lab at "after image"; then the lab's
    `down` from a lab file that names the lab only (libvirt's own state says what belongs to
    it) leaves nothing of it, snapshots included, but the template. A class of two students is
    made from the template, one student's lab reset, and removed. A lab unlike it is refused;
    an isolated lab of its plan, stamped from it, resumes running at "after image": its image
    stage's checks pass again, and its install goes on with the next stage. Its `down` and the
    template's `delete` leave nothing."""
    env = lab["env"]
    killed_save_then_gc(lab)
    try:
        saved = labbuilder(
            "template", "save", TEMPLATE, "--stage", "image", lab["file"], "--json", env=env
        )  # fmt: skip
        assert saved.returncode == 0, saved.stdout + saved.stderr
        template = json.loads(saved.stdout)
        assert template["stage"] == "image" and template["lab"] == GUIDE_LAB
        assert {node["name"] for node in template["nodes"]} == {"controller", "network", "compute1"}
        assert all(node["memory_bytes"] > 0 for node in template["nodes"])
        # The lab is back where it was, running, without the snapshot the save took.
        assert "image.upload" in ssh(lab, "controller", "ls /var/lib/labbuilder/steps")
        listed = labbuilder("snapshot", "list", lab["file"], "--json", env=env)
        names = {s["name"] for s in json.loads(listed.stdout)}
        assert "image" in names and "template-return" not in names, names
        shown = labbuilder("template", "list", "--json", env=env)
        assert [t["name"] for t in json.loads(shown.stdout)] == [TEMPLATE]

        lab_file = tmp_path / "lab.toml"
        lab_file.write_text(f'name = "{GUIDE_LAB}"\n')
        result = labbuilder("down", "--file", str(lab_file), env=env)
        assert result.returncode == 0, result.stderr
        assert lab_leftovers(GUIDE_LAB, GUIDE_POOL) == {
            "domains": [],
            "networks": [],
            "volumes": [],
        }
        assert not lab["state"].exists()

        class_test(env, Path(lab["file"]).read_text(), tmp_path / "class")

        text = Path(lab["file"]).read_text().replace(f'name = "{GUIDE_LAB}"', f'name = "{STAMPED}"')
        stamped = tmp_path / "stamped.toml"
        stamped.write_text(text.replace("isolated = false", "isolated = true"))
        unlike = tmp_path / "unlike.toml"
        unlike.write_text(
            text.replace("[nodes.controller]", '[nodes.controller]\nmemory = "7 GiB"')
        )
        refused = labbuilder("up", str(unlike), "--from-template", TEMPLATE, env=env)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert (
            f"cannot be made from template {TEMPLATE}: node controller: memory 7 GB"
            in refused.stderr
        )
        assert lab_leftovers(STAMPED, GUIDE_POOL) == {"domains": [], "networks": [], "volumes": []}

        up = labbuilder("up", str(stamped), "--from-template", TEMPLATE, "--json", env=env)
        assert up.returncode == 0, up.stdout + up.stderr
        assert json.loads(up.stdout)["template"] == TEMPLATE
        status = json.loads(labbuilder("status", str(stamped), "--json", env=env).stdout)
        assert status["template"] == TEMPLATE and status["template_stage"] == "image"
        assert {node["state"] for node in status["nodes"]} == {"running"}
        images = labbuilder(
            "ssh", "-f", str(stamped), "controller",
            "sudo bash -c '. /root/admin-openrc && openstack image list -f value -c Name -c Status'",
            env=env,
        )  # fmt: skip
        assert "lbtest active" in images.stdout.splitlines(), images.stdout + images.stderr

        code, report, output = install({**lab, "file": str(stamped)}, "--only", "image")
        assert code == 0, output
        assert report["result"] == "passed"
        rechecked = steps(report)
        assert {s["status"] for s in rechecked} <= {"done-before", "skipped"}, rechecked
        checks = [c for s in rechecked for c in s["checks"]]
        assert checks and all(c["passed"] for c in checks), checks

        # Tempest reaches an isolated lab's cloud from the lab's gateway namespace (this host
        # has no route to the guide's addresses), with the lab's names in an /etc/hosts of its
        # own.
        one = r"tempest\.api\.identity\.v3\.test_api_discovery\.TestApiDiscovery\.test_list_api_versions"
        verified = labbuilder(
            "verify", str(stamped), "--suite", one, "--json", env=env, timeout=900
        )
        assert verified.returncode == 0, verified.stdout[-3000:] + verified.stderr[-3000:]
        summary = json.loads(verified.stdout)["summary"]
        assert summary == {"identity": {"passed": 1, "failed": 0, "skipped": 0}}, summary

        # It goes on with the next stage. Once compute's first step has passed (its run-once
        # marker is on the controller), the install is stopped as a user would (Ctrl-C): the
        # report says what ran. The whole compute stage is not run here (five minutes under
        # emulation): what is tested is that a stamped lab continues where its template ends.
        going = subprocess.Popen(
            [sys.executable, "-m", "labbuilder", "install", str(stamped), "--until", "compute"],
            env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, start_new_session=True,
        )  # fmt: skip
        marker = "/var/lib/labbuilder/steps/compute.placement-database"

        def first_step_done() -> bool:
            assert going.poll() is None, going.communicate()[0]
            probe = ("ssh", "-f", str(stamped), "controller", f"sudo test -e {marker}")
            return labbuilder(*probe, env=env).returncode == 0

        try:
            late: AssertionError | None = None
            try:
                wait_for("compute's first step done", first_step_done, 300, every=3)
            except AssertionError as err:
                late = err
        finally:
            os.killpg(going.pid, signal.SIGINT)
            output = going.communicate(timeout=120)[0]
        if late is not None:  # with what the install printed
            raise AssertionError(f"{late}\n{output[-8000:]}")
        assert going.returncode == 130, output
        reports = Path(env["LABBUILDER_STATE_DIR"]) / "labs" / STAMPED / "reports"
        report = json.loads((reports / "latest.json").read_text())
        by_stage = {stage["name"]: stage for stage in report["stages"]}
        assert {
            s["status"]
            for st in ("environment", "identity", "image")
            for s in by_stage[st]["steps"]
        } <= {"done-before", "skipped"}
        first = by_stage["compute"]["steps"][0]
        assert first["step"] == "placement-database" and first["status"] in ("ok", "guarded"), first

        in_use = labbuilder("template", "delete", TEMPLATE, env=env)
        assert in_use.returncode == 2 and STAMPED in in_use.stderr, in_use.stderr
    finally:
        labbuilder("down", "--file", str(tmp_path / "stamped.toml"), env=env)
        deleted = labbuilder("template", "delete", TEMPLATE, env=env)
    assert deleted.returncode == 0, deleted.stdout + deleted.stderr
    assert lab_leftovers(STAMPED, GUIDE_POOL) == {"domains": [], "networks": [], "volumes": []}
    assert gateway_leftovers(STAMPED) == {"namespaces": [], "veths": [], "uplinks": []}
    conn = lv.connect("qemu:///system", readonly=True)
    try:
        pool = storage.find_pool(conn, GUIDE_POOL)
        left = [v.name() for v in pool.listAllVolumes(0) if TEMPLATE in v.name()] if pool else []
    finally:
        conn.close()
    assert left == []
    assert not (Path(env["LABBUILDER_STATE_DIR"]) / "templates" / TEMPLATE).exists()
