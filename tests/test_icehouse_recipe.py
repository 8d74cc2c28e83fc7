"""The icehouse-ubuntu-14.04 recipe, statically proven: it renders for the guide's labs, its
scripts pass shellcheck, the configuration files it writes or edits parse as INI, its dry-run
output is pinned by a golden file, and every installing line of the guide is implemented by a
step or explained (100% coverage). It cannot run here: no Ubuntu archive is reachable."""

from __future__ import annotations

import configparser
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from labbuilder.api import facade as api
from labbuilder.api.install import Selection, render_for_lab
from labbuilder.cli import main as cli
from labbuilder.cli.coverage import recipe_coverage
from labbuilder.cli.install import print_dry_run
from labbuilder.lab.files import load_builtin_lab, parse_lab
from labbuilder.model.lab import Plan
from labbuilder.recipe.files import load_recipe
from labbuilder.recipe.model import Recipe, RenderedStage
from labbuilder.recipe.render import RenderOptions, applicable_stages, placeholder_secrets

REPO = Path(__file__).resolve().parent.parent
RECIPE = "icehouse-ubuntu-14.04"
GOLDEN = REPO / "tests" / "golden" / f"{RECIPE}-guide-3node.txt"
SEED = REPO.parent / "shared" / "seeds" / "openstack-install-guide-icehouse-ubuntu.txt"
OPTIONAL = ("dashboard", "block-storage", "object-storage", "orchestration", "telemetry")
CORE = ("environment", "identity", "clients", "image", "compute")
NEUTRON = (
    "networking-controller",
    "networking-network",
    "networking-compute",
    "initial-networks",
)
# Shellcheck codes left out, each for a reason:
#   SC1091  `source /root/openrc.sh`: the sourced file is in the guest, not beside the script;
#   SC2234, SC2235  the renderer runs each guard in a subshell, `if ( guard ) ...`, on purpose:
#           a guard's own `set`, `cd` or `exit` cannot leak into the step.
SHELLCHECK_EXCLUDE = "SC1091,SC2234,SC2235"
# Configuration files under /etc whose format is not INI.
NOT_INI = {"/etc/ntp.conf": "ntpd's own directives"}
# INI files whose format allows settings before the first section (rsync's global parameters).
GLOBAL_KEYS = {"/etc/rsyncd.conf"}


@pytest.fixture(scope="module")
def recipe() -> Recipe:
    return load_recipe(RECIPE)


def plan_for(lab: str) -> Plan:
    return api.plan_lab(load_builtin_lab(lab), host_check=False).plan


def render(recipe: Recipe, lab: str, optional: tuple[str, ...] = OPTIONAL) -> list[RenderedStage]:
    _, stages = render_for_lab(
        load_builtin_lab(lab),
        Selection(recipe=RECIPE, optional=optional),
        secrets=None,
        plan=plan_for(lab),
        virt_type="qemu",
    )
    return list(stages)


@pytest.fixture(scope="module")
def rendered(recipe: Recipe) -> dict[str, list[RenderedStage]]:
    return {lab: render(recipe, lab) for lab in ("guide-3node", "guide-2node-legacy", "guide-full")}


def test_every_stage_renders_for_the_guide_labs(rendered: dict[str, list[RenderedStage]]) -> None:
    names = {lab: [stage.name for stage in stages] for lab, stages in rendered.items()}
    assert names["guide-3node"] == [
        *CORE, *NEUTRON, "dashboard", "orchestration", "telemetry", "launch-instance-neutron"
    ]  # fmt: skip
    assert names["guide-2node-legacy"] == [
        *CORE, "legacy-networking", "dashboard", "orchestration", "telemetry", "launch-instance-legacy"
    ]  # fmt: skip
    assert names["guide-full"] == [*CORE, *NEUTRON, *OPTIONAL, "launch-instance-neutron"]
    nodes = {stage.name: set(stage.nodes) for stage in rendered["guide-full"]}
    assert nodes["environment"] == {"controller", "network", "compute1", "block1", "object1"}
    assert nodes["block-storage"] == {"controller", "block1"}
    assert nodes["object-storage"] == {"controller", "object1"}
    assert nodes["networking-network"] == {"controller", "network"}


def test_the_lab_file_selects_the_optional_stages(recipe: Recipe) -> None:
    lab = load_builtin_lab("guide-full")
    assert lab.options.optional_stages == OPTIONAL
    assert {s.name for s in recipe.stages if s.optional} == set(OPTIONAL)
    stages = render(recipe, "guide-full", optional=())  # the lab file's [options] stages
    assert [stage.name for stage in stages if stage.name in OPTIONAL] == list(OPTIONAL)
    plain = applicable_stages(recipe, plan_for("guide-3node"))
    assert not [stage.name for stage in plain if stage.optional]


def test_rendered_scripts_pass_shellcheck(
    rendered: dict[str, list[RenderedStage]], tmp_path: Path
) -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (scripts/setup-host --test installs it)")
    files = []
    for lab, stages in rendered.items():
        for stage in stages:
            for step in stage.steps:
                name = f"{lab}.{stage.name}.{step.step}.{step.node}"
                files.append(tmp_path / f"{name}.sh")
                files[-1].write_text(step.script)
                for i, check in enumerate(step.checks):
                    files.append(tmp_path / f"{name}.check{i}.sh")
                    files[-1].write_text(f"#!/bin/bash\nset -eo pipefail\n{check.command}\n")
    checked = subprocess.run(
        ["shellcheck", "-s", "bash", "-f", "gcc", "-e", SHELLCHECK_EXCLUDE, *map(str, files)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout[-5000:]
    assert len(files) > 600


def written_files(stages: list[RenderedStage]) -> dict[str, str]:
    """The files the steps write (the renderer's here-documents), by node and path."""
    found = {}
    pattern = re.compile(r"^cat > (\S+)\.labbuilder-new <<'LABBUILDER_EOF'\n(.*?)^LABBUILDER_EOF$", re.M | re.S)  # fmt: skip
    for stage in stages:
        for step in stage.steps:
            for path, body in pattern.findall(step.script):
                found[f"{step.node}:{path}"] = body
    return found


def parse_ini(text: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.read_string(text)
    return parser


def test_written_config_files_parse_as_ini(rendered: dict[str, list[RenderedStage]]) -> None:
    parsed = 0
    for stages in rendered.values():
        for where, body in written_files(stages).items():
            path = where.split(":", 1)[1]
            if not path.startswith("/etc/") or not path.endswith((".conf", ".ini")):
                continue
            if path in NOT_INI:
                continue
            parse_ini(("[global]\n" if path in GLOBAL_KEYS else "") + body)
            parsed += 1
    assert parsed >= 7
    proxy = parse_ini(
        written_files(rendered["guide-full"])["controller:/etc/swift/proxy-server.conf"]
    )
    assert proxy.get("filter:cache", "memcache_servers") == "10.0.0.11:11211"
    assert proxy.get("filter:authtoken", "admin_password") == "SWIFT_PASS"


def lb_ini_commands(stages: list[RenderedStage]) -> list[tuple[str, list[str]]]:
    """Every `lb-ini set|add|comment` line of the scripts, with its node."""
    found = []
    for stage in stages:
        for step in stage.steps:
            for line in step.script.splitlines():
                words = shlex.split(line, posix=True) if line.startswith("lb-ini ") else []
                if len(words) >= 4 and words[1] in ("set", "add", "comment"):
                    found.append((step.node, words[1:]))
    return found


def lb_ini_helper(rendered: dict[str, list[RenderedStage]], folder: Path) -> Path:
    """The lb-ini helper as the recipe writes it into the guests, saved in ``folder``."""
    helper = folder / "lb-ini"
    helper.write_text(written_files(rendered["guide-3node"])["controller:/usr/local/sbin/lb-ini"])
    return helper


def test_edited_config_files_parse_as_ini(
    rendered: dict[str, list[RenderedStage]], tmp_path: Path
) -> None:
    """Every configuration file the steps edit, built from nothing by the rendered lb-ini
    commands (the helper the recipe writes into the guests), parses as INI."""
    helper = lb_ini_helper(rendered, tmp_path)
    edited: dict[Path, str] = {}
    for lab, stages in rendered.items():
        for node, (action, path, *rest) in lb_ini_commands(stages):
            if "$" in path:  # a loop over files: the same commands run for each literal path too
                continue
            local = tmp_path / lab / node / path.lstrip("/")
            local.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run([sys.executable, str(helper), action, str(local), *rest], check=True)
            edited[local] = path
    assert len(edited) >= 20
    for local in edited:
        text = local.read_text()
        parse_ini(text if text.lstrip().startswith("[") else "[global]\n" + text)
    nova = parse_ini((tmp_path / "guide-full/compute1/etc/nova/nova.conf").read_text())
    assert nova.get("DEFAULT", "linuxnet_interface_driver").endswith("LinuxOVSInterfaceDriver")
    assert nova.get("keystone_authtoken", "admin_password") == "NOVA_PASS"
    text = (tmp_path / "guide-full/compute1/etc/nova/nova.conf").read_text()
    assert text.count("notification_driver = ") == 2  # the guide's two lines (L5508-5509)


def test_lb_ini_keeps_the_packaged_file_and_changes_only_the_keys(
    rendered: dict[str, list[RenderedStage]], tmp_path: Path
) -> None:
    helper = lb_ini_helper(rendered, tmp_path)
    conf = tmp_path / "neutron.conf"
    conf.write_text(
        "[DEFAULT]\n# verbose = False\nstate_path = /var/lib/neutron\ncore_plugin = x\n\n"
        "[database]\nconnection = sqlite:////var/lib/neutron/neutron.sqlite\n\n"
        "[service_providers]\nservice_provider=LOADBALANCER:Haproxy:x:default\n"
    )

    def run(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, str(helper), *args], capture_output=True, text=True, check=False
        )
        return f"{done.returncode}:{done.stdout.strip()}"

    for _ in range(2):  # a re-run changes nothing
        run("set", str(conf), "DEFAULT", "core_plugin", "ml2")
        run("set", str(conf), "database", "connection", "mysql://n:P@controller/neutron")
        run("set", str(conf), "keystone_authtoken", "admin_user", "neutron")
        run("comment", str(conf), "service_providers")
    assert conf.read_text() == (
        "[DEFAULT]\n# verbose = False\nstate_path = /var/lib/neutron\ncore_plugin = ml2\n\n"
        "[database]\nconnection = mysql://n:P@controller/neutron\n\n"
        "[service_providers]\n# service_provider=LOADBALANCER:Haproxy:x:default\n\n"
        "[keystone_authtoken]\nadmin_user = neutron\n"
    )
    assert run("get", str(conf), "DEFAULT", "core_plugin") == "0:ml2"
    assert run("get", str(conf), "DEFAULT", "nosuch") == "1:"


def dry_run_text(recipe: Recipe, capsys: pytest.CaptureFixture[str]) -> str:
    lab = load_builtin_lab("guide-3node")
    print_dry_run(None, lab, RECIPE, render(recipe, "guide-3node", optional=()))  # type: ignore[arg-type]
    return capsys.readouterr().out


def test_the_dry_run_output_is_pinned(recipe: Recipe, capsys: pytest.CaptureFixture[str]) -> None:
    text = dry_run_text(recipe, capsys)
    if os.environ.get("LABBUILDER_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(text)
    assert GOLDEN.is_file(), f"no golden file: LABBUILDER_UPDATE_GOLDEN=1 pytest {__file__}"
    assert text == GOLDEN.read_text(), (
        f"the rendered guide differs from {GOLDEN.name}; if the change is deliberate, "
        "regenerate it with LABBUILDER_UPDATE_GOLDEN=1 and review the diff"
    )


def test_install_dry_run_prints_the_whole_guide_for_each_node(
    recipe: Recipe,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("LABBUILDER_STATE_DIR", str(tmp_path))  # no lab of this host's
    argv = ["install", "--recipe", RECIPE, "--lab", "guide-3node", "--dry-run"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    nodes = re.findall(r"^########## node (\S+) \(lab guide-3node, recipe icehouse-ubuntu-14.04\)$", out, re.M)  # fmt: skip
    assert nodes == ["controller", "network", "compute1"]
    by_node = dict(zip(nodes, re.split(r"^########## node .*$", out, flags=re.M)[1:], strict=True))
    stages = re.findall(r"^# ===== stage (\S+):", by_node["controller"], re.M)
    assert stages == [*CORE, *NEUTRON, "launch-instance-neutron"]
    for node, needles in {
        "controller": ["keystone-manage db_sync", "nova-manage db sync", "neutron-server restart"],
        "network": ["ovs-vsctl --may-exist add-port br-ex eth2", "neutron-l3-agent restart"],
        "compute1": ["apt-get install -y nova-compute-kvm python-guestfs", "local_ip 10.0.1.31"],
    }.items():
        for needle in needles:
            assert needle in by_node[node], (node, needle)
    assert out.count("# check: ") > 50
    assert "step internet skipped: needs the internet" in out


def test_coverage_of_the_guide_is_complete(recipe: Recipe) -> None:
    report = recipe_coverage(recipe)
    gaps = [
        f"L{item.line.number} {item.status}: {item.line.text} {item.steps} {item.unmatched}"
        for item in report.lines
        if item.status in ("missing", "unmatched")
    ]
    assert not gaps, "\n".join(gaps)
    assert report.percent == 100.0
    assert not report.unused_references
    assert report.total > 1000 and report.count("mapped") > 800
    # the deviations explain; they do not swallow the guide
    assert report.count("explained") < report.count("mapped") / 3


def test_recipe_coverage_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["recipe", "coverage", RECIPE, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["percent"] == 100.0 and data["missing"] == 0 and data["unmatched"] == 0
    line = next(item for item in data["lines"] if item["line"] == 1097)
    assert line["text"] == "# keystone-manage db_sync" and line["steps"] == ["identity/db-sync"]
    assert cli.main(["recipe", "coverage", RECIPE, "--summary"]) == 0
    assert "coverage 100.0%" in capsys.readouterr().out


def test_the_vendored_guide_is_the_seed(recipe: Recipe) -> None:
    vendored = Path(recipe.directory) / "guide" / SEED.name
    if not SEED.is_file():
        pytest.skip(f"{SEED} is not beside the repository")
    assert (
        hashlib.sha256(vendored.read_bytes()).digest() == hashlib.sha256(SEED.read_bytes()).digest()
    )


def test_every_step_says_where_it_is_in_the_guide_or_why_not(recipe: Recipe) -> None:
    for stage in recipe.stages:
        assert re.search(r"L\d+", stage.guide), stage.name
        for step in stage.steps:
            assert step.guide or step.note.startswith("Not in the guide"), (stage.name, step.name)


def test_role_images_carry_only_what_the_recipe_installs_on_the_role(
    recipe: Recipe, rendered: dict[str, list[RenderedStage]]
) -> None:
    installed: dict[str, set[str]] = {}
    for lab, stages in rendered.items():
        roles = {node.name: str(node.role) for node in plan_for(lab).nodes}
        for stage in stages:
            for step in stage.steps:
                for match in re.finditer(
                    r"apt-get install -y ((?:[\w.+-]+(?: \\\n| )?)+)", step.script
                ):
                    packages = match.group(1).replace("\\\n", " ").split()
                    installed.setdefault(roles[step.node], set()).update(packages)
    for role, image in recipe.roles:
        assert set(image.packages) <= installed[role], (role, set(image.packages) - installed[role])
        assert "nova-network" not in image.packages and "neutron-server" not in image.packages


def test_secrets_are_the_guides_password_table_and_more(recipe: Recipe) -> None:
    table = {
        "RABBIT_PASS", "KEYSTONE_DBPASS", "DEMO_PASS", "ADMIN_PASS", "GLANCE_DBPASS",
        "GLANCE_PASS", "NOVA_DBPASS", "NOVA_PASS", "DASH_DBPASS", "CINDER_DBPASS", "CINDER_PASS",
        "NEUTRON_DBPASS", "NEUTRON_PASS", "HEAT_DBPASS", "HEAT_PASS", "CEILOMETER_DBPASS",
        "CEILOMETER_PASS",
    }  # fmt: skip
    extra = {"DB_PASS", "ADMIN_TOKEN", "METADATA_SECRET", "SWIFT_PASS", "CEILOMETER_TOKEN"}
    assert table | extra | {"SWIFT_HASH_PATH_SUFFIX"} == set(recipe.secret_names)


def test_rendered_checks_have_valid_expectations(rendered: dict[str, list[RenderedStage]]) -> None:
    count = 0
    for stages in rendered.values():
        for stage in stages:
            for step in stage.steps:
                for check in step.checks:
                    if check.expect is not None:
                        re.compile(check.expect)
                        count += 1
    assert count > 150


def test_re_runs_are_guarded(rendered: dict[str, list[RenderedStage]]) -> None:
    """The idempotency traps of PIPELINE.md 4.7: nothing is created twice on a re-run."""
    for stage in rendered["guide-full"]:
        for step in stage.steps:
            script = step.script
            where = f"{stage.name}/{step.step} on {step.node}"
            assert "CREATE DATABASE " not in script.replace("CREATE DATABASE IF NOT EXISTS ", ""), (
                where
            )
            assert not re.search(r"ovs-vsctl add-(br|port)", script), where
            for line in script.replace("\\\n", " ").splitlines():  # continuations joined
                if re.match(
                    r"^keystone (service-create|user-create|tenant-create|role-create)", line
                ):
                    raise AssertionError(f"{where}: unguarded {line}")
                if re.match(
                    r"^(neutron (net|subnet|router)-create|nova (boot|network-create))", line
                ):
                    raise AssertionError(f"{where}: unguarded {line}")
            assert not re.search(r"^rm (?!-f)", script, re.M), where


def test_placeholder_secrets_render_as_the_guides_names(recipe: Recipe) -> None:
    plan = plan_for("guide-3node")
    options = RenderOptions(secrets=placeholder_secrets(recipe))
    assert options.secrets["KEYSTONE_DBPASS"] == "KEYSTONE_DBPASS"
    text = "\n".join(
        step.script for stage in render(recipe, "guide-3node", optional=()) for step in stage.steps
    )
    assert "mysql://keystone:KEYSTONE_DBPASS@controller/keystone" in text
    assert plan.node("controller").management_address == "10.0.0.11"


def test_the_readmes_lab_file_runs_the_guide_on_ubuntu_14_04() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Running the guide on a KVM host", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```toml\n(.+?)\n```", section, re.DOTALL)
    assert match is not None
    lab = parse_lab(match.group(1), source="README: Running the guide on a KVM host")
    assert (lab.image, lab.recipe) == ("ubuntu-14.04", RECIPE)
    assert lab.options.internet and not lab.options.role_images
    assert [node.name for node in lab.nodes] == ["controller", "network", "compute1"]
    assert "labbuilder install icehouse.toml" in section
