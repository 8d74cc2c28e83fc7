"""Tempest, as Debian packages it, run on this host against a lab (``labbuilder verify``).

Tempest runs natively (a lab's guests are emulated: its Python would be ten times slower in
them), where the lab's nodes are: in an isolated lab's gateway namespace, else from the host,
which has an address on the lab's management network; with the lab's names in its own
``/etc/hosts`` (``adapters.nsexec``), since the cloud's catalog names ``controller``.

May import: ``common``, ``adapters.processes``.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from labbuilder.adapters import processes
from labbuilder.common.errors import HostError

TEMPEST = "tempest"  # Debian's /usr/bin/tempest
STESTR = "stestr"  # its test runner (Debian's python3-stestr)
SYSTEM_PYTHON = "/usr/bin/python3"  # the Python Debian's tempest is installed for


def installed_version() -> str | None:
    """The version of the Tempest on this host's PATH, None when there is none."""
    if shutil.which(TEMPEST) is None:
        return None
    result = processes.run(
        [SYSTEM_PYTHON, "-c", "import importlib.metadata as m; print(m.version('tempest'))"],
        check=False,
    )
    return result.output.strip() or None if result.returncode == 0 else None


def tempest_run(
    workspace: Path, regexes: list[str], hosts: Path, namespace: str | None
) -> list[str]:
    """``tempest run`` with the workspace's configuration and the tests ``regexes`` select,
    started through ``nsexec`` (the lab's names; its gateway namespace when given)."""
    argv = [
        sys.executable, "-m", "labbuilder.adapters.nsexec", "--hosts", str(hosts),
        *(["--netns", namespace] if namespace else []),
        "--", TEMPEST, "run", "--config-file", str(workspace / "etc" / "tempest.conf"),
    ]  # fmt: skip
    return argv + (["--regex", " ".join(regexes)] if regexes else [])


def run(
    workspace: Path,
    *,
    regexes: list[str],
    exclude_list: Path | None,
    concurrency: int,
    namespace: str | None,
    hosts: Path,
    on_line: Callable[[str], None] | None = None,
    timeout: float | None = None,
) -> int:
    """``tempest run`` in ``workspace`` (which holds ``etc/tempest.conf``), its progress lines
    given to ``on_line``; the subunit stream is left in ``workspace/.stestr``. Its exit code
    (1 when a test failed)."""
    argv = tempest_run(workspace, regexes, hosts, namespace) + ["--concurrency", str(concurrency)]
    if exclude_list is not None:
        argv += ["--exclude-list", str(exclude_list)]
    try:
        result = processes.run(
            argv,
            cwd=workspace,
            stream=True,
            merge_stderr=True,
            check=False,
            timeout=timeout,
            on_line=on_line,
            env={"PYTHON": SYSTEM_PYTHON},
            group=True,  # Tempest and its workers: none outlives a timeout or Ctrl-C
        )
    except processes.ProcessTimedOut as err:
        raise HostError(
            f"Tempest did not finish in {timeout:.0f} s",
            "give it longer (--timeout) or a smaller suite (--suite)",
        ) from err
    return result.returncode


def init(workspace: Path) -> None:
    """Make ``workspace`` a test repository (``stestr init``: where runs are kept)."""
    if not (workspace / ".stestr").is_dir():
        processes.run([STESTR, "init"], cwd=workspace, env={"PYTHON": SYSTEM_PYTHON})


def list_tests(workspace: Path, regexes: list[str], hosts: Path) -> list[str]:
    """The ids of the tests ``regexes`` select (``tempest run --list-tests``), nothing run."""
    argv = tempest_run(workspace, regexes, hosts, None) + ["--list-tests"]
    result = processes.run(argv, cwd=workspace, env={"PYTHON": SYSTEM_PYTHON}, log_output=False)
    return [line.strip() for line in result.output.splitlines() if line.startswith("tempest.")]


def last_stream(workspace: Path) -> bytes:
    """The subunit v2 stream of the last run in ``workspace`` (stestr's repository), b"" if
    none was written."""
    repository = workspace / ".stestr"
    runs = [p for p in repository.iterdir() if p.name.isdigit()] if repository.is_dir() else []
    if not runs:
        return b""
    return max(runs, key=lambda p: int(p.name)).read_bytes()
