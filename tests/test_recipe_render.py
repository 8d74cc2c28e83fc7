"""Generic recipe behaviour: a lab file's optional stages, and the fidelity report
(``labbuilder.recipe.coverage``) on a small guide and recipe of its own."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shlex
import subprocess
from pathlib import Path

import jinja2
import pytest

from labbuilder.api import facade as api
from labbuilder.api.install import Selection, render_for_lab
from labbuilder.api.up import first_in_line, image_builds
from labbuilder.catalog.model import CloudInitFlavour
from labbuilder.cli.coverage import recipe_coverage
from labbuilder.common.errors import LabFileError, RecipeError
from labbuilder.common.quoting import QuotingError, aptconf, chrony, eni, ini, shell, yaml
from labbuilder.lab.check import check_lab_recipe
from labbuilder.lab.files import load_builtin_lab, parse_lab
from labbuilder.lifecycle.render import SeedInput, render_seed_files
from labbuilder.recipe.coverage import (
    GuideLine,
    installing_lines,
    line_tokens,
    parse_coverage_spec,
    parse_references,
)
from labbuilder.recipe.files import load_recipe
from labbuilder.recipe.render import applicable_stages

REPO = Path(__file__).resolve().parent.parent
GUIDE = """\
# A guide

Install the database:

```
# apt-get install mysql-server ¥
python-mysqldb
PING openstack.org (174.143.194.225) 56(84) bytes of data.
```

```
$ mysql -u root -p
mysql> CREATE DATABASE demo;
mysql> GRANT ALL PRIVILEGES ON demo.* TO 'demo'@'%' IDENTIFIED BY
'DEMO_DBPASS';
mysql> exit
Bye
```

Edit /etc/demo.conf:

```
[DEFAULT]
...
# a comment of the example
verbose = True
connection = mysql://demo:DEMO_DBPASS@controller/demo
```

```
--- openstack.org ping statistics ---
4 packets transmitted, 4 received, 0% packet loss, time 3022ms
```

- `# service demo restart`

Then open the dashboard in a browser.
"""

STAGE = """
name = "demo"
title = "The demo service"
guide = "Ch.1, L1-40"
{optional}

[[steps]]
name = "install"
roles = ["controller"]
guide = "L5-10"
run = "apt-get install -y mysql-server python-mysqldb"

[[steps]]
name = "database"
roles = ["controller"]
guide = "L12-19"
run = '''
mysql -u root <<'SQL'
CREATE DATABASE IF NOT EXISTS demo;
GRANT ALL PRIVILEGES ON demo.* TO 'demo'@'%' IDENTIFIED BY '{{{{ secrets.DEMO_DBPASS }}}}';
SQL
'''

[[steps]]
name = "config"
roles = ["controller"]
guide = "L23-29"
run = '''
# note-like comments do not count
lb-ini set /etc/demo.conf DEFAULT verbose True
lb-ini set /etc/demo.conf DEFAULT connection mysql://demo:{{{{ secrets.DEMO_DBPASS }}}}@controller/demo
service demo restart
'''
"""


def write_recipe(base: Path, *, optional: bool = False, deviations: str = "") -> Path:
    folder = base / "recipe"
    (folder / "stages").mkdir(parents=True)
    (folder / "recipe.toml").write_text(
        'name = "demo-recipe"\ndescription = "a demo"\nguide = "the demo guide"\n'
        '[secrets]\nDEMO_DBPASS = "MySQL user demo"\n'
    )
    text = STAGE.format(optional="optional = true" if optional else "")
    (folder / "stages" / "10-demo.toml").write_text(text)
    (folder / "guide.txt").write_text(GUIDE)
    digest = hashlib.sha256(GUIDE.encode()).hexdigest()
    (folder / "coverage.toml").write_text(
        f'seed = "guide.txt"\nsha256 = "{digest}"\ncommands = ["apt-get", "service"]\n'
        '[[extra]]\nlines = "L37"\nreason = "a prose instruction"\n' + deviations
    )
    return folder


def test_installing_lines_are_commands_continuations_and_config_not_output() -> None:
    found = {line.number: line.kind for line in installing_lines(GUIDE, {"apt-get", "service"})}
    assert found == {
        6: "command",  # apt-get ... ¥
        7: "continuation",
        12: "command",  # $ mysql -u root -p
        13: "command",
        14: "command",  # a statement open until its ";"
        15: "continuation",
        16: "command",
        23: "config",
        26: "config",
        27: "config",
        35: "inline",
    }


def test_references_and_tokens() -> None:
    assert parse_references("L1030-1045, L1046 (keystone), L7-L9") == (
        (1030, 1045),
        (1046, 1046),
        (7, 9),
    )
    assert parse_references("not in the guide") == ()
    config = GuideLine(1, "connection = mysql://demo:DEMO_DBPASS@controller/demo", "config")
    assert line_tokens(config, ["DEMO_DBPASS"]) == (
        "connection",
        "mysql://demo:DEMO_DBPASS@controller/demo",
    )
    assert line_tokens(config) == ("connection",)  # a placeholder value is not matched
    command = GuideLine(2, "$ nova boot --nic net-id=DEMO_NET_ID demo-instance1 ¥", "command")
    assert line_tokens(command) == ("nova", "boot", "--nic", "demo-instance1")
    assert line_tokens(GuideLine(3, "Then open the dashboard.", "prose")) == ()


def test_coverage_maps_lines_to_steps_and_flags_what_a_step_does_not_do(tmp_path: Path) -> None:
    recipe = load_recipe(str(write_recipe(tmp_path)))
    report = recipe_coverage(recipe)
    status = {item.line.number: item.status for item in report.lines}
    assert status[6] == status[23] == "mapped"
    assert status[37] == "missing"  # the prose instruction no step names
    assert status[35] == "missing"  # outside every step's reference
    by_number = {item.line.number: item for item in report.lines}
    assert by_number[12].unmatched == ("-p",)  # no password prompt in the step...
    assert by_number[16].unmatched == ("exit",)  # ...and no interactive exit
    assert by_number[27].steps == ("demo/config",)
    assert not report.complete


def test_deviations_explain_lines_and_complete_the_coverage(tmp_path: Path) -> None:
    deviations = (
        '[[deviation]]\nlines = "L12, L16, L35, L37"\n'
        'reason = "no interactive session; the restart is in demo/config"\n'
    )
    recipe = load_recipe(str(write_recipe(tmp_path, deviations=deviations)))
    report = recipe_coverage(recipe)
    assert report.complete and report.percent == 100.0
    assert report.count("explained") == 4


def test_a_changed_guide_text_is_refused(tmp_path: Path) -> None:
    folder = write_recipe(tmp_path)
    (folder / "guide.txt").write_text(GUIDE + "one more line\n")
    with pytest.raises(RecipeError, match="sha256"):
        recipe_coverage(load_recipe(str(folder)))
    with pytest.raises(RecipeError, match=r"deviation\[0\] needs lines"):
        parse_coverage_spec('seed = "x"\nsha256 = "y"\n[[deviation]]\nreason = "why"\n', "c")


def test_a_lab_file_selects_optional_stages(tmp_path: Path) -> None:
    folder = write_recipe(tmp_path, optional=True)
    text = 'name = "demo"\n[options]\nstages = ["demo", "not-in-this-recipe"]\n'
    lab = parse_lab(text, source="lab.toml")
    assert lab.options.optional_stages == ("demo", "not-in-this-recipe")
    # A stage name the recipe does not have is refused, naming the recipe's optional stages.
    with pytest.raises(LabFileError) as err:
        check_lab_recipe(lab, load_recipe(str(folder)))
    assert err.value.message == (
        'lab.toml: options.stages[1] = "not-in-this-recipe" is not a stage of recipe demo-recipe'
    )
    assert err.value.hint == "optional stages of demo-recipe: demo"
    lab = parse_lab('name = "demo"\n[options]\nstages = ["demo"]\n', source="lab.toml")
    check_lab_recipe(lab, load_recipe(str(folder)))
    plan = api.plan_lab(lab, host_check=False).plan
    selection = Selection(recipe=str(folder))
    _, stages = render_for_lab(lab, selection, secrets=None, plan=plan, virt_type="qemu")
    assert [stage.name for stage in stages] == ["demo"]
    plain = parse_lab('name = "demo"\n', source="lab.toml")
    _, stages = render_for_lab(plain, selection, secrets=None, plan=plan, virt_type="qemu")
    assert stages == ()
    with pytest.raises(LabFileError, match=r"options.stages\[0\] = \"Demo\" is not a stage name"):
        parse_lab('name = "demo"\n[options]\nstages = ["Demo"]\n', source="lab.toml")


def test_the_built_in_zed_full_lab_runs_every_stage_and_the_guide_lab_the_core_path() -> None:
    recipe = load_recipe("zed-debian-12")
    every = [stage.name for stage in recipe.stages]
    core = [stage.name for stage in recipe.stages if not stage.optional]
    assert core != every
    for name, expected in (("zed-full", every), ("guide-3node", core)):
        lab = api.load_lab(None, name)
        plan = api.plan_lab(lab, host_check=False).plan
        stages = applicable_stages(recipe, plan, lab.options.optional_stages)
        assert [stage.name for stage in stages] == expected, name


def test_a_labs_images_carry_its_own_optional_stages_and_a_stage_chosen_later_installs_its_own() -> (
    None
):
    """zed-debian-12's role images carry the core path's packages and those of the optional
    stages the lab selects: the default lab's controller image has no horizon, heat, cinder,
    swift or telemetry; zed-full's has them all (masked until configured). A stage chosen at
    install time (--with) on such a lab installs its packages in its first step."""
    guide = api.load_lab(None, "guide-3node")
    full = api.load_lab(None, "zed-full")
    builds = {
        name: {
            build.role: build
            for build in image_builds(lab, api.plan_lab(lab, host_check=False).plan).values()
        }
        for name, lab in (("guide", guide), ("full", full))
    }
    # The controller's image (build script, most packages) is the one the lab waits for
    # longest: it is built at normal priority, the others yield the CPU to it.
    for lab in (guide, full):
        found = image_builds(lab, api.plan_lab(lab, host_check=False).plan)
        first = first_in_line(found)
        assert first is not None and found[first].role == "controller"
    assert first_in_line({}) is None
    core = builds["guide"]["controller"]
    assert {"keystone", "glance", "nova-api", "neutron-server"} <= set(core.packages)
    extras = {"openstack-dashboard-apache", "heat-api", "cinder-api", "swift-proxy",
              "gnocchi-api"}  # fmt: skip
    assert not extras & set(core.packages), core.packages
    assert "apache2.service" not in core.masked_units
    every = builds["full"]["controller"]
    assert extras <= set(every.packages) and set(core.packages) < set(every.packages)
    assert {"apache2.service", "heat-engine.service"} <= set(every.masked_units)
    # network and compute share one image (built for the first of them, network): with
    # telemetry chosen it carries the compute agent, masked on both.
    assert "compute" not in builds["full"] and "compute" not in builds["guide"]
    assert "ceilometer-agent-compute" in builds["full"]["network"].packages
    assert "ceilometer-agent-compute.service" in builds["full"]["network"].masked_units
    assert "ceilometer-agent-compute" not in builds["guide"]["network"].packages

    plan = api.plan_lab(guide, host_check=False).plan
    selection = Selection(optional=("dashboard",))
    _, stages = render_for_lab(guide, selection, secrets=None, plan=plan, virt_type="qemu")
    steps = {(step.stage, step.step, step.node): step.script for st in stages for step in st.steps}
    # The environment's packages step wants the lab's stages' packages too ...
    assert "openstack-dashboard-apache" in steps[("environment", "packages", "controller")]
    plain = render_for_lab(guide, Selection(), secrets=None, plan=plan, virt_type="qemu")[1]
    environment = next(step for step in plain[0].steps if step.step == "packages")
    assert "openstack-dashboard-apache" not in environment.script
    # ... and the chosen stage's first step installs its own when the image lacks them.
    script = steps[("dashboard", "packages", "controller")]
    assert "dpkg -s openstack-dashboard-apache" in script
    assert "apt-get install -y --no-install-recommends openstack-dashboard-apache" in script
    assert [step.step for step in stages[-2].steps][:1] == ["packages"]  # dashboard comes first

    _, stages = render_for_lab(full, Selection(), secrets=None, plan=api.plan_lab(full, host_check=False).plan,
                               virt_type="qemu")  # fmt: skip
    firsts = {
        stage.name: sorted(step.node for step in stage.steps if step.step == "packages")
        for stage in stages
        if stage.name in ("dashboard", "block-storage", "object-storage", "orchestration",
                          "telemetry")
    }  # fmt: skip
    assert firsts == {
        "dashboard": ["controller"],
        "block-storage": ["controller"],
        "object-storage": ["controller"],
        "orchestration": ["controller"],
        "telemetry": ["compute1", "controller"],
    }


def test_a_role_may_add_packages_only_for_an_optional_stage(tmp_path: Path) -> None:
    for optional in (True, False):
        folder = write_recipe(tmp_path / str(optional), optional=optional)
        with (folder / "recipe.toml").open("a") as recipe:
            recipe.write('[roles.controller]\npackages = ["a"]\n'
                         '[roles.controller.stages.demo]\npackages = ["b"]\n')  # fmt: skip
        if optional:
            loaded = load_recipe(str(folder))
            assert loaded.role_image("controller").packages == ("a",)
            assert loaded.role_image("controller", ["demo"]).packages == ("a", "b")
            continue
        with pytest.raises(RecipeError) as err:
            load_recipe(str(folder))
        assert "roles.controller.stages.demo" in err.value.message, err.value.message
        assert "is not an optional stage of the recipe" in err.value.message
        assert err.value.hint is not None and "optional stages: none" in err.value.hint


def test_a_roles_build_script_is_a_file_of_images_and_part_of_the_image_and_recipe(
    tmp_path: Path,
) -> None:
    from labbuilder.api.up import NOTHING
    from labbuilder.catalog.model import BuildRecipe
    from labbuilder.images.build import recipe_hash

    folder = write_recipe(tmp_path / "r")
    plain = load_recipe(str(folder)).digest
    (folder / "images").mkdir()
    (folder / "images" / "schemas.sh").write_text("echo one\n")
    with (folder / "recipe.toml").open("a") as recipe:
        recipe.write('[roles.controller]\npackages = ["a"]\nbuild_script = "schemas.sh"\n')
    loaded = load_recipe(str(folder))
    image = loaded.role_image("controller", ["demo"])
    assert image.build_script == ("schemas.sh", "echo one\n")
    assert loaded.digest != plain  # a changed script means the recipe changed
    base = BuildRecipe(suite="bookworm", mirror="http://deb.debian.org/debian", packages=("a",),
                       kernel_package="linux-image-amd64", size="2 GiB")  # fmt: skip
    hashes = {
        recipe_hash(base, "1", extra_packages=("a",)),
        recipe_hash(base, "1", extra_packages=("a",), build_script=("schemas.sh", "echo one\n")),
        recipe_hash(base, "1", extra_packages=("a",), build_script=("schemas.sh", "echo two\n")),
    }
    assert len(hashes) == 3  # the script's text is part of what the image is
    assert NOTHING == ((), (), None)
    for value, problem in (
        ('"../secrets.sh"', "is not a file name such as controller.sh"),
        ('"missing.sh"', "is not a file in"),
        ("1", "roles.controller.build_script"),
    ):
        text = (folder / "recipe.toml").read_text()
        (folder / "recipe.toml").write_text(
            re.sub(r"build_script = .*", f"build_script = {value}", text)
        )
        with pytest.raises(RecipeError) as err:
            load_recipe(str(folder))
        assert "roles.controller.build_script" in err.value.message, err.value.message
        assert problem in err.value.message, err.value.message


def test_roles_that_share_an_image_boot_one_image_with_both_roles_content(tmp_path: Path) -> None:
    from labbuilder.api.up import image_builds, node_contents

    # zed-debian-12: network and compute boot one image, the controller its own.
    guide = api.load_lab(None, "guide-3node")
    plan = api.plan_lab(guide, host_check=False).plan
    contents = node_contents(guide, plan)
    assert contents["network"] == contents["compute1"] != contents["controller"]
    builds = image_builds(guide, plan, contents)
    assert sorted(build.role for build in builds.values()) == ["controller", "network"]
    shared = builds[contents["network"]]
    recipe = load_recipe("zed-debian-12")
    for role in ("network", "compute"):  # every package and masked unit of both roles
        image = recipe.role_image(role)
        assert set(image.packages) <= set(shared.packages)
        assert set(image.masked_units) <= set(shared.masked_units)
    assert "nova-compute.service" in shared.masked_units  # masked on the network node too
    assert "neutron-l3-agent.service" in shared.masked_units  # ... and the L3 agent on compute
    assert shared.build_script is None
    assert recipe.image_roles("compute") == recipe.image_roles("network") == ("network", "compute")
    assert recipe.image_roles("controller") == ("controller",)
    # What a role's own steps install is unchanged: a lab without role images gets its own.
    assert "nova-compute-kvm" not in recipe.role_image("network").packages

    # Refused, with the key path: an unknown role, itself, a chain, two roles on one, and two
    # build scripts.
    folder = write_recipe(tmp_path / "r")
    (folder / "images").mkdir()
    (folder / "images" / "a.sh").write_text("true\n")
    base = (folder / "recipe.toml").read_text()
    for roles, problem in (
        ('[roles.compute]\nshares_image_with = "dashboard"\n', "is not another role"),
        ('[roles.compute]\nshares_image_with = "compute"\n', "is not another role"),
        (
            '[roles.compute]\nshares_image_with = "network"\n[roles.network]\n'
            'shares_image_with = "block"\n[roles.block]\n',
            "shares its own image already",
        ),
        (
            '[roles.compute]\nshares_image_with = "network"\n[roles.block]\n'
            'shares_image_with = "network"\n[roles.network]\n',
            "is shared by compute and block",
        ),
        (
            '[roles.compute]\nshares_image_with = "network"\nbuild_script = "a.sh"\n'
            '[roles.network]\nbuild_script = "a.sh"\n',
            "has a build script too",
        ),
        ("[roles.compute]\nshares_image_with = 3\n[roles.network]\n", "shares_image_with"),
    ):
        (folder / "recipe.toml").write_text(base + roles)
        with pytest.raises(RecipeError) as err:
            load_recipe(str(folder))
        assert "shares_image_with" in err.value.message, err.value.message
        assert problem in err.value.message, err.value.message
    (folder / "recipe.toml").write_text(
        base + '[roles.compute]\npackages = ["b"]\nshares_image_with = "network"\n'
        '[roles.network]\npackages = ["a"]\nmasked_units = ["a.service"]\n'
    )
    loaded = load_recipe(str(folder))
    assert loaded.node_image("compute").packages == loaded.node_image("network").packages
    assert sorted(loaded.node_image("network").packages) == ["a", "b"]
    assert loaded.node_image("compute").masked_units == ("a.service",)


def test_the_recipes_share_one_lb_ini_and_their_digests_cover_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from labbuilder.recipe import files as recipe_files

    helper = (REPO / "recipes" / "helpers" / "lb-ini.py.j2").read_text()
    scripts = {}
    for name in ("zed-debian-12", "icehouse-ubuntu-14.04"):
        recipe = load_recipe(name)
        templates = dict(recipe.templates)
        assert templates["helpers/lb-ini.py.j2"] == helper
        own = templates["lb-ini.py.j2"]
        assert '{% extends "helpers/lb-ini.py.j2" %}' in own and "def main" not in own
        env = jinja2.Environment(loader=jinja2.DictLoader(templates), keep_trailing_newline=True)
        scripts[name] = env.get_template("lb-ini.py.j2").render()
    zed, icehouse = scripts["zed-debian-12"], scripts["icehouse-ubuntu-14.04"]
    assert zed.startswith("#!/usr/bin/env python3\n") and "if changed != lines:" in zed
    assert icehouse.startswith("#!/usr/bin/env python\n") and "if changed" not in icehouse
    assert "        write(path, change(lines, section, argv[3], argv[4]))\n" in icehouse
    for script in (zed, icehouse):
        compile(script, "lb-ini", "exec")
    # A changed helper is a changed recipe, for every recipe (a recipe folder of its own too).
    folder = write_recipe(tmp_path)
    before = {name: load_recipe(name).digest for name in ("zed-debian-12", str(folder))}
    changed = tuple((name, text + "#\n") for name, text in recipe_files.shared_helpers())
    monkeypatch.setattr(recipe_files, "shared_helpers", lambda: changed)
    for name, digest in before.items():
        assert load_recipe(name).digest != digest


# --- one quoting filter per destination --------------------------------------------------------

HOSTILE = [
    'http://p:3142";\nAPT::Update::Pre-Invoke {"touch /tmp/x"};',
    "pool.ntp.org\nallow all",
    "a b",
    "$(reboot)",
    "`id`",
    "it's",
    'back\\slash "quoted"',
    "tab\there",
    "\u2028line separator",
    "esc\x1b[2J",
    "ünïcödé and 🙂",
]


@pytest.mark.parametrize("value", HOSTILE)
def test_the_shell_filter_gives_bash_one_word(value: str) -> None:
    assert shlex.split(shell(value)) == [value]
    out = subprocess.run(
        ["bash", "-c", f"printf %s {shell(value)}"], capture_output=True, check=True
    ).stdout
    assert out.decode() == value


@pytest.mark.parametrize("value", HOSTILE)
def test_the_yaml_filter_is_one_double_quoted_string(value: str) -> None:
    text = yaml(value)
    assert "\n" not in text and text.isascii() and text.startswith('"') and text.endswith('"')
    if all(ord(c) <= 0xFFFF for c in value):  # JSON reads YAML's double-quoted BMP escapes
        assert json.loads(text) == value
    else:
        assert "\\U0001f642" in text


def test_the_apt_conf_filter_refuses_what_apt_conf_cannot_hold() -> None:
    assert aptconf("http://10.0.0.1:3142") == '"http://10.0.0.1:3142"'
    for value in HOSTILE[:1] + ['a"b', "a\\b", "a\nb", "a\x00b"]:
        with pytest.raises(QuotingError):
            aptconf(value)


def test_the_chrony_filter_takes_one_host_word_only() -> None:
    assert chrony("ntp.example.org") == "ntp.example.org"
    assert chrony("2001:db8::1") == "2001:db8::1"
    for value in ("pool.ntp.org\nallow all", "a b", "x iburst minpoll 0", "#x", "-x", ""):
        with pytest.raises(QuotingError):
            chrony(value)


def test_the_ini_filter_keeps_one_line_and_doubles_dollars() -> None:
    assert ini("pa$$word") == "pa$$$$word"
    for value in ("a\nb = c", "a\rb", " padded "):
        with pytest.raises(QuotingError):
            ini(value)


def _seed(apt_proxy: str | None) -> dict[str, bytes]:
    lab = load_builtin_lab("guide-3node")
    plan = api.plan_lab(lab, host_check=False).plan
    seed = SeedInput(
        user="lab", password_hash="$6$x$y", ssh_public_key="ssh-ed25519 AAAA k", apt_proxy=apt_proxy
    )
    return render_seed_files(
        plan, plan.nodes[0], digest="d", seed=seed, flavour=CloudInitFlavour.V2
    )


def test_user_data_writes_the_apt_proxy_through_apt_conf_then_yaml_quoting() -> None:
    text = _seed("http://10.0.0.1:3142")["user-data"].decode()
    line = next(line for line in text.splitlines() if "Acquire::http::Proxy" in line)
    assert (
        json.loads(line.split("content: ", 1)[1])
        == 'Acquire::http::Proxy "http://10.0.0.1:3142";\n'
    )
    hosts = next(line for line in text.splitlines() if "127.0.0.1 localhost" in line)
    assert json.loads(hosts.split("content: ", 1)[1]).splitlines()[1] == "10.0.0.11 controller"


def test_a_hostile_apt_proxy_that_reached_the_template_is_never_written() -> None:
    """Validation refuses it at parse time (test_hostile_inputs); if it got past that, the
    apt.conf filter would refuse it rather than add directives to the guests' apt.conf."""
    with pytest.raises(QuotingError, match="apt.conf"):
        _seed(HOSTILE[0])


def test_a_hostile_ntp_server_that_reached_the_template_is_never_written() -> None:
    lab = load_builtin_lab("guide-3node")
    lab = dataclasses.replace(
        lab, options=dataclasses.replace(lab.options, ntp_servers=("pool.ntp.org\nallow all",))
    )
    plan = api.plan_lab(lab, host_check=False).plan
    with pytest.raises(RecipeError, match="chrony"):
        render_for_lab(lab, Selection(), secrets=None, plan=plan, virt_type="qemu")
    fine = dataclasses.replace(
        lab, options=dataclasses.replace(lab.options, ntp_servers=("192.0.2.10",))
    )
    _, stages = render_for_lab(fine, Selection(), secrets=None, plan=plan, virt_type="qemu")
    scripts = "".join(step.script for stage in stages for step in stage.steps)
    assert "server 192.0.2.10 iburst\n" in scripts


def test_recipe_templates_render_in_a_sandbox(tmp_path: Path) -> None:
    """A recipe folder's templates cannot reach Python's internals (and so the host)."""
    folder = write_recipe(tmp_path)
    stage = folder / "stages" / "10-demo.toml"
    stage.write_text(
        stage.read_text().replace(
            "apt-get install -y mysql-server python-mysqldb",
            "echo {{ ''.__class__.__mro__[1].__subclasses__() }}",
        )
    )
    lab = parse_lab('name = "demo"\n', source="lab.toml")
    plan = api.plan_lab(lab, host_check=False).plan
    with pytest.raises(RecipeError, match="SecurityError|unsafe"):
        render_for_lab(
            lab, Selection(recipe=str(folder)), secrets=None, plan=plan, virt_type="qemu"
        )


def test_a_with_stage_the_recipe_does_not_have_is_refused_not_ignored() -> None:
    lab = load_builtin_lab("guide-3node")
    plan = api.plan_lab(lab, host_check=False).plan
    with pytest.raises(RecipeError) as err:
        render_for_lab(
            lab, Selection(optional=("dashbord",)), secrets=None, plan=plan, virt_type="qemu"
        )
    assert err.value.message == (
        "stage 'dashbord' (options.stages or --with) is not an optional stage of recipe "
        "zed-debian-12"
    )
    assert err.value.hint is not None and "dashboard" in err.value.hint


def test_the_interfaces_filter_takes_one_word() -> None:
    assert eni("10.0.0.11") == "10.0.0.11" and eni("eth0") == "eth0"
    for value in ("10.0.0.11\n    up reboot", "a b", "", "-x"):
        with pytest.raises(QuotingError):
            eni(value)


def test_the_seed_files_of_a_node_are_rendered_with_their_filters() -> None:
    files = _seed(None)
    interfaces = files["network-interfaces"].decode()
    assert "address 10.0.0.11\n    netmask 255.255.255.0\n    gateway 10.0.0.1" in interfaces
    assert 'local-hostname: "controller"' in files["meta-data"].decode()


def test_pyyaml_reads_the_yaml_filter_back_as_the_same_strings() -> None:
    """cloud-init reads user-data with PyYAML: it reads the filter's strings back unchanged."""
    import yaml as pyyaml

    values = [*HOSTILE, "\x00\x7f\x85\u00a0\ufeff", "🙂" * 3]
    document = "\n".join(f"- {yaml(value)}" for value in values) + "\n"
    assert pyyaml.safe_load(document) == values


def test_ubuntu_14_04_seeds_carry_the_nodes_host_key() -> None:
    """cloud-init 0.7.5 takes no ed25519 key in ssh_keys: the key labbuilder made (the one in
    the lab's known_hosts) is written as a file and kept, so host key checks pass there too."""
    import yaml as pyyaml

    lab = load_builtin_lab("guide-3node")
    plan = api.plan_lab(lab, host_check=False).plan
    node = plan.nodes[0]
    key = ("-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n-----END OPENSSH PRIVATE KEY-----\n",
           "ssh-ed25519 AAAAC3Nz root@controller")  # fmt: skip
    seed = SeedInput(user="ubuntu", password_hash="$6$x$y", ssh_public_key="ssh-ed25519 AAAA k",
                     host_keys={node.name: key})  # fmt: skip
    files = render_seed_files(plan, node, digest="d", seed=seed, flavour=CloudInitFlavour.ENI)
    data = pyyaml.safe_load(files["user-data"])
    assert data["ssh_deletekeys"] is False and "ssh_keys" not in data
    written = {entry["path"]: entry for entry in data["write_files"]}
    private = written["/etc/ssh/ssh_host_ed25519_key"]
    assert private["content"] == key[0] and private["permissions"] == "0600"
    assert written["/etc/ssh/ssh_host_ed25519_key.pub"]["content"] == key[1] + "\n"
    lean = pyyaml.safe_load(
        render_seed_files(plan, node, digest="d", seed=seed, flavour=CloudInitFlavour.V2)[
            "user-data"
        ]
    )
    assert lean["ssh_keys"]["ed25519_private"] == key[0]
    assert "/etc/ssh/ssh_host_ed25519_key" not in {e["path"] for e in lean["write_files"]}


def test_zed_starts_services_in_one_systemctl_call_without_sysv_bookkeeping() -> None:
    """Every step of zed-debian-12 that unmasks or enables a service skips Debian's update-rc.d
    run (SYSTEMCTL_SKIP_SYSV=1) and starts its services in one systemctl call, never one by one
    in a loop: both cost minutes per install under emulation."""
    lab = api.load_lab(None, "zed-full")
    plan = api.plan_lab(lab, host_check=False).plan
    _, stages = render_for_lab(lab, Selection(), secrets=None, plan=plan, virt_type="qemu")
    starting = 0
    for stage in stages:
        for step in stage.steps:
            lines = [line.strip() for line in step.script.splitlines()]
            for line in lines:
                if line.startswith(("systemctl unmask", "systemctl enable")):
                    raise AssertionError(f"{stage.name}.{step.step}: {line}")
                if "systemctl restart" in line and "$service" in line.replace("$services", ""):
                    raise AssertionError(f"{stage.name}.{step.step} restarts in a loop: {line}")
            if any(line.startswith("SYSTEMCTL_SKIP_SYSV=1 systemctl enable") for line in lines):
                starting += 1
    assert starting >= 15  # the steps that start services, core path and optional chapters


# --- service start timeouts under emulation ------------------------------------------------------


def assert_every_service_start_waits_for_emulation(recipe: str) -> None:
    """Stage environment of ``recipe`` gives every node systemd's longer start timeout (the
    manager's default and ovs-vswitchd's own), right after the packages step, before any step
    starts a service; its check passes on 15 minutes and fails on systemd's 90 s."""
    lab = api.load_lab(None, "guide-full", recipe=recipe)
    plan = api.plan_lab(lab, host_check=False).plan
    every = tuple(stage.name for stage in load_recipe(recipe).stages if stage.optional)
    selection = Selection(recipe=recipe, optional=every)
    _, stages = render_for_lab(lab, selection, secrets=None, plan=plan, virt_type="qemu")
    environment = stages[0]
    assert environment.name == "environment"
    for node in plan.nodes:
        names = [step.step for step in environment.for_node(node.name)]
        assert names.index("start-timeouts") == names.index("packages") + 1, node.name
        (step,) = (s for s in environment.for_node(node.name) if s.step == "start-timeouts")
        manager = "/etc/systemd/system.conf.d/50-labbuilder-start-timeout.conf"
        ovs = "/etc/systemd/system/ovs-vswitchd.service.d/50-labbuilder-start-timeout.conf"
        assert f"install -m 0644 -o root -g root {manager}.labbuilder-new {manager}" in step.script
        assert "[Manager]\nDefaultTimeoutStartSec=900\n" in step.script
        assert "[Service]\nTimeoutStartSec=900\n" in step.script and ovs in step.script
        assert step.script.rstrip().endswith("systemctl daemon-reload")
        (check,) = step.checks
        shown = 2 if str(node.role) in ("network", "compute") else 1
        assert check.command.count("systemctl show --value -p") == shown, node.name
        assert ("ovs-vswitchd.service" in check.command) == (shown == 2)
        assert check.expect is not None
        expect = re.compile(check.expect, re.M)
        assert expect.search("15min\n" * shown)
        for wrong in ("1min 30s\n", "15min\n5min\n", "", "infinity\n"):
            assert expect.search(wrong) is None, wrong
    # One setting for every service: no step gives a unit a start timeout of its own any more.
    others = [s for stage in stages for s in stage.steps if s.step != "start-timeouts"]
    assert others and not any("TimeoutStartSec" in step.script for step in others)


def test_every_service_start_of_recipe_zed_waits_as_long_as_emulation_needs() -> None:
    assert_every_service_start_waits_for_emulation("zed-debian-12")
