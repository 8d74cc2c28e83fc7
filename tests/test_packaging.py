"""The wheel ships the data folders and labbuilder finds them after a plain, non-editable
install; every third-party module the host side imports is a declared dependency, and the wheel
works in a fresh virtual environment with those alone; the README documents every lab file key
and its test command is what CI runs."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import time
import tomllib
import zipfile
from pathlib import Path

import pytest

from labbuilder.common.resources import DATA_FOLDERS
from labbuilder.lab import files as labfile

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "labbuilder"
# Modules that run in the guests (put there as text by the engine), not on the host: what they
# import is the guest's business (openstacksdk in an OpenStack controller), not a dependency.
GUEST_MODULES = {
    "labbuilder.install.guest.guestapi",
    "labbuilder.install.guest.warmpython",
    "labbuilder.install.guest.cloudfacts",
}
GUEST_IMPORTS = {"openstack", "keystoneauth1"}  # openstacksdk and its keystoneauth1


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_top_modules(path: Path) -> set[str]:
    """Every absolute import in a module, at any depth (in functions too), by top name."""
    found = set()
    for node in ast.walk(ast.parse(path.read_bytes(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def declared_distributions() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = [re.split(r"[\s<>=!~;\[]", dep, maxsplit=1)[0] for dep in project["dependencies"]]
    return {name.lower().replace("_", "-") for name in names}


def test_every_third_party_module_the_host_imports_is_a_declared_dependency() -> None:
    providers = importlib.metadata.packages_distributions()
    declared = declared_distributions()
    missing = {}
    host_modules = 0
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        third_party = {
            top
            for top in imported_top_modules(path)
            if top not in sys.stdlib_module_names and top != "labbuilder"
        }
        if name in GUEST_MODULES:
            assert third_party <= GUEST_IMPORTS, f"{name} (runs in the guest) imports {third_party}"
            continue
        host_modules += 1
        for top in third_party:
            dists = {d.lower().replace("_", "-") for d in providers.get(top, [])}
            if not dists & declared:
                missing[f"{name}: {top}"] = sorted(dists) or ["(not installed)"]
    assert host_modules > 50
    assert missing == {}, "imported but not declared in pyproject.toml: " + str(missing)


def test_no_host_module_imports_a_guest_module() -> None:
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_bytes(), str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            assert not set(names) & GUEST_MODULES, f"{path} imports a guest module"


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
    templates = (PACKAGE / "libvirtxml" / "templates").glob("*.j2")
    assert {f"labbuilder/libvirtxml/templates/{t.name}" for t in templates} <= set(names)


def test_a_non_editable_install_finds_its_data(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    code = (
        "import json, labbuilder, labbuilder.common.resources as r; "
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


@pytest.mark.slow
def test_the_wheel_works_in_a_fresh_venv_with_its_declared_dependencies_only(
    wheel: Path, tmp_path: Path
) -> None:
    """A fresh venv (no system site-packages), the wheel and what it declares, installed by pip
    (built wheels come from pip's cache after the first time); then every host-side module of
    the installed package is imported there, and the console script runs."""
    started = time.monotonic()
    venv = tmp_path / "lbtest-cli-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    python = venv / "bin" / "python"
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root")}
    installed = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)],
        capture_output=True, text=True, env=env, cwd=tmp_path, check=False, timeout=600,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr[-3000:]
    code = f"""
import importlib, json, pkgutil, labbuilder
guest = {sorted(GUEST_MODULES)!r}
names = sorted(m.name for m in pkgutil.walk_packages(labbuilder.__path__, "labbuilder."))
failed = {{}}
for name in names:
    if name in guest or name == "labbuilder.__main__":  # __main__ runs the command line
        continue
    try:
        importlib.import_module(name)
    except Exception as err:
        failed[name] = repr(err)
print(json.dumps({{"file": labbuilder.__file__, "names": names, "failed": failed}}))
"""
    result = subprocess.run(
        [str(python), "-I", "-c", code],
        capture_output=True, text=True, env=env, cwd=tmp_path, check=False, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["file"].startswith(str(venv)), data["file"]  # the wheel, not the repository
    assert data["failed"] == {}
    assert set(GUEST_MODULES) <= set(data["names"])  # shipped, to be put in the guests
    assert len(data["names"]) > 50
    version = subprocess.run(
        [str(venv / "bin" / "labbuilder"), "--version"],
        capture_output=True, text=True, env=env, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert version.returncode == 0 and version.stdout.startswith("labbuilder "), version.stderr
    assert time.monotonic() - started < 300
