"""The process runner (``labbuilder.adapters.processes.run``), with real processes: what it
returns, its typed errors, its timeout, environment and standard input, the CPU priority of a
``yielding`` block, and what it logs (and keeps out of the log)."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import pytest

from labbuilder.adapters import processes
from labbuilder.adapters.processes import (
    ProcessFailed,
    ProcessResult,
    ProcessTimedOut,
    ProgramMissing,
    ProgramNotStarted,
    run,
    yielding,
)
from labbuilder.common.errors import HostError
from labbuilder.lifecycle.state import password_hash

TOOLS = "labbuilder.tools"


def tool_messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == TOOLS]


# --- results ---------------------------------------------------------------------------------


def test_a_finished_process_gives_its_argv_exit_code_and_output() -> None:
    result = run(["sh", "-c", "echo out; echo err >&2"])
    assert isinstance(result, ProcessResult)
    assert result == ProcessResult(("sh", "-c", "echo out; echo err >&2"), 0, "out\n", "err\n")
    assert result.ok
    with pytest.raises(AttributeError):
        result.returncode = 1  # type: ignore[misc]


def test_merged_standard_error_comes_in_order_in_the_output() -> None:
    result = run(["sh", "-c", "echo one; echo two >&2; echo three"], merge_stderr=True)
    assert result.output == "one\ntwo\nthree\n"
    assert result.errors == ""


def test_arguments_reach_the_program_literally_never_through_a_shell(tmp_path: Path) -> None:
    tricky = "a; echo b $(id) `id` > x 'q' \"d\" *"
    assert run(["printf", "%s", tricky]).output == tricky
    assert run(["printf", "%s", tmp_path]).output == str(tmp_path)  # paths are arguments too
    assert list(tmp_path.iterdir()) == []


def test_output_that_is_not_utf8_is_replaced_not_fatal() -> None:
    assert run(["printf", "a\\377b"]).output == "a\ufffdb"


def test_last_lines_are_the_output_s_last_lines() -> None:
    result = run(["sh", "-c", "for i in 1 2 3 4 5; do echo line$i; done; printf 'x\\n\\n'"])
    assert result.last_lines(3) == ["line5", "x", ""]
    assert result.last_lines(100)[0] == "line1"
    assert ProcessResult(("true",), 0, "").last_lines(5) == []
    assert ProcessResult(("true",), 0, "no end").last_lines(5) == ["no end"]


# --- errors ----------------------------------------------------------------------------------


def test_a_failure_raises_process_failed_with_its_result() -> None:
    with pytest.raises(ProcessFailed) as failed:
        run(["sh", "-c", "echo partial; echo why >&2; exit 3"])
    assert failed.value.result.returncode == 3
    assert failed.value.result.output == "partial\n"
    assert failed.value.result.errors == "why\n"
    assert failed.value.argv == ("sh", "-c", "echo partial; echo why >&2; exit 3")
    # Its message names the command and the code only: the output may be a secret.
    assert failed.value.message == (
        "sh -c 'echo partial; echo why >&2; exit 3' failed with exit code 3"
    )
    assert isinstance(failed.value, HostError)


def test_without_check_a_failure_is_a_result() -> None:
    result = run(["sh", "-c", "exit 4"], check=False)
    assert result.returncode == 4 and not result.ok


def test_a_missing_program_is_program_missing(tmp_path: Path) -> None:
    with pytest.raises(ProgramMissing) as missing:
        run(["lbtest-no-such-program", "--help"])
    assert missing.value.program == "lbtest-no-such-program"
    assert missing.value.message == "lbtest-no-such-program is not installed on this host"
    with pytest.raises(ProgramMissing):
        run([tmp_path / "absent"])


def test_a_missing_program_is_program_missing_at_a_lower_priority_too() -> None:
    # Under `nice`, the program would otherwise be nice's failure (exit 127).
    with yielding(), pytest.raises(ProgramMissing) as missing:
        run(["lbtest-no-such-program"])
    assert missing.value.program == "lbtest-no-such-program"
    assert missing.value.argv == ("lbtest-no-such-program",)


def test_a_program_found_only_on_the_given_path_runs(tmp_path: Path) -> None:
    tool = tmp_path / "lbtest-tool"
    tool.write_text("#!/bin/sh\necho from the tool\n")
    tool.chmod(0o755)
    path = f"{tmp_path}:{os.environ.get('PATH', os.defpath)}"
    assert run(["lbtest-tool"], env={"PATH": path}).output == "from the tool\n"
    with yielding():
        assert run(["lbtest-tool"], env={"PATH": path}).output == "from the tool\n"


def test_a_program_that_cannot_be_started_is_program_not_started(tmp_path: Path) -> None:
    script = tmp_path / "not-executable"
    script.write_text("#!/bin/sh\necho never\n")
    script.chmod(0o644)
    if os.geteuid() == 0 and os.access(script, os.X_OK):
        pytest.skip("root may execute any file here")
    with pytest.raises(ProgramNotStarted) as refused:
        run([script])
    assert refused.value.reason == "Permission denied"
    assert refused.value.message == f"cannot run {script}: Permission denied"


def test_a_process_running_past_its_timeout_is_killed() -> None:
    started = time.monotonic()
    with pytest.raises(ProcessTimedOut) as late:
        run(["sh", "-c", "echo started; exec sleep 30"], timeout=0.5)
    assert time.monotonic() - started < 10
    assert late.value.timeout == 0.5
    assert late.value.result.output == "started\n"  # what it wrote before
    assert late.value.result.returncode < 0  # killed by a signal
    assert (
        late.value.message == "sh -c 'echo started; exec sleep 30' did not finish within 0 seconds"
    )


def test_a_streamed_process_running_past_its_timeout_is_killed() -> None:
    started = time.monotonic()
    with pytest.raises(ProcessTimedOut) as late:
        run(["sh", "-c", "echo started; exec sleep 30"], timeout=0.5, stream=True)
    assert time.monotonic() - started < 10
    assert late.value.result.output == "started\n"


def test_a_process_group_past_its_timeout_is_killed_workers_and_all(tmp_path: Path) -> None:
    """A runner and its workers (``group``): the timeout ends every one of them, and lines
    reach ``on_line`` as they come, in the folder given."""
    lines: list[str] = []
    started = time.monotonic()
    with pytest.raises(ProcessTimedOut):
        run(
            ["sh", "-c", "sleep 60 & echo $! > worker; pwd; wait"],
            timeout=1, stream=True, group=True, cwd=tmp_path, on_line=lines.append,
        )  # fmt: skip
    assert time.monotonic() - started < 10  # the worker held the output open: killed too
    assert lines == [str(tmp_path)]
    worker = int((tmp_path / "worker").read_text())
    time.sleep(0.2)
    assert (
        not Path(f"/proc/{worker}").exists()
        or "Z" in Path(f"/proc/{worker}/stat").read_text().split()[2]
    )


def test_a_process_within_its_timeout_finishes_normally() -> None:
    assert run(["sh", "-c", "sleep 0.1; echo done"], timeout=30).output == "done\n"
    assert run(["sh", "-c", "sleep 0.1; echo done"], timeout=30, stream=True).output == "done\n"


# --- environment and standard input ----------------------------------------------------------


def test_env_adds_to_the_inherited_environment_in_a_fixed_language(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LBTEST_INHERITED", "kept")
    monkeypatch.setenv("LC_ALL", "de_DE.UTF-8")
    script = 'echo "$LBTEST_INHERITED $LBTEST_ADDED $LC_ALL"'
    assert run(["sh", "-c", script], env={"LBTEST_ADDED": "added"}).output == (
        "kept added C.UTF-8\n"
    )
    assert run(["sh", "-c", script], env={"LC_ALL": "C"}).output == "kept  C\n"
    assert "LBTEST_ADDED" not in os.environ


def test_input_is_the_process_s_standard_input() -> None:
    text = "line one\nline two\n" * 20000  # more than a pipe holds
    assert run(["cat"], input=text).output == text
    assert run(["cat"], input=text, stream=True).output == text
    assert run(["wc", "-l"], input="a\nb\n").output.strip() == "2"


def test_without_input_the_process_reads_nothing() -> None:
    # Not the terminal: `cat` ends at once.
    assert run(["cat"], timeout=10).output == ""
    assert run(["cat"], timeout=10, stream=True).output == ""


def test_input_left_unread_is_no_error() -> None:
    assert run(["true"], input="x" * 1_000_000).returncode == 0
    assert run(["true"], input="x" * 1_000_000, stream=True).returncode == 0


# --- CPU priority ----------------------------------------------------------------------------


def test_a_yielding_block_runs_its_processes_at_a_lower_priority() -> None:
    # `nice` without arguments prints its own niceness: what a started program gets.
    assert run(["nice"]).output.strip() == "0"
    seen: dict[str, str] = {}

    def other_thread() -> None:
        seen["other"] = run(["nice"]).output.strip()

    with yielding():
        inside = run(["nice"])
        assert inside.output.strip() == str(processes.YIELDING_NICENESS)
        assert inside.argv == ("nice", "-n", str(processes.YIELDING_NICENESS), "nice")
        assert run(["sh", "-c", "nice"], stream=True).output.strip() == "10"
        with yielding(5):
            assert run(["nice"]).output.strip() == "5"
        thread = threading.Thread(target=other_thread)  # another thread's processes: not
        thread.start()
        thread.join()
    assert seen["other"] == "0"
    assert run(["nice"]).output.strip() == "0"


def test_a_failure_in_a_yielding_block_names_the_command_as_asked() -> None:
    with yielding(), pytest.raises(ProcessFailed) as failed:
        run(["sh", "-c", "exit 2"])
    assert failed.value.argv == ("sh", "-c", "exit 2")
    assert failed.value.result.argv[:3] == ("nice", "-n", "10")
    assert failed.value.message == "sh -c 'exit 2' failed with exit code 2"


# --- the log ---------------------------------------------------------------------------------


def test_the_command_and_its_output_are_logged_at_debug(
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    with caplog.at_level(logging.DEBUG, logger=TOOLS):
        run(["sh", "-c", "echo first; echo second; echo oops >&2"])
    records = [r for r in caplog.records if r.name == TOOLS]
    assert {r.levelno for r in records} == {logging.DEBUG}
    assert [r.getMessage() for r in records] == [
        "$ sh -c 'echo first; echo second; echo oops >&2'",
        "first\nsecond",
        "oops",
    ]
    captured = capfd.readouterr()
    assert captured.out == captured.err == ""  # nothing reaches the terminal


def test_streamed_output_is_logged_line_by_line(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger=TOOLS):
        result = run(["sh", "-c", "echo a; echo b >&2; echo c"], stream=True, merge_stderr=True)
    assert result.output == "a\nb\nc\n"
    assert tool_messages(caplog) == ["$ sh -c 'echo a; echo b >&2; echo c'", "a", "b", "c"]


def test_a_failure_s_exit_code_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger=TOOLS), pytest.raises(ProcessFailed):
        run(["sh", "-c", "echo bad; exit 7"])
    assert tool_messages(caplog)[-2:] == ["bad", "sh exited with code 7"]


def test_a_timeout_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger=TOOLS), pytest.raises(ProcessTimedOut):
        run(["sleep", "30"], timeout=0.2)
    assert tool_messages(caplog)[-1] == "sleep killed after 0.2 seconds"


def test_input_is_logged_only_when_asked(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger=TOOLS):
        run(["true"], input="hidden-by-default\n")
        run(["true"], input="*mangle\nCOMMIT\n", log_input=True)
    messages = tool_messages(caplog)
    assert not any("hidden-by-default" in m for m in messages)
    assert "standard input of true:\n*mangle\nCOMMIT" in messages


def test_output_kept_out_of_the_log_is_still_returned(caplog: pytest.LogCaptureFixture) -> None:
    # The outputs ("42-out", "42-err") appear nowhere in the commands.
    script = "echo $((6*7))-out; echo $((6*7))-err >&2"
    with caplog.at_level(logging.DEBUG, logger=TOOLS):
        quiet = run(["sh", "-c", script], log_output=False)
        streamed = run(["sh", "-c", script], log_output=False, stream=True)
        failed = run(["sh", "-c", script + "; exit 1"], log_output=False, check=False)
    for result in (quiet, streamed, failed):
        assert (result.output, result.errors) == ("42-out\n", "42-err\n")
    messages = tool_messages(caplog)
    assert f"$ sh -c '{script}'" in messages  # the command itself is logged
    assert "sh exited with code 1" in messages
    assert not any("42-" in m for m in messages), messages


def test_environment_values_are_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger=TOOLS):
        run(["true"], env={"LBTEST_TOKEN": "value-not-logged"})
    assert not any("value-not-logged" in m for m in tool_messages(caplog))


def test_a_console_password_and_its_hash_never_reach_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.DEBUG):
        hashed = password_hash("lbtest-secret-password")
    assert hashed.startswith("$6$")
    everything = "\n".join(r.getMessage() for r in caplog.records)
    assert "$ openssl passwd -6 -stdin" in everything
    assert "lbtest-secret-password" not in everything
    assert hashed not in everything
