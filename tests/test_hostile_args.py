"""Hostile or malformed arguments and environment, through the real command line (a
``labbuilder`` process): each gets its documented exit code (2: bad input) and one ``error:``
line naming the flag or variable, then one ``hint:`` line, and never a traceback. None of these
reaches libvirt: they are refused before anything is looked up or created."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from rich.console import Console
from test_failure_reports import Lab, free_loopback

from labbuilder.api import facade as api
from labbuilder.common.errors import UsageError
from labbuilder.lab.view import plan_tables
from labbuilder.lifecycle.state import (
    LabState,
    ensure_secrets,
    lab_state,
    load_secrets,
    write_secret_file,
    write_state_file,
)

Setup = Callable[[Path], tuple[list[str], dict[str, str]]]


def labbuilder(
    args: list[str], tmp_path: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "LABBUILDER_STATE_DIR": str(tmp_path / "state"), "COLUMNS": "100"}
    return subprocess.run(
        [sys.executable, "-m", "labbuilder", *args],
        env={**environ, **(env or {})}, capture_output=True, text=True, timeout=60,
        check=False, cwd=tmp_path,
    )  # fmt: skip


def assert_refused(
    result: subprocess.CompletedProcess[str], names: str, code: int = 2
) -> list[str]:
    """Exit ``code``, nothing on stdout, exactly an error line naming ``names`` and a hint."""
    assert result.returncode == code, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("error: "), lines
    assert names in lines[0], lines
    assert lines[1].startswith("hint: ") and len(lines[1]) > len("hint: ") + 5, lines
    return lines


def lab_file(tmp_path: Path) -> str:
    path = tmp_path / "lab.toml"
    path.write_text('name = "lbtest-cli-lab"\n')
    return str(path)


def args(*argv: str) -> Setup:
    return lambda tmp: ([a.replace("LAB", lab_file(tmp)) if "LAB" in a else a for a in argv], {})


def env(argv: list[str], **variables: str) -> Setup:
    return lambda tmp: (argv, {k: v.replace("TMP", str(tmp)) for k, v in variables.items()})


def state_dir(mode: int, *, parent_mode: int | None = None, owner: int | None = None) -> Setup:
    def setup(tmp: Path) -> tuple[list[str], dict[str, str]]:
        parent = tmp / "parent"
        parent.mkdir()
        folder = parent / "state"
        folder.mkdir()
        folder.chmod(mode)
        if parent_mode is not None:
            parent.chmod(parent_mode)
        if owner is not None:
            os.chown(folder, owner, owner)
        return ["status", "--lab", "guide-3node"], {"LABBUILDER_STATE_DIR": str(folder)}

    return setup


def symlinked_state_dir(tmp: Path) -> tuple[list[str], dict[str, str]]:
    real = tmp / "real"
    real.mkdir(mode=0o700)
    (tmp / "link").symlink_to(real)
    return ["status"], {"LABBUILDER_STATE_DIR": str(tmp / "link")}


def state_dir_is_a_file(tmp: Path) -> tuple[list[str], dict[str, str]]:
    (tmp / "afile").write_text("")
    return ["status"], {"LABBUILDER_STATE_DIR": str(tmp / "afile")}


def report_dir_is_a_file(tmp: Path) -> tuple[list[str], dict[str, str]]:
    (tmp / "out").write_text("")
    return ["run", "--report-dir", str(tmp / "out")], {}


CASES: list[tuple[str, Setup, str]] = [
    # lab selection: one convention, and an empty value never means the default lab
    ("empty --lab on down", args("down", "--lab", ""), "--lab ''"),
    ("blank --lab", args("plan", "--lab", "   "), "--lab '   '"),
    ("--lab with ..", args("plan", "--lab", "../x"), "--lab '../x'"),
    ("--lab with a path", args("status", "--lab", "/etc/passwd"), "--lab '/etc/passwd'"),
    ("--lab with a lab file on ssh", args("ssh", "--lab", "LAB", "controller"), "not a path"),
    (
        "--lab with a lab file on console",
        args("console", "--lab", "x.toml", "node"),
        "--lab 'x.toml'",
    ),
    ("a lab file and --lab", args("plan", "LAB", "--lab", "guide-3node"), "not both"),
    ("--file and --lab", args("down", "--file", "LAB", "--lab", "guide-3node"), "not both"),
    ("the lab file twice", args("plan", "LAB", "--file", "LAB"), "given twice"),
    ("empty --file", args("down", "--file", ""), "--file ''"),
    ("empty positional lab file", args("status", ""), "LAB.toml ''"),
    ("blank -f", args("snapshot", "list", "-f", " "), "--file ' '"),
    ("a newline in --lab", args("plan", "--lab", "guide-3node\nx"), "guide-3node\\nx"),
    ("markup in --lab", args("plan", "--lab", "[bold red]x[/]"), "'[bold red]x[/]'"),
    # numbers, stages, recipes
    ("--repeat 0", args("run", "--repeat", "0"), "--repeat"),
    ("--repeat -1", args("run", "--repeat", "-1"), "--repeat"),
    ("--repeat abc", args("run", "--repeat", "abc"), "--repeat"),
    ("--keep with --repeat", args("run", "--keep", "--repeat", "2"), "--keep"),
    ("--from an unknown stage", args("install", "--dry-run", "--from", "nosuch"), "--from nosuch"),
    ("--from empty", args("install", "--dry-run", "--from", ""), "--from"),
    ("--until an unknown stage", args("install", "--dry-run", "--until", "x"), "--until x"),
    ("--only an unknown stage", args("install", "--dry-run", "--only", "nosuch"), "--only nosuch"),
    ("--with an unknown stage", args("install", "--dry-run", "--with", "nosuch"), "--with nosuch"),
    ("run --from unknown (before up)", args("run", "--from", "nosuch"), "--from nosuch"),
    (
        "--recipe a missing folder",
        args("install", "--dry-run", "--recipe", "/nonexistent"),
        "/nonexistent",
    ),
    ("--recipe an unknown name", args("run", "--recipe", "nosuch"), "'nosuch'"),
    ("--report-dir a file", report_dir_is_a_file, "--report-dir"),
    # flags with one meaning: --allow-small for sizes, --force for steps
    ("--force on plan", args("plan", "--force"), "--force"),
    ("--force on up", args("up", "--force"), "--force"),
    ("--allow-small on install", args("install", "--allow-small"), "--allow-small"),
    ("--allow-small on down", args("down", "--allow-small"), "--allow-small"),
    ("an unknown subcommand", args("nosuch"), "'nosuch'"),
    ("a missing argument", args("snapshot", "take"), "NAME"),
    ("an unknown option", args("labs", "--colour"), "--colour"),
    # environment
    (
        "LABBUILDER_STATE_DIR relative",
        env(["status"], LABBUILDER_STATE_DIR="state"),
        "LABBUILDER_STATE_DIR='state'",
    ),
    ("LABBUILDER_STATE_DIR blank", env(["plan"], LABBUILDER_STATE_DIR=" "), "LABBUILDER_STATE_DIR"),
    ("LABBUILDER_STATE_DIR a file", state_dir_is_a_file, "not a directory"),
    ("LABBUILDER_STATE_DIR world-writable", state_dir(0o777), "writable by group or others"),
    ("LABBUILDER_STATE_DIR group-writable", state_dir(0o770), "mode 0770"),
    (
        "LABBUILDER_STATE_DIR in a world-writable folder",
        state_dir(0o700, parent_mode=0o777),
        "which is writable",
    ),
    (
        "LABBUILDER_STATE_DIR of another user",
        state_dir(0o700, owner=65534),
        "belongs to user id 65534",
    ),
    ("LABBUILDER_STATE_DIR a symlink", symlinked_state_dir, "symbolic link"),
    (
        "LABBUILDER_POOL with a space and ;",
        env(["plan"], LABBUILDER_POOL="a b;rm"),
        "LABBUILDER_POOL=",
    ),
    (
        "LABBUILDER_POOL with a slash",
        env(["plan"], LABBUILDER_POOL="../pool"),
        "LABBUILDER_POOL='../pool'",
    ),
    (
        "LABBUILDER_POOL with a newline",
        env(["labs"], LABBUILDER_POOL="p\nx"),
        "LABBUILDER_POOL='p\\nx'",
    ),
    (
        "LABBUILDER_POOL_DIR relative",
        env(["plan"], LABBUILDER_POOL_DIR="pools"),
        "LABBUILDER_POOL_DIR",
    ),
    (
        "LABBUILDER_CACHE_DIR relative",
        env(["images", "list"], LABBUILDER_CACHE_DIR="cache"),
        "LABBUILDER_CACHE_DIR",
    ),
]


@pytest.mark.parametrize(("setup", "names"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_refused_with_exit_2_and_one_line(setup: Setup, names: str, tmp_path: Path) -> None:
    argv, variables = setup(tmp_path)
    assert_refused(labbuilder(argv, tmp_path, variables), names)
    assert not (tmp_path / "state").exists()  # refused before anything was made


def test_empty_lab_never_means_the_default_lab(tmp_path: Path) -> None:
    """`labbuilder down --lab "$UNSET"` must not take guide-3node down: it stops at the flag."""
    lines = assert_refused(labbuilder(["down", "--lab", ""], tmp_path), "--lab ''")
    assert "guide-3node" in lines[1]  # the hint says what leaving --lab out would mean


def test_the_hint_for_a_path_given_to_lab_is_the_file_option(tmp_path: Path) -> None:
    lines = assert_refused(labbuilder(["status", "--lab", "my-lab.toml"], tmp_path), "--lab")
    assert lines[1] == "hint: give a lab file with --file my-lab.toml"


def test_debug_shows_the_traceback_and_keeps_the_exit_code(tmp_path: Path) -> None:
    result = labbuilder(["--debug", "plan", "--lab", "../x"], tmp_path)
    assert result.returncode == 2
    assert "Traceback" in result.stderr and "UsageError" in result.stderr
    assert result.stderr.splitlines()[-2].startswith("error: --lab '../x'")


def test_markup_in_values_is_shown_literally_in_tables() -> None:
    """A value that looks like rich markup is printed as it is, and never breaks the output."""
    plan = api.plan_lab(api.load_lab(None, "guide-3node"), host_check=False).plan
    hostile = "[bold red]x[/] [/] [link=file:///etc/passwd]y"
    node = replace(plan.nodes[0], name=hostile, domain=hostile)
    network = replace(plan.networks[0], name="[/]", libvirt_name="[red]")
    shown = replace(plan, lab="[/]lab", nodes=(node, *plan.nodes[1:]),
                    networks=(network, *plan.networks[1:]))  # fmt: skip
    console = Console(width=400, record=True, markup=True)
    console.print(plan_tables(shown))
    text = console.export_text()
    assert hostile in text and "[/]lab" in text and "[red]" in text


def test_markup_in_any_table_cell_is_literal() -> None:
    """Every command's tables (labs, status, snapshots, recipes, images) use these cells."""
    from labbuilder.cli.common import add_plain_row, plain_table

    table = plain_table("[/] title [bold]", ("a", "b"))
    add_plain_row(table, "[/]", "[bold red]x")
    console = Console(width=200, record=True, markup=True)
    console.print(table)
    text = console.export_text()
    assert "[/] title [bold]" in text and "[bold red]x" in text


# --- planted links and loose permissions in the state directory ---------------------------------


def test_a_link_planted_at_a_temporary_name_is_never_written_through(tmp_path: Path) -> None:
    """The old predictable name (``secrets.json.tmp``) and any other: the file is made under a
    random name with O_EXCL | O_NOFOLLOW, so a planted link's target stays as it was."""
    folder = tmp_path / "lab"
    folder.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (folder / "secrets.json.tmp").symlink_to(victim)
    (folder / ".secrets.json.tmp").symlink_to(victim)
    write_secret_file(folder / "secrets.json", b'{"a": "b"}')
    assert victim.read_text() == "precious\n"
    assert (folder / "secrets.json").read_bytes() == b'{"a": "b"}'
    assert not (folder / "secrets.json").is_symlink()
    assert stat.S_IMODE((folder / "secrets.json").stat().st_mode) == 0o600
    leftovers = {p.name for p in folder.iterdir()} - {"secrets.json", "secrets.json.tmp",
                                                       ".secrets.json.tmp"}  # fmt: skip
    assert leftovers == set()


def test_a_link_planted_at_the_target_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "lab"
    folder.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (folder / "secrets.json").symlink_to(victim)
    with pytest.raises(UsageError, match="secrets.json is a symbolic link"):
        write_secret_file(folder / "secrets.json", b"{}")
    with pytest.raises(UsageError, match="secrets.json is a symbolic link"):
        load_secrets(lab_state("x", folder))
    assert victim.read_text() == "precious\n"
    assert (folder / "secrets.json").is_symlink()


def test_state_files_are_0600_and_new_folders_0700_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        write_state_file(tmp_path / "a" / "b" / "known_hosts", "x\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "a" / "b").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "a" / "b" / "known_hosts").stat().st_mode) == 0o600


def test_a_state_folder_others_can_write_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "lab"
    folder.mkdir()
    folder.chmod(0o777)
    with pytest.raises(UsageError, match="writable by group or others"):
        write_secret_file(folder / "secrets.json", b"{}")
    assert list(folder.iterdir()) == []


def test_install_refuses_a_linked_secrets_file_with_exit_2(tmp_path: Path) -> None:
    """Through the command line: a lab that is up, whose secrets.json someone replaced by a
    link to another file: `install` stops with exit 2 naming it, and the file is untouched."""
    lab = Lab(tmp_path, free_loopback())
    lab.write_up_state()
    secrets_file = lab.root / "state" / "labs" / lab.name / "secrets.json"
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    secrets_file.symlink_to(victim)
    result = subprocess.run(lab.install(), env=lab.env, capture_output=True, text=True,
                            timeout=60, check=False)  # fmt: skip
    assert_refused(result, f"{secrets_file} is a symbolic link")
    assert victim.read_text() == "precious\n"


def test_generated_passwords_are_safe_words_for_every_tool_of_the_guide(tmp_path: Path) -> None:
    """The lab's generated passwords go into shell words, SQL, URLs and configuration files,
    and `rabbitmqctl change_password openstack PASS` reads a leading '-' as an option: they are
    letters and digits only, kept in a 0600 file, and stay the same across runs."""
    state = LabState("lbtest-pw", tmp_path / "lab")
    names = tuple(f"PASS{i}" for i in range(400))
    made = ensure_secrets(state, names)
    assert all(re.fullmatch(r"[A-Za-z0-9]{20}", value) for value in made.values()), made
    assert len(set(made.values())) == len(names)
    assert stat.S_IMODE(state.secrets_path.stat().st_mode) == 0o600
    assert ensure_secrets(state, names) == made
