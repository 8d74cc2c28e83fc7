"""The wheel ships the data folders and labbuilder finds them after a plain, non-editable
install; the README documents every lab file key and its test command is what CI runs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from labbuilder import labfile
from labbuilder.resources import DATA_FOLDERS

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(REPO)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    (built,) = out.glob("labbuilder-*.whl")
    return built


def test_the_wheel_holds_the_data_folders(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    for folder in DATA_FOLDERS:
        shipped = [n for n in names if n.startswith(f"labbuilder/_data/{folder}/")]
        on_disk = [p for p in (REPO / folder).rglob("*") if p.is_file()]
        assert len(shipped) == len(on_disk) > 0 or folder in ("networks", "cloud-init"), folder
    assert "labbuilder/py.typed" in names


def test_a_non_editable_install_finds_its_data(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    code = (
        "import json, labbuilder, labbuilder.resources as r; "
        "print(json.dumps([labbuilder.__file__, str(r.data_dir('labs'))]))"
    )
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    where = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    module, labs = json.loads(where.stdout)
    assert module.startswith(str(target)) and labs.startswith(str(target))
    listed = subprocess.run(
        [sys.executable, "-m", "labbuilder", "labs", "--json"],
        cwd=tmp_path, env=env, check=True, capture_output=True, text=True,
    )  # fmt: skip
    assert "guide-3node" in {lab["name"] for lab in json.loads(listed.stdout)}


def readme() -> str:
    return (REPO / "README.md").read_text()


def test_the_readme_documents_every_lab_file_key_and_no_other() -> None:
    documented = set(re.findall(r"^\| `([a-z_.<>]+)` \|", readme(), re.MULTILINE))
    expected = set(labfile.TOP_KEYS)
    expected |= {f"options.{key}" for key in labfile.OPTION_KEYS}
    expected |= {f"networks.<name>.{key}" for key in labfile.NETWORK_KEYS}
    expected |= {f"nodes.<name>.{key}" for key in labfile.NODE_KEYS}
    assert documented == expected


def test_ci_runs_the_readmes_test_command() -> None:
    match = re.search(r"Run the tests.*?```sh\n(.+?)\n```", readme(), re.DOTALL)
    assert match is not None
    command = match.group(1).strip()
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert ci[-1].strip() == command


def test_the_readme_example_lab_file_is_valid() -> None:
    match = re.search(r"```toml\n(.+?)\n```", readme(), re.DOTALL)
    assert match is not None
    lab = labfile.parse_lab(match.group(1), source="README example")
    assert [n.name for n in lab.nodes] == [
        "controller",
        "network",
        "compute1",
        "compute2",
        "block1",
    ]
