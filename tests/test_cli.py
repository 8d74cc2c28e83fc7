"""The command line as a user runs it: output, JSON, exit codes (0 ok, 2 bad input)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from labbuilder import __version__
from labbuilder.cli.main import build_parser, main
from labbuilder.host.facts import read_routes

SUBCOMMANDS = ("plan", "labs")


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_json_of_the_default_lab(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["plan", "--no-host-check", "--json"], capsys)
    assert code == 0
    data = json.loads(out)
    assert data["lab"] == "guide-3node"
    nics = {n["name"]: [nic["address"] for nic in n["nics"]] for n in data["nodes"]}
    assert nics == {
        "controller": ["10.0.0.11"],
        "network": ["10.0.0.21", "10.0.1.21", None],
        "compute1": ["10.0.0.31", "10.0.1.31"],
    }
    # the guide's minimums raised to recipe zed-debian-12's
    assert [n["memory"] for n in data["nodes"]] == [5 * 2**30, 2 * 2**30, 2 * 2**30]
    assert [n["vcpus"] for n in data["nodes"]] == [2, 2, 2]


def test_plan_tables_show_the_guides_addresses_and_sizes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run(["plan", "--no-host-check"], capsys)
    assert code == 0
    for text in ("10.0.0.11/24", "10.0.1.21/24", "10.0.0.31/24", "up, no address",
                 "5 GB (recipe minimum)", "vda 10 GB root (recipe minimum)", "vda 5 GB root",
                 "203.0.113.101-203.0.113.200", "lb1663ab-ext"):  # fmt: skip
        assert text in out
    assert "…" not in out  # nothing cut off when the output is not a terminal


def test_a_typo_in_a_lab_file_is_one_error_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lab = tmp_path / "lab.toml"
    lab.write_text('name = "typo"\n[nodes.compute1]\nmemroy = "2 GB"\n')
    code, out, err = run(["plan", str(lab), "--no-host-check"], capsys)
    assert code == 2
    assert out == ""
    assert err.splitlines() == [
        f"error: {lab}: unknown key 'nodes.compute1.memroy'",
        "hint: did you mean 'memory'?",
    ]


def test_a_subnet_the_host_routes_is_refused_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    route = next((r for r in read_routes() if r.destination != "0.0.0.0/0"), None)
    if route is None:
        pytest.skip("this host has no route besides the default one")
    prefix = int(route.destination.split("/")[1])
    if prefix > 28:
        pytest.skip(f"the host's route {route.destination} is too small for a lab network")
    lab = tmp_path / "lab.toml"
    lab.write_text(
        f'name = "clash"\n[networks.management]\ncidr = "{route.destination}"\n'
        f'gateway = "{route.destination.split("/")[0][:-1]}1"\n'
        '[nodes.controller]\naddresses = { management = "'
        + route.destination.split("/")[0][:-1]
        + '2" }\n'
        "[nodes.network]\ncount = 0\n[nodes.compute]\ncount = 0\n[options]\nisolated = false\n"
    )
    code, _, err = run(["plan", str(lab)], capsys)
    assert code == 2, err
    first = err.splitlines()[0]
    assert first.startswith(
        f'error: {lab}: networks.management.cidr = "{route.destination}" overlaps the host\'s route'
    )
    assert "set networks.management.cidr" in first


def test_allow_small_allows_small_nodes_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lab = tmp_path / "lab.toml"
    lab.write_text('name = "tiny"\n[nodes.compute1]\nmemory = "1 GB"\n')
    assert run(["plan", str(lab), "--no-host-check"], capsys)[0] == 2
    code, out, _ = run(["plan", str(lab), "--no-host-check", "--allow-small"], capsys)
    assert code == 0
    assert "below the guide's minimum of 2 GB for a compute node" in out
    # -f/--file is the same as the positional lab file
    assert run(["plan", "-f", str(lab), "--no-host-check", "--allow-small"], capsys)[0] == 0


def test_install_force_runs_steps_again_and_does_not_allow_small_sizes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lab = tmp_path / "lab.toml"
    lab.write_text('name = "lbtest-cli-tiny"\n[nodes.compute1]\nmemory = "1 GB"\n')
    code, out, err = run(["install", "--file", str(lab), "--dry-run", "--force"], capsys)
    assert code == 2, out + err
    assert err.splitlines()[0].startswith(f"error: {lab}: nodes.compute1.memory")
    with pytest.raises(SystemExit) as exit_:
        main(["install", str(lab), "--dry-run", "--allow-small"])
    assert exit_.value.code == 2
    assert "--allow-small" in capsys.readouterr().err


def test_lab_file_and_lab_name_together_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lab = tmp_path / "lab.toml"
    lab.write_text('name = "x"\n')
    code, _, err = run(["plan", str(lab), "--lab", "guide-3node"], capsys)
    assert code == 2
    assert err.startswith("error: give a lab file or --lab NAME, not both")
    code, _, err = run(["plan", "--file", str(lab), "--lab", "guide-3node"], capsys)
    assert code == 2
    assert err.startswith("error: give a lab file or --lab NAME, not both")


def test_labs_lists_the_builtin_labs(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["labs", "--json"], capsys)
    assert code == 0
    labs = {lab["name"]: lab for lab in json.loads(out)}
    assert labs["guide-3node"]["nodes"] == ["controller", "network", "compute1"]
    assert labs["guide-2node-legacy"]["networking"] == "legacy"
    code, out, _ = run(["labs"], capsys)
    assert "guide-full" in out


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"labbuilder {__version__}"
    for command in SUBCOMMANDS:
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0
        assert len(capsys.readouterr().out) > 200
    with pytest.raises(SystemExit) as exit_:
        main(["no-such-command"])
    assert exit_.value.code == 2


def test_the_console_script_runs() -> None:
    script = shutil.which("labbuilder", path=str(Path(sys.executable).parent))
    assert script is not None, "the package is not installed with its console script"
    result = subprocess.run(
        [script, "plan", "--lab", "guide-2node-legacy", "--no-host-check", "--json"],
        capture_output=True, text=True, check=False, env={**os.environ, "COLUMNS": "80"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["networking"] == "legacy"


@pytest.mark.integration
def test_down_and_gc_print_json_for_scripts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the real libvirtd, for a lab that is not there: nothing is removed, and says so."""
    monkeypatch.setenv("LABBUILDER_STATE_DIR", str(tmp_path / "state"))
    lab = tmp_path / "lab.toml"
    lab.write_text('name = "lbtest-cli-none"\n')
    code, out, err = run(["down", "--file", str(lab), "--json"], capsys)
    assert code == 0, err
    removed = json.loads(out)
    assert removed["lab"] == "lbtest-cli-none"
    assert removed["domains"] == removed["networks"] == removed["volumes"] == []
    code, out, err = run(["gc", "--match", "lbtest-cli-none-nothing-*", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out) == {"labs": {}, "templates": []}


@pytest.mark.integration
def test_down_removes_a_lab_whose_file_no_longer_suits_its_recipe(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`plan` refuses a stage the recipe does not have; `down` of the same file still works,
    so a lab is never stuck on the host because its file was edited."""
    monkeypatch.setenv("LABBUILDER_STATE_DIR", str(tmp_path / "state"))
    lab = tmp_path / "lab.toml"
    lab.write_text('name = "lbtest-cli-edited"\n[options]\nstages = ["no-such-stage"]\n')
    code, _, err = run(["plan", "--file", str(lab), "--no-host-check"], capsys)
    assert code == 2 and "options.stages[0]" in err, err
    code, out, err = run(["down", "--file", str(lab), "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["lab"] == "lbtest-cli-edited"


def test_every_command_that_prints_for_scripts_takes_json() -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices  # type: ignore[union-attr]
    wanted = {
        ("plan",), ("labs",), ("up",), ("down",), ("status",), ("list",), ("gc",), ("install",),
        ("run",), ("doctor",), ("snapshot", "list"), ("snapshot", "take"), ("snapshot", "restore"),
        ("snapshot", "delete"), ("images", "list"), ("images", "pull"), ("images", "build"),
        ("images", "show"), ("images", "prune"), ("recipe", "list"), ("recipe", "show"),
        ("recipe", "coverage"), ("template", "save"), ("template", "list"), ("template", "show"),
        ("template", "delete"), ("class", "plan"), ("class", "up"), ("class", "status"),
        ("class", "reset"), ("class", "board"), ("class", "down"),
    }  # fmt: skip
    for path in wanted:
        sub = commands[path[0]]
        if len(path) == 2:
            actions = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction))
            sub = actions.choices[path[1]]
        assert "--json" in sub._option_string_actions, path


def test_every_lab_command_selects_the_lab_the_same_way() -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices  # type: ignore[union-attr]
    lab_commands = [
        "plan",
        "up",
        "down",
        "status",
        "ssh",
        "ssh-config",
        "console",
        "install",
        "run",
    ]
    subs = [commands[name] for name in lab_commands]
    snapshot = next(
        a for a in commands["snapshot"]._actions if isinstance(a, argparse._SubParsersAction)
    )
    subs += list(snapshot.choices.values())
    for sub in subs:
        options = sub._option_string_actions
        assert {"--lab", "--file", "-f"} <= set(options), sub.prog
        assert options["--lab"].metavar == "NAME", sub.prog
        assert ("--allow-small" in options) == (sub.prog.split()[-1] in ("plan", "up", "run"))
        assert ("--force" in options) == (sub.prog.split()[-1] in ("install", "run"))


def test_the_board_refuses_bad_flags_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`class board`: --json only with --once (a served board is read at /board.json), a port
    that is no port, and a student the class lacks for `class ssh`: exit 2, one line each."""
    (tmp_path / "lab.toml").write_text('name = "lbtest-cls"\n')
    class_file = tmp_path / "class.toml"
    class_file.write_text(
        'name = "lbtestcls"\nlab = "lab.toml"\nstage = "image"\n[[students]]\nname = "ann"\n'
    )
    for argv, message in (
        (["class", "board", str(class_file), "--json"], "--json prints the board of one round"),
        (["class", "board", str(class_file), "--port", "70000"], "--port 70000 is not a port"),
        (["class", "ssh", str(class_file), "bob", "controller"], "there is no student 'bob'"),
    ):
        code, out, err = run(argv, capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) <= 2, (argv, err)


def test_verify_refuses_bad_flags_and_a_lab_that_is_not_up(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`verify` and `run --verify`: a concurrency or timeout that is none, --verify-suite
    without --verify, a lab that is not up: exit 2, one line each, nothing run."""
    monkeypatch.setenv("LABBUILDER_STATE_DIR", str(tmp_path / "state"))
    lab = tmp_path / "lab.toml"
    lab.write_text('name = "lbtest-verify"\n')
    for argv, message in (
        (["verify", str(lab), "--concurrency", "0"], "--concurrency 0 is not a number of tests"),
        (["verify", str(lab), "--timeout", "-5"], "--timeout -5 is not a duration"),
        (["verify", str(lab)], "lab lbtest-verify is not up on this host"),
        (["run", str(lab), "--verify-suite", "smoke"], "--verify-suite chooses what --verify runs"),
    ):
        code, out, err = run(argv, capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) <= 2, (argv, err)
