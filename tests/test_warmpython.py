"""The fast path's warm Python (labbuilder/warmpython.py), run for real on this host: a server
process that imported its modules once, callers that hand it code over a Unix socket, and the
fall-back to running the code in the caller.

The guests' server imports openstacksdk, which this host has not: here it imports standard
library modules that a plain ``python3`` does not load at start-up (WARMPYTHON_PRELOAD), and
lives in a temporary directory (WARMPYTHON_DIR). Every server a test starts is stopped at its end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "labbuilder" / "warmpython.py"
PRELOAD = "xml.dom.minidom"  # not loaded by python3 -c, nor by warmpython.py itself


@pytest.fixture
def warm(tmp_path: Path) -> Iterator[dict[str, str]]:
    directory = tmp_path / "warm"
    env = {**os.environ, "WARMPYTHON_DIR": str(directory), "WARMPYTHON_PRELOAD": PRELOAD}
    yield env
    stop_server(directory)


def server_pid(directory: Path) -> int | None:
    lock = directory / "warmpython.lock"
    text = lock.read_text().strip() if lock.exists() else ""
    pid = int(text) if text else None
    return pid if pid is not None and Path(f"/proc/{pid}").exists() else None


def stop_server(directory: Path) -> None:
    pid = server_pid(directory)
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not Path(f"/proc/{pid}").exists(), 10)


def wait_for(condition: object, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


def run(
    env: dict[str, str], *args: str, stdin: str = "", cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        env=env, input=stdin, capture_output=True, text=True, timeout=60, cwd=cwd, check=False,
    )  # fmt: skip


PROBE = (
    "import os, sys; "
    f"print({PRELOAD!r} in sys.modules, os.getppid(), sys.argv[1:], "
    "os.environ.get('OS_CLOUD_PROBE'), os.getcwd())"
)


def test_the_first_call_starts_a_server_that_later_calls_share(
    warm: dict[str, str], tmp_path: Path
) -> None:
    first = run({**warm, "OS_CLOUD_PROBE": "one"}, "-c", PROBE, "a", "b", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    server = server_pid(Path(warm["WARMPYTHON_DIR"]))
    assert server is not None
    # Run by a child of the server: the preloaded module is there, and the caller's arguments,
    # environment and working directory are the code's.
    assert first.stdout.split() == ["True", str(server), "['a',", "'b']", "one", str(tmp_path)]
    second = run({**warm, "OS_CLOUD_PROBE": "two"}, "-c", PROBE, cwd=tmp_path / "warm")
    assert second.stdout.split() == ["True", str(server), "[]", "two", warm["WARMPYTHON_DIR"]]
    cold = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, env=warm
    )
    assert cold.stdout.split()[0] == "False"  # what the server saves the caller


def test_code_on_stdin_and_in_a_file_with_exit_status_and_errors(
    warm: dict[str, str], tmp_path: Path
) -> None:
    piped = run(warm, "-", "x", stdin="import sys\nprint('piped', sys.argv)\nsys.exit(3)\n")
    assert (piped.returncode, piped.stdout) == (3, "piped ['-', 'x']\n")
    script = tmp_path / "tool.py"
    script.write_text("import sys\nprint(__file__, sys.argv[1:])\nraise SystemExit('bad input')\n")
    filed = run(warm, str(script), "--flag")
    assert filed.returncode == 1
    assert filed.stdout == f"{script} ['--flag']\n"
    assert filed.stderr == "bad input\n"
    failed = run(warm, "-c", "print('before'); 1/0")
    assert failed.returncode == 1
    assert failed.stdout == "before\n"
    assert "ZeroDivisionError: division by zero" in failed.stderr
    assert server_pid(Path(warm["WARMPYTHON_DIR"])) is not None  # all three ran in the server


def test_concurrent_first_calls_share_one_server(warm: dict[str, str]) -> None:
    callers = [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), "-c", "import os; print(os.getppid())"],
            env=warm,
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(4)
    ]
    parents = {caller.communicate(timeout=60)[0].strip() for caller in callers}
    assert parents == {str(server_pid(Path(warm["WARMPYTHON_DIR"])))}
    log = (Path(warm["WARMPYTHON_DIR"]) / "warmpython.log").read_text()
    assert log.count("ready in") == 1, log


def test_without_its_modules_the_server_does_not_stay_and_the_caller_runs_the_code(
    warm: dict[str, str],
) -> None:
    env = {**warm, "WARMPYTHON_PRELOAD": "labbuilder_no_such_module"}
    done = run(env, "-c", "import os; print('ran', os.getpid())")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ran ")
    assert server_pid(Path(warm["WARMPYTHON_DIR"])) is None
    assert (
        "cannot import labbuilder_no_such_module"
        in (Path(warm["WARMPYTHON_DIR"]) / "warmpython.log").read_text()
    )


def test_the_server_leaves_when_its_module_changes_on_disk(
    warm: dict[str, str], tmp_path: Path
) -> None:
    modules = tmp_path / "modules"
    modules.mkdir()
    module = modules / "lbwarmprobe.py"
    module.write_text("VERSION = 1\n")
    env = {**warm, "WARMPYTHON_PRELOAD": "lbwarmprobe", "PYTHONPATH": str(modules)}
    code = "import os, lbwarmprobe; print(lbwarmprobe.VERSION, os.getppid())"
    first = run(env, "-c", code)
    server = server_pid(Path(warm["WARMPYTHON_DIR"]))
    assert first.stdout.split() == ["1", str(server)]
    module.write_text("VERSION = 2\n")
    os.utime(module, (time.time() + 10, time.time() + 10))
    changed = run(env, "-c", code)
    assert changed.returncode == 0, changed.stderr
    assert changed.stdout.split()[0] == "2"  # the caller ran it with the new module
    assert wait_for(lambda: server_pid(Path(warm["WARMPYTHON_DIR"])) is None, 10)
    third = run(env, "-c", code)  # a new server, with the new module
    assert third.stdout.split() == ["2", str(server_pid(Path(warm["WARMPYTHON_DIR"])))]


def test_a_caller_that_goes_away_stops_its_code(warm: dict[str, str]) -> None:
    caller = subprocess.Popen(
        [sys.executable, str(SCRIPT), "-c", "import os, time; print(os.getpid(), flush=True); time.sleep(120)"],
        env=warm, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert caller.stdout is not None
    child = int(caller.stdout.readline())
    assert Path(f"/proc/{child}").exists()
    caller.kill()  # as a check's timeout ends its SSH command
    caller.wait()
    assert wait_for(lambda: not Path(f"/proc/{child}").exists(), 10)
    assert server_pid(Path(warm["WARMPYTHON_DIR"])) is not None  # the server itself stays
