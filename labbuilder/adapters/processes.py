"""Local processes: the one runner every program labbuilder starts on the host goes through
(``run``), the CPU priority of the processes a block starts (``yielding``), and whether a
process exists (``process_alive``).

``run`` takes an argv list, never a shell string. Each command, its output and a non-zero exit
code go to the ``labbuilder.tools`` logger at DEBUG level, which a command sends to the lab's
log file; nothing reaches the terminal. The process's standard input is what ``input`` gives
(else nothing: no tool reads the terminal), and it is logged only when the caller says it holds
no secret (``log_input``); output that is a secret is kept out of the log with ``log_output``.
The environment is labbuilder's own with ``LC_ALL=C.UTF-8`` (tools' messages are parsed and
quoted, so they are in one language) and the caller's ``env`` over it; its values are not
logged. Output is decoded as UTF-8, undecodable bytes replaced.

Failures are typed (``ProcessError`` and its subclasses, which are ``HostError``\\ s so that
one no caller translates still reads well); callers translate them into their own errors and
messages.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import shlex
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from labbuilder.common.errors import HostError

TOOLS_LOGGER = "labbuilder.tools"
# The CPU priority (nice value) of the processes started in a ``yielding`` block.
YIELDING_NICENESS = 10
LOCALE = {"LC_ALL": "C.UTF-8"}

Argv = Sequence[str | os.PathLike[str]]

_niceness: ContextVar[int] = ContextVar("labbuilder_process_niceness", default=0)
_tools = logging.getLogger(TOOLS_LOGGER)


@dataclass(frozen=True)
class ProcessResult:
    """A process that ran to its end: the argv it ran with (``nice`` included when it was
    prefixed), its exit code, its standard output (with its standard error when the two were
    merged) and its standard error ("" when merged)."""

    argv: tuple[str, ...]
    returncode: int
    output: str
    errors: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def last_lines(self, count: int) -> list[str]:
        """The last ``count`` lines of ``output``, without their line ends."""
        lines = self.output.split("\n")
        if lines[-1] == "":
            lines.pop()
        return lines[-count:] if count > 0 else []


class ProcessError(HostError):
    """A process could not be started, did not finish in time, or failed. ``argv`` is the
    command as it was asked for (without a ``nice`` prefix); ``program`` is the program at
    fault (``argv[0]``, or ``nice`` when that is missing)."""

    def __init__(
        self, message: str, argv: Sequence[str], hint: str | None, program: str | None = None
    ) -> None:
        super().__init__(message, hint)
        self.argv = tuple(argv)
        self.program = program or self.argv[0]


class ProgramMissing(ProcessError):
    """The program is not installed (not found on ``PATH``, or its path does not exist)."""

    def __init__(self, argv: Sequence[str], program: str | None = None) -> None:
        program = program or argv[0]
        super().__init__(
            f"{program} is not installed on this host",
            argv,
            f"install the package that ships {program}",
            program,
        )


class ProgramNotStarted(ProcessError):
    """The program exists but could not be started (permissions, a bad interpreter, ...);
    ``reason`` is the system's word for why."""

    def __init__(self, argv: Sequence[str], reason: str, program: str | None = None) -> None:
        program = program or argv[0]
        super().__init__(
            f"cannot run {program}: {reason}",
            argv,
            f"check the installation of {program}",
            program,
        )
        self.reason = reason


class ProcessTimedOut(ProcessError):
    """The process ran longer than ``timeout`` seconds and was killed; ``result`` holds what
    it wrote until then (its return code is the kill's)."""

    def __init__(self, argv: Sequence[str], timeout: float, result: ProcessResult) -> None:
        super().__init__(
            f"{shlex.join(argv)} did not finish within {timeout:.0f} seconds",
            argv,
            "run the command again",
        )
        self.timeout = timeout
        self.result = result


class ProcessFailed(ProcessError):
    """The process exited with a non-zero code (``result.returncode``). The message names
    the command and the code only: its output (``result``) may be a secret."""

    def __init__(self, argv: Sequence[str], result: ProcessResult) -> None:
        super().__init__(
            f"{shlex.join(argv)} failed with exit code {result.returncode}",
            argv,
            "the lab's log file has its output",
        )
        self.result = result


@contextmanager
def yielding(niceness: int = YIELDING_NICENESS) -> Iterator[None]:
    """Within it, the processes ``run`` starts in this thread or task (and their children:
    mmdebstrap's apt and dpkg) run at CPU priority ``niceness``, through ``nice -n``: where
    image builds share too few cores, the one the lab waits for longest gets the CPU first and
    the others use what it leaves. Other threads' processes are not affected."""
    token = _niceness.set(niceness)
    try:
        yield
    finally:
        _niceness.reset(token)


def run(
    argv: Argv,
    *,
    env: Mapping[str, str] | None = None,
    input: str | None = None,
    timeout: float | None = None,
    stream: bool = False,
    merge_stderr: bool = False,
    check: bool = True,
    log_input: bool = False,
    log_output: bool = True,
    cwd: Path | None = None,
    on_line: Callable[[str], None] | None = None,
    group: bool = False,
) -> ProcessResult:
    """Run ``argv`` (an argv list, never a shell) to its end and return its result.

    ``env`` adds variables to the environment; ``input`` is written to the process's standard
    input (else it reads nothing). ``timeout`` (seconds) kills a process that runs longer.
    With ``stream``, each line of output is logged as it arrives (long-running tools), else
    all of it once the process ends. ``merge_stderr`` sends standard error into ``output``,
    in order. ``log_input`` logs ``input`` (never for a secret); ``log_output=False`` keeps
    the output out of the log (a secret the process prints). ``cwd`` is the folder the process
    starts in; ``on_line`` (with ``stream``) is given each line of output as it arrives.
    With ``group`` the process leads a process group of its own (a runner and its workers):
    a timeout kills the whole group, Ctrl-C (or any error here) stops it (SIGINT, then SIGKILL
    after ``GROUP_GRACE`` seconds), so that no worker outlives the run.

    Raises ``ProgramMissing``, ``ProgramNotStarted``, ``ProcessTimedOut``, and with ``check``
    ``ProcessFailed`` for a non-zero exit code.
    """
    asked = [os.fspath(arg) for arg in argv]
    if not asked:
        raise ValueError("run needs a program to run")
    environment = {**os.environ, **LOCALE, **(env or {})}
    args = list(asked)
    niceness = _niceness.get()
    if niceness:
        # `nice` would report a missing program only as its own failure (exit 127).
        if shutil.which(asked[0], path=environment.get("PATH", os.defpath)) is None:
            raise ProgramMissing(asked)
        args = ["nice", "-n", str(niceness), *asked]
    _tools.debug("$ %s", shlex.join(args))
    if input is not None and log_input:
        _tools.debug("standard input of %s:\n%s", asked[0], input.rstrip("\n"))
    try:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL if input is None else subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
            env=environment,
            encoding="utf-8",
            errors="replace",
            cwd=cwd,
            start_new_session=group,
        )
    except FileNotFoundError:
        raise ProgramMissing(asked, args[0]) from None
    except OSError as exc:
        raise ProgramNotStarted(asked, exc.strerror or str(exc), args[0]) from exc
    killed = threading.Event()
    with proc:
        try:
            if stream:
                output, errors = _stream(proc, input, timeout, killed, log_output, on_line, group)
            else:
                output, errors = _collect(proc, input, timeout, killed, group)
        except KeyboardInterrupt:
            if group:  # a group of its own got no SIGINT from the terminal
                _stop_group(proc)
            raise  # the process got the same SIGINT; Popen's exit gives it a moment to end
        except BaseException:
            if group:
                _stop_group(proc)
            proc.kill()
            raise
    returncode = proc.wait()
    result = ProcessResult(tuple(args), returncode, output, errors)
    if log_output and not stream:
        for text in (output, errors):
            if text:
                _tools.debug("%s", text.rstrip("\n"))
    if killed.is_set():
        _tools.debug("%s killed after %s seconds", asked[0], timeout)
        raise ProcessTimedOut(asked, timeout or 0.0, result)
    if returncode != 0:
        _tools.debug("%s exited with code %d", asked[0], returncode)
        if check:
            raise ProcessFailed(asked, result)
    return result


def _collect(
    proc: subprocess.Popen[str],
    text: str | None,
    timeout: float | None,
    killed: threading.Event,
    group: bool = False,
) -> tuple[str, str]:
    """All of the process's output once it ends (or is killed at ``timeout``)."""
    try:
        output, errors = proc.communicate(text, timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(proc, killed, group)
        output, errors = proc.communicate()
    return output or "", errors or ""


def _stream(
    proc: subprocess.Popen[str],
    text: str | None,
    timeout: float | None,
    killed: threading.Event,
    log_output: bool,
    on_line: Callable[[str], None] | None = None,
    group: bool = False,
) -> tuple[str, str]:
    """The process's output, each line logged as it arrives; standard error and standard
    input are served by threads, and a timer kills the process at ``timeout``."""
    assert proc.stdout is not None
    helpers: list[threading.Thread] = []
    errors: list[str] = []
    if proc.stdin is not None and text is not None:
        helpers.append(threading.Thread(target=_feed, args=(proc.stdin, text), daemon=True))
    if proc.stderr is not None:
        helpers.append(
            threading.Thread(target=_read, args=(proc.stderr, errors, log_output), daemon=True)
        )
    timer = None
    if timeout is not None:
        timer = threading.Timer(timeout, _kill, args=(proc, killed, group))
        timer.daemon = True
        timer.start()
    try:
        for helper in helpers:
            helper.start()
        lines: list[str] = []
        _read(proc.stdout, lines, log_output, on_line)
        for helper in helpers:
            helper.join()
        proc.wait()
    finally:
        if timer is not None:
            timer.cancel()
    return "".join(lines), "".join(errors)


def _feed(pipe: IO[str], text: str) -> None:
    # The process may end without reading it all.
    with contextlib.suppress(BrokenPipeError):
        try:
            pipe.write(text)
        finally:
            pipe.close()


def _read(
    pipe: IO[str], lines: list[str], log: bool, on_line: Callable[[str], None] | None = None
) -> None:
    for line in pipe:
        lines.append(line)
        if log:
            _tools.debug("%s", line.rstrip("\n"))
        if on_line is not None:
            on_line(line.rstrip("\n"))


def _kill(proc: subprocess.Popen[str], killed: threading.Event, group: bool = False) -> None:
    if proc.poll() is None:
        killed.set()
        if group:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.kill()


GROUP_GRACE = 15.0  # seconds a process group has to end after SIGINT


def _stop_group(proc: subprocess.Popen[str]) -> None:
    """SIGINT to the process's group, then SIGKILL to what is left of it after ``GROUP_GRACE``
    seconds (the leader is waited for; its workers may outlive it briefly)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(GROUP_GRACE)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (it may belong to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- daemons ----------------------------------------------------------------------------------
# A daemon outlives the command that starts it (an isolated lab's uplink lives as long as the
# lab). It is found again by its argv, not by a pid file that a killed `up` may not have written.


def start_daemon(
    argv: Callable[[int], Argv],
    log: Path,
    *,
    ready_timeout: float = 20.0,
    ready: Callable[[], bool] | None = None,
) -> int:
    """Start a daemon in a session of its own, its output appended to ``log``, and wait until
    it says it is ready: ``argv(fd)`` gives its command line with ``fd``, the write end of a
    pipe, on which it writes once ready (slirp4netns's ``--ready-fd``); or, for a daemon that
    cannot say so, until ``ready()`` is true (polled). Returns its pid.

    Raises ``ProgramMissing``, or ``ProgramNotStarted`` (with the log's last lines) when it
    ends or stays silent before it is ready; a daemon that did not get ready is killed.
    """
    read_fd, write_fd = os.pipe()
    command = [os.fspath(part) for part in argv(write_fd)]
    log.parent.mkdir(parents=True, exist_ok=True)
    try:
        with log.open("ab") as out:
            try:
                proc = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    pass_fds=(write_fd,),
                    start_new_session=True,
                    env={**os.environ, **LOCALE},
                )
            except FileNotFoundError:
                raise ProgramMissing(command) from None
    finally:
        os.close(write_fd)
    _tools.debug("started %s (pid %d)", shlex.join(command), proc.pid)
    try:
        if ready is None:
            readable, _, _ = select.select([read_fd], [], [], ready_timeout)
            said = os.read(read_fd, 1) if readable else b""
        else:
            said = _poll_ready(proc, ready, ready_timeout)
    finally:
        os.close(read_fd)
    if said:
        return proc.pid
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    tail = log.read_text(errors="replace").strip().splitlines()[-3:]
    raise ProgramNotStarted(
        command,
        f"it did not get ready (exit code {proc.returncode}): "
        + ("; ".join(tail) or "no output")
        + f" (log: {log})",
    )


def _poll_ready(proc: subprocess.Popen[bytes], ready: Callable[[], bool], timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if ready():
            return b"1"
        time.sleep(0.05)
    return b""


def daemons(match: Callable[[list[str]], bool]) -> list[int]:
    """The pids of the running processes whose argv ``match`` accepts (read from /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        argv = [part.decode(errors="replace") for part in raw.rstrip(b"\0").split(b"\0")]
        if raw and match(argv):
            pids.append(int(entry.name))
    return pids


def stop(pid: int, *, grace: float = 5.0) -> None:
    """TERM ``pid``, then KILL it if it still runs after ``grace`` seconds; gone is fine."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if not _running(pid):
                return
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)


def _running(pid: int) -> bool:
    """Alive and not a zombie (a daemon we started and did not wait for becomes one)."""
    try:
        stat = Path("/proc", str(pid), "stat").read_text()
    except OSError:
        return False
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
    return stat.rsplit(")", 1)[-1].split()[0] != "Z" and process_alive(pid)
