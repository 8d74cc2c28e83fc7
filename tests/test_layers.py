"""The architecture is checked, not only described (README, "Development"): the package layers
and the guests' code's independence (import-linter's contracts in pyproject.toml), no import
cycle between modules, and the outside systems reached only through ``labbuilder.adapters``."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "labbuilder"
# Only adapters may import these: libvirt, SSH and starting processes are side effects.
ADAPTED = {"libvirt", "paramiko", "subprocess", "pyroute2"}
# Code that runs inside the lab's nodes, shipped there as files: not labbuilder's own process.
GUEST_CODE = PACKAGE / "install" / "guest"


def test_the_import_contracts_hold() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run(
        [str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout and "Contracts: 2 kept" in result.stdout, result.stdout


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_no_module_imports_itself_through_others() -> None:
    # Imports inside functions count too: a lazy import that cuts a cycle is still a cycle.
    graph = grimp.build_graph("labbuilder")
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle(tmp_path: Path, monkeypatch: object) -> None:
    # The check above must be able to fail: two modules that import each other are found.
    package = tmp_path / "lbcycle"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f() -> None:\n    from lbcycle import b\n")
    (package / "b.py").write_text("from lbcycle import a\n")
    (package / "c.py").write_text("from lbcycle import a\n")
    sys.path.insert(0, str(tmp_path))
    try:
        assert _cycles(grimp.build_graph("lbcycle")) == [["lbcycle.a", "lbcycle.b"]]
    finally:
        sys.path.remove(str(tmp_path))


def _outside_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & ADAPTED


def test_only_adapters_reach_libvirt_ssh_and_processes() -> None:
    offenders = {
        str(path.relative_to(REPO)): sorted(found)
        for path in sorted(PACKAGE.rglob("*.py"))
        if PACKAGE / "adapters" not in path.parents and GUEST_CODE not in path.parents
        for found in [_outside_imports(path)]
        if found
    }
    assert offenders == {}
