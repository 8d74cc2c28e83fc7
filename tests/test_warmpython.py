"""The fast path's warm Python (labbuilder/install/guest/warmpython.py), run for real on this host: a server
process that imported its modules once, callers that hand it code over a Unix socket, and the
fall-back to running the code in the caller.

The guests' server imports openstacksdk, which this host has not: here it imports standard
library modules that a plain ``python3`` does not load at start-up (WARMPYTHON_PRELOAD), and
lives in a temporary directory (WARMPYTHON_DIR). Every server a test starts is stopped at its end.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from labbuilder.install.guest import WARM_PYTHON_SOURCE

SCRIPT = WARM_PYTHON_SOURCE
PRELOAD = "xml.dom.minidom"  # not loaded by python3 -c, nor by warmpython.py itself


@pytest.fixture
def warm(tmp_path: Path) -> Iterator[dict[str, str]]:
    directory = tmp_path / "warm"
    env = {**os.environ, "WARMPYTHON_DIR": str(directory), "WARMPYTHON_PRELOAD": PRELOAD}
    yield env

    # Nothing of the test's stays running: no caller, no call's child. Servers are stopped; a
    # server that a concurrent first caller started may begin only now (it then takes the lock
    # and serves, as it would for the next call): it is stopped too.
    def stopped() -> bool:
        stop_server(directory)
        return not processes_of(directory)

    assert wait_for(stopped, 15), processes_of(directory)


def processes_of(directory: Path) -> list[int]:
    """The running processes of warmpython.py with this test's WARMPYTHON_DIR (killed here, so
    that a failing test leaves none behind)."""
    found = []
    marker = f"WARMPYTHON_DIR={directory}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker in environ and str(SCRIPT).encode() in cmdline and alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def server_pid(directory: Path) -> int | None:
    lock = directory / "warmpython.lock"
    text = lock.read_text().strip() if lock.exists() else ""
    pid = int(text) if text else None
    return pid if pid is not None and Path(f"/proc/{pid}").exists() else None


def stop_server(directory: Path) -> None:
    pid = server_pid(directory)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not alive(pid), 10)


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


def test_the_server_leaves_when_its_own_script_changes(
    warm: dict[str, str], tmp_path: Path
) -> None:
    """A new labbuilder puts a new script in place: the running server, still the old code,
    leaves, and the next call starts a server of the new script."""
    script = tmp_path / "warmpython.py"
    script.write_text(SCRIPT.read_text())
    env = {**warm, "WARMPYTHON_PRELOAD": PRELOAD}
    code = "import os; print(os.getppid())"

    def call() -> str:
        done = subprocess.run(
            [sys.executable, str(script), "-c", code],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    first = call()
    server = server_pid(Path(warm["WARMPYTHON_DIR"]))
    assert first == str(server)
    assert call() == str(server)  # unchanged: the same server
    script.write_text(SCRIPT.read_text() + "# a new version\n")
    os.utime(script, (time.time() + 10, time.time() + 10))
    call()  # run by the caller or by the old server's last call; the server then leaves
    assert wait_for(lambda: server_pid(Path(warm["WARMPYTHON_DIR"])) is None, 10)
    assert call() == str(server_pid(Path(warm["WARMPYTHON_DIR"]))) != str(server)


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


# --- faults: every call ends with its real exit status, or runs in the caller; nothing stays ---


def start_call(env: dict[str, str], code: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), "-c", code],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# The code prints its own process id, then waits for a file the test makes, then exits 7.
GATED = (
    "import os, pathlib, sys, time; print(os.getpid(), flush=True)\n"
    "gate = pathlib.Path(sys.argv[1])\n"
    "while not gate.exists(): time.sleep(0.05)\n"
    "print('done', flush=True); sys.exit(7)"
)


def gated_call(env: dict[str, str], gate: Path) -> tuple[subprocess.Popen[str], int]:
    caller = subprocess.Popen(
        [sys.executable, str(SCRIPT), "-c", GATED, str(gate)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert caller.stdout is not None
    return caller, int(caller.stdout.readline())


def test_a_server_killed_during_a_call_leaves_the_call_its_exit_status(
    warm: dict[str, str], tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    caller, code_pid = gated_call(warm, gate)
    server = server_pid(Path(warm["WARMPYTHON_DIR"]))
    assert server is not None and code_pid != server
    os.kill(server, signal.SIGKILL)
    assert wait_for(lambda: not alive(server), 10)
    gate.touch()
    out, err = caller.communicate(timeout=30)
    assert (caller.returncode, out) == (7, "done\n"), err
    assert wait_for(lambda: not alive(code_pid), 10)
    # The next call finds the killed server's socket, starts a new server and is served.
    again = run(warm, "-c", "import os; print(os.getppid())")
    assert again.returncode == 0, again.stderr
    assert int(again.stdout) == server_pid(Path(warm["WARMPYTHON_DIR"])) != server


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGKILL, 137), (signal.SIGSEGV, 139)])
def test_a_child_that_dies_gives_its_caller_the_status_a_shell_would(
    warm: dict[str, str], tmp_path: Path, sig: signal.Signals, status: int
) -> None:
    caller, code_pid = gated_call(warm, tmp_path / "gate")
    os.kill(code_pid, sig)
    out, err = caller.communicate(timeout=30)
    assert caller.returncode == status, (out, err)
    assert not alive(code_pid)
    server = server_pid(Path(warm["WARMPYTHON_DIR"]))
    assert server is not None  # the server stays, and serves the next call
    log = Path(warm["WARMPYTHON_DIR"]) / "warmpython.log"
    assert wait_for(lambda: f"call {code_pid} ended with exit {status}" in log.read_text(), 10)
    assert run(warm, "-c", "raise SystemExit(4)").returncode == 4


def test_a_call_longer_than_the_idle_time_keeps_its_server_until_it_ends(
    warm: dict[str, str], tmp_path: Path
) -> None:
    env = {**warm, "WARMPYTHON_IDLE": "1"}
    gate = tmp_path / "gate"
    caller, code_pid = gated_call(env, gate)
    server = server_pid(Path(warm["WARMPYTHON_DIR"]))
    assert server is not None
    time.sleep(3)  # three idle times
    assert alive(server) and alive(code_pid)
    gate.touch()
    out, err = caller.communicate(timeout=30)
    assert (caller.returncode, out) == (7, "done\n"), err
    assert wait_for(lambda: not alive(server), 10)  # idle with no call running: it leaves
    assert not (Path(warm["WARMPYTHON_DIR"]) / "warmpython.sock").exists()
    assert "idle for 1 s, exiting" in (Path(warm["WARMPYTHON_DIR"]) / "warmpython.log").read_text()


def test_concurrent_first_calls_all_end_with_their_own_status(warm: dict[str, str]) -> None:
    callers = [start_call(warm, f"import sys; print('call', {n}); sys.exit({n})") for n in range(6)]
    results = [(caller.communicate(timeout=120)[0], caller.returncode) for caller in callers]
    assert results == [(f"call {n}\n", n) for n in range(6)]
    log = (Path(warm["WARMPYTHON_DIR"]) / "warmpython.log").read_text()
    assert log.count("ready in") == 1, log


def test_a_server_that_does_not_take_the_call_in_time_leaves_it_to_the_caller_once(
    warm: dict[str, str], tmp_path: Path
) -> None:
    assert run(warm, "-c", "pass").returncode == 0  # a server runs
    server = server_pid(Path(warm["WARMPYTHON_DIR"]))
    assert server is not None
    ran = tmp_path / "ran"
    code = (
        f"import os; open({str(ran)!r}, 'a').write(str(os.getpid()) + chr(10)); raise SystemExit(9)"
    )
    os.kill(server, signal.SIGSTOP)  # as a server stuck in a paused guest, or starved
    try:
        late = run({**warm, "WARMPYTHON_READY_WAIT": "1"}, "-c", code)
    finally:
        os.kill(server, signal.SIGCONT)
    assert late.returncode == 9, late.stderr
    # The server takes the queued request now and forks a child; hearing no "go", the child
    # runs nothing: the code ran once, in the caller.
    log = Path(warm["WARMPYTHON_DIR"]) / "warmpython.log"
    assert wait_for(lambda: log.read_text().count("ended with exit 1 ") == 1, 10), log.read_text()
    assert len(ran.read_text().splitlines()) == 1
    assert run(warm, "-c", "raise SystemExit(5)").returncode == 5  # and it serves the next call


def test_the_server_reads_keystoneauths_plugins_once_for_all_its_calls(tmp_path: Path) -> None:
    """``warm_up`` (run by the server before it listens) leaves keystoneauth's plugins found,
    in memory that its forked calls share: a call's first connection then reads no entry
    points. Without it, the same lookup reads them (here: fails, as they are hidden)."""
    lookup = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("warmpython", {str(SCRIPT)!r})
warmpython = importlib.util.module_from_spec(spec)
spec.loader.exec_module(warmpython)
if sys.argv[1] == "warm":
    warmpython.warm_up()
from stevedore import _cache
def hidden(*args, **kwargs):
    raise RuntimeError("read the entry points")
_cache._hash_settings_for_path = hidden
from keystoneauth1 import loading
print(loading.get_plugin_loader("password").__class__.__name__)
"""
    env = {**os.environ, "HOME": str(tmp_path)}  # stevedore's file cache starts empty
    warm = subprocess.run(
        [sys.executable, "-c", lookup, "warm"],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )  # fmt: skip
    assert warm.returncode == 0 and warm.stdout.strip() == "Password", warm.stderr
    cold = subprocess.run(
        [sys.executable, "-c", lookup, "cold"],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )  # fmt: skip
    assert cold.returncode != 0 and "read the entry points" in cold.stderr, cold.stdout


def test_the_log_gives_each_call_the_status_its_caller_got(warm: dict[str, str]) -> None:
    """A call that ends is logged with its own status, not as stopped when its caller, told
    the status, goes away."""
    log = Path(warm["WARMPYTHON_DIR"]) / "warmpython.log"
    statuses = [0, 3, 0, 0, 5, 0]
    for status in statuses:
        assert run(warm, "-c", f"raise SystemExit({status})").returncode == status
    ended = lambda: re.findall(r"ended with exit (\d+) ", log.read_text())  # noqa: E731
    assert wait_for(lambda: len(ended()) == len(statuses), 10), log.read_text()
    assert [int(s) for s in ended()] == statuses, log.read_text()


def test_a_finished_calls_child_outlives_its_caller_leaving() -> None:
    """The child's watcher: its caller going away stops the child only while its code runs
    (``os._exit(143)``); once the code finished, the watcher just ends."""
    import socket
    import threading

    from labbuilder.install.guest import warmpython

    ours, callers = socket.socketpair()
    finished = threading.Event()
    finished.set()
    watcher = threading.Thread(target=warmpython.stop_when_caller_leaves, args=(ours, finished))
    watcher.start()
    callers.close()  # the caller, told the status, leaves
    watcher.join(10)
    assert not watcher.is_alive()  # and this process (pytest) is still here
    ours.close()
