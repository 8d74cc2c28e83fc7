"""A recipe's minimum node sizes per role: the defaults they raise, the lab files they refuse
(exit 2, before anything is created), ``--allow-small``, and ``install`` on a lab that is up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from labbuilder.api import facade as api
from labbuilder.cli.main import main
from labbuilder.common.errors import LabFileError, RecipeError, UsageError
from labbuilder.lab.files import parse_lab
from labbuilder.lab.planner import plan
from labbuilder.lab.view import plan_as_dict, plan_from_dict
from labbuilder.model.lab import GiB, HostFacts, MiB
from labbuilder.recipe.files import load_recipe
from labbuilder.recipe.model import Recipe
from labbuilder.recipe.sizes import check_plan, fit_lab, role_minimum

STAGE = """
name = "demo"
[[steps]]
name = "hello"
roles = ["all"]
run = "true"
"""


def sized_recipe(tmp_path: Path, roles: str) -> Recipe:
    folder = tmp_path / "recipe"
    (folder / "stages").mkdir(parents=True)
    (folder / "recipe.toml").write_text(f'name = "sized"\ndescription = "d"\nguide = "g"\n{roles}')
    (folder / "stages" / "10-demo.toml").write_text(STAGE)
    return load_recipe(str(folder))


ROLES = """
[roles.controller]
min_vcpus = 2
min_memory = "5 GB"
min_disk = "10 GB"
[roles.compute]
min_vcpus = 2
"""


def test_sizes_a_lab_leaves_out_are_raised_to_the_recipes_minimum(tmp_path: Path) -> None:
    recipe = sized_recipe(tmp_path, ROLES)
    assert role_minimum(recipe, "controller") == {"vcpus": 2, "memory": 5 * GiB, "disk": 10 * GiB}
    assert role_minimum(recipe, "network") == {}
    lab = fit_lab(parse_lab('name = "x"\n', source="lab.toml"), recipe)
    sizes = {n.name: (n.vcpus, n.memory, n.disk, n.recipe_minimum) for n in lab.nodes}
    assert sizes == {
        "controller": (2, 5 * GiB, 10 * GiB, ("vcpus", "memory", "disk")),
        "network": (1, 512 * MiB, 5 * GiB, ()),  # the recipe says nothing: the guide's
        "compute1": (2, 2 * GiB, 10 * GiB, ("vcpus",)),
    }
    assert lab.warnings == ()
    # The plan carries which sizes are the recipe's, in JSON and in the tables.
    planned = plan(lab, HostFacts())
    assert planned.node("controller").recipe_minimum == ("vcpus", "memory", "disk")
    assert plan_from_dict(plan_as_dict(planned)) == planned
    # A size the lab file sets at or above the minimum is the file's.
    big = parse_lab('name = "x"\n[nodes.controller]\nmemory = "8 GB"\n', source="lab.toml")
    controller = fit_lab(big, recipe).nodes[0]
    assert (controller.memory, controller.recipe_minimum) == (8 * GiB, ("vcpus", "disk"))


@pytest.mark.parametrize(
    ("table", "message", "hint"),
    [
        (
            '[nodes.controller]\nmemory = "2 GB"',
            "lab.toml: nodes.controller.memory = 2 GB is below recipe sized's minimum for role "
            "controller (5 GB)",
            'set nodes.controller.memory = "5 GB" or more',
        ),
        (
            "[nodes.controller]\nvcpus = 1",
            "lab.toml: nodes.controller.vcpus = 1 is below recipe sized's minimum for role "
            "controller (2 vCPUs)",
            "set nodes.controller.vcpus = 2 or more",
        ),
        (
            '[nodes.controller]\ndisk = "5 GB"',
            "lab.toml: nodes.controller.disk = 5 GB is below recipe sized's minimum for role "
            "controller (10 GB)",
            'set nodes.controller.disk = "10 GB" or more',
        ),
        (
            "[nodes.compute]\ncount = 2\nvcpus = 1",
            "lab.toml: nodes.compute.vcpus = 1 is below recipe sized's minimum for role "
            "compute (2 vCPUs)",
            "set nodes.compute.vcpus = 2 or more",
        ),
    ],
)
def test_a_size_below_the_recipes_minimum_is_refused_or_a_warning(
    tmp_path: Path, table: str, message: str, hint: str
) -> None:
    recipe = sized_recipe(tmp_path, ROLES)
    lab = parse_lab(f'name = "x"\n{table}\n', source="lab.toml", force=True)
    with pytest.raises(LabFileError) as err:
        fit_lab(lab, recipe)
    assert err.value.message == message
    assert err.value.exit_code == 2
    assert err.value.hint is not None
    assert err.value.hint.startswith(hint)
    assert "--allow-small" in err.value.hint
    allowed = fit_lab(lab, recipe, allow_small=True)
    assert message in allowed.warnings
    assert message in plan(allowed, HostFacts()).warnings


@pytest.mark.parametrize(
    ("roles", "message"),
    [
        ("[roles.controller]\nmin_vcpus = 0", "roles.controller.min_vcpus = 0 is below 1"),
        ('[roles.controller]\nmin_vcpus = "2"', "roles.controller.min_vcpus"),
        ('[roles.network]\nmin_memory = "lots"', "roles.network.min_memory"),
        ("[roles.compute]\nmin_disk = 10", "roles.compute.min_disk"),
        ("[roles.compute]\nmin_cpus = 2", "min_cpus"),
    ],
)
def test_a_recipes_minimums_are_checked_when_it_is_read(
    tmp_path: Path, roles: str, message: str
) -> None:
    with pytest.raises(RecipeError, match=message):
        sized_recipe(tmp_path, roles)


def test_install_refuses_a_lab_that_is_up_below_the_minimum_unless_up_allowed_it(
    tmp_path: Path,
) -> None:
    recipe = sized_recipe(tmp_path, ROLES)
    small = parse_lab(
        'name = "x"\n[nodes.controller]\nvcpus = 1\nmemory = "2 GB"\n', source="lab.toml"
    )
    saved = plan(small, HostFacts())  # up'd by an older labbuilder, before the minimums
    with pytest.raises(UsageError) as err:
        check_plan(small, recipe, saved, bring_up_again="--file lab.toml")
    assert err.value.message == (
        "lab.toml: nodes.controller.vcpus = 1 is below recipe sized's minimum for role "
        "controller (2 vCPUs)"
    )
    assert err.value.exit_code == 2
    assert err.value.hint is not None
    assert "`labbuilder down --file lab.toml`" in err.value.hint
    # `up --allow-small` accepted these sizes: they are the plan's warnings, and install goes on
    accepted = plan(fit_lab(small, recipe, allow_small=True), HostFacts())
    check_plan(small, recipe, accepted, bring_up_again="--file lab.toml")
    # a plan at the minimums passes
    check_plan(small, recipe, plan(fit_lab(parse_lab('name = "x"', source="l"), recipe), HostFacts()),
               bring_up_again="")  # fmt: skip


# --- the built-in recipes and labs ------------------------------------------------------------


def test_the_built_in_labs_all_meet_their_recipes_minimums() -> None:
    for lab in api.list_labs():
        fitted = api.load_lab(None, lab.name)
        assert fitted.warnings == (), lab.name


def test_the_recipes_declare_their_minimums_per_role() -> None:
    zed = load_recipe("zed-debian-12")
    assert role_minimum(zed, "controller") == {"vcpus": 2, "memory": 5 * GiB, "disk": 10 * GiB}
    assert role_minimum(zed, "network") == {"vcpus": 2, "memory": 2 * GiB}
    assert role_minimum(zed, "compute") == {"vcpus": 2, "memory": 2 * GiB}
    assert role_minimum(zed, "block") == {"vcpus": 1, "memory": 1 * GiB}
    assert role_minimum(zed, "object") == {"vcpus": 1, "memory": 1536 * MiB}
    icehouse = load_recipe("icehouse-ubuntu-14.04")  # the guide's own (L318-348)
    assert role_minimum(icehouse, "controller") == {"vcpus": 1, "memory": 2 * GiB, "disk": 5 * GiB}
    assert role_minimum(icehouse, "network") == {"vcpus": 1, "memory": 512 * MiB, "disk": 5 * GiB}
    assert role_minimum(icehouse, "compute") == {"vcpus": 1, "memory": 2 * GiB, "disk": 10 * GiB}


def test_the_default_lab_meets_its_recipes_minimums_and_plan_says_so(
    capsys: pytest.CaptureFixture[str],
) -> None:
    lab = api.load_lab()
    sizes = {n.name: (n.vcpus, n.memory, n.disk) for n in lab.nodes}
    assert sizes == {
        "controller": (2, 5 * GiB, 10 * GiB),
        "network": (2, 2 * GiB, 5 * GiB),
        "compute1": (2, 2 * GiB, 10 * GiB),
    }
    assert main(["plan", "--no-host-check"]) == 0
    out = capsys.readouterr().out
    assert "5 GB (recipe minimum)" in out
    assert "vda 10 GB root (recipe minimum)" in out
    assert main(["plan", "--no-host-check", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [n["recipe_minimum"] for n in data["nodes"]] == [
        ["vcpus", "memory", "disk"],
        ["vcpus", "memory"],
        ["vcpus"],
    ]
    # zed-full sets its sizes itself, at the minimums: nothing is raised, nothing refused
    full = api.load_lab(None, "zed-full")
    assert all(node.recipe_minimum == () for node in full.nodes)


@pytest.mark.parametrize("command", ["plan", "install", "run", "up"])
def test_a_small_lab_is_refused_with_exit_2_before_anything_is_created(
    command: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    monkeypatch.setenv("LABBUILDER_STATE_DIR", str(state))
    monkeypatch.setenv("LABBUILDER_POOL", "lbtest-mn-no-pool")
    lab = tmp_path / "lab.toml"
    lab.write_text('name = "lbtest-mn-small"\n[nodes.controller]\nmemory = "2 GB"\n')
    args = [command, "--file", str(lab)]
    args += {"plan": ["--no-host-check"], "up": ["--install"], "install": [], "run": []}[command]
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert err.splitlines() == [
        f"error: {lab}: nodes.controller.memory = 2 GB is below recipe zed-debian-12's minimum "
        "for role controller (5 GB)",
        'hint: set nodes.controller.memory = "5 GB" or more, or leave it out (a node without a '
        "size gets the recipe's minimum); --allow-small lets smaller sizes through as warnings",
    ]
    assert list(state.iterdir()) == []  # no registry entry, no lab state, no report


def test_allow_small_lets_a_size_below_the_recipes_minimum_through_as_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lab = tmp_path / "lab.toml"
    lab.write_text('name = "small"\n[nodes.controller]\nmemory = "4 GB"\n')
    assert main(["plan", str(lab), "--no-host-check", "--json"]) == 2
    capsys.readouterr()
    assert main(["plan", str(lab), "--no-host-check", "--allow-small", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["warnings"] == [
        f"{lab}: nodes.controller.memory = 4 GB is below recipe zed-debian-12's minimum for role "
        "controller (5 GB)"
    ]
    assert data["nodes"][0]["memory"] == 4 * GiB
    assert "memory" not in data["nodes"][0]["recipe_minimum"]


def test_node_spec_records_the_sizes_its_lab_file_sets() -> None:
    lab = parse_lab(
        'name = "x"\n[nodes.compute]\ncount = 2\nmemory = "4 GB"\n[nodes.controller]\nvcpus = 2\n',
        source="lab.toml",
    )
    assert {n.name: n.sized for n in lab.nodes} == {
        "controller": ("vcpus",),
        "network": (),
        "compute1": ("memory",),
        "compute2": ("memory",),
    }


def test_up_install_is_explained_and_takes_the_lab_flags_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["up", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--install then install the lab's recipe through its core path" in text
    assert "as `labbuilder run --keep` does: the lab is kept whether the install passes" in text
    assert "Exit codes: 0 the lab is up (with --install: and the install passed)" in text
    # install's own options stay with `install` and `run`: one meaning per flag
    for extra in (["--until", "image"], ["--force"], ["--recipe", "zed-debian-12"]):
        with pytest.raises(SystemExit) as exit_:
            main(["up", "--install", *extra])
        assert exit_.value.code == 2
        assert extra[0] in capsys.readouterr().err
    # a lab file whose optional stage the recipe lacks: refused before anything is created
    lab = tmp_path / "lab.toml"
    lab.write_text('name = "lbtest-mn-stages"\n[options]\nstages = ["nosuch"]\n')
    assert main(["up", "--install", "--json", "--file", str(lab)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f'error: {lab}: options.stages[0] = "nosuch" is not a stage of recipe')


def test_install_refuses_a_lab_that_is_up_below_its_recipes_minimums_with_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A lab an older labbuilder brought up at the guide's sizes: `install` names the first
    node below the recipe's minimum and how to bring it up again, before it touches the lab."""
    from labbuilder.lifecycle.state import lab_state, write_state_file

    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    monkeypatch.setenv("LABBUILDER_STATE_DIR", str(state))
    lab_file = tmp_path / "lab.toml"
    lab_file.write_text('name = "lbtest-mn-up"\n')
    old = plan(parse_lab(lab_file.read_text(), source=str(lab_file)), HostFacts())
    lab_json = lab_state("lbtest-mn-up").directory / "lab.json"
    write_state_file(lab_json, json.dumps({"plan": plan_as_dict(old), "virt_type": "qemu"}))
    assert main(["install", "--file", str(lab_file)]) == 2
    out, err = capsys.readouterr()
    first, hint = err.splitlines()[:2]
    assert first.startswith(f"error: {lab_file}: nodes.controller.")
    assert first.endswith(
        "nodes.controller.vcpus = 1 is below recipe zed-debian-12's minimum for role controller "
        "(2 vCPUs)"
    )
    assert hint.startswith(f"hint: the lab is up at that size: `labbuilder down {lab_file}`")
    # nothing was touched: no lock taken, no log, no report
    assert sorted(p.name for p in lab_json.parent.iterdir()) == ["lab.json"]
