"""``up`` as the CLI runs it: with its progress watched, its detail in the lab's up log, and on
failure its log and the nodes' consoles copied into the lab's reports folder (which outlives
``down``). Shared by ``up``, ``up --install`` and ``run``."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path

from labbuilder.api import facade as api
from labbuilder.api.up import UpResult
from labbuilder.cli.common import (
    lab_option,
)
from labbuilder.cli.watch import UpWatch, watching
from labbuilder.common.errors import LabbuilderError
from labbuilder.common.paths import state_root
from labbuilder.install.report import UpRecord, error_entry, write_up_reports
from labbuilder.lifecycle.readiness import RUNGS
from labbuilder.lifecycle.state import lab_state
from labbuilder.model.lab import Lab


def up_watched(lab: Lab, *, auto_subnets: bool, from_template: str | None = None) -> UpResult:
    """``up_reported`` with its progress on stderr (stdout holds only the result: JSON with
    ``--json``) and its detail (tools' output) in the lab's ``up.log``."""
    with watching(up_log_path(lab.name), f"labbuilder up {lab_option(lab)}") as progress:
        watch = UpWatch(progress, up_reports_dir(lab.name) / "up-latest.json")
        result, _ = up_reported(
            lab,
            auto_subnets=auto_subnets,
            log=watch.on_log,
            on_rung=watch.on_rung,
            from_template=from_template,
        )
    return result


def up_reported(
    lab: Lab,
    *,
    auto_subnets: bool,
    log: Callable[[str], None],
    on_rung: Callable[[str, str, float], None] | None = None,
    from_template: str | None = None,
) -> tuple[UpResult, tuple[Path, Path]]:
    """``api.up`` that leaves its report (``reports/up-latest.json`` and ``.xml`` in the lab's
    state directory) whether it succeeds or fails; a failure's error names the report."""
    record = UpRecord(lab.name)
    # Beside the labs' state, not in it: the report of an `up` that failed and removed what it
    # made must not make the lab look present, and it outlives `down`.
    directory = up_reports_dir(lab.name)

    def on_log(message: str) -> None:
        record.on_log(message)
        log(message)

    def on_node_rung(node: str, rung: str, seconds: float) -> None:
        record.on_rung(node, rung, seconds)
        if on_rung is not None:
            on_rung(node, rung, seconds)

    since = time.time()
    try:
        result = api.up(
            lab,
            auto_subnets=auto_subnets,
            log=on_log,
            on_rung=on_node_rung,
            from_template=from_template,
        )
    except BaseException as err:
        where = record.log[-1][1] if record.log else "checking the lab and the host"
        if not (isinstance(err, LabbuilderError) and err.exit_code == 2 and not record.log):
            copy_consoles(lab, directory, since)  # `down` removes them with the lab
            try:
                paths = write_up_reports(directory, record, RUNGS, error_entry(err, where))
            except Exception as failed:  # noqa: BLE001 - the first error is the one to show
                err.add_note(f"writing the report failed too: {failed}")
            else:
                err.add_note(f"report: {paths[1]}")
        raise
    return result, write_up_reports(directory, record, RUNGS)


def copy_logs(marks: dict[Path, int], target: Path, name: str | None = None) -> None:
    """Copy what each log of ``marks`` received since its mark (this run) to ``target``, under
    its own name or ``name``."""
    for log, mark in marks.items():
        try:
            if log.is_symlink() or not log.is_file():
                continue
            with log.open("rb") as source:
                source.seek(mark if log.stat().st_size >= mark else 0)  # moved to .1 meanwhile
                data = source.read()
        except OSError:
            continue
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        with (
            contextlib.suppress(OSError),
            os.fdopen(os.open(target / (name or log.name), flags, 0o600), "wb") as copy,
        ):
            copy.write(data)  # a log that cannot be copied must not hide the run's result


def copy_consoles(lab: Lab, target: Path, since: float) -> None:
    """Copy the serial consoles the lab's nodes wrote since ``since`` (epoch seconds) to
    ``target`` as ``console-<node>.log``: a node that did not come up is diagnosed from its
    console, which ``down`` removes with the lab."""
    with contextlib.suppress(OSError):
        for log in sorted(lab_state(lab.name).console_dir.glob("*.log")):
            if not log.is_symlink() and log.is_file() and log.stat().st_mtime >= since - 1:
                copy_logs({log: 0}, target, name=f"console-{log.name}")


def up_reports_dir(lab: str) -> Path:
    """Where ``up`` leaves its reports: ``<state root>/reports/<lab>/``."""
    return state_root() / "reports" / lab


def up_log_path(lab: str) -> Path:
    """``up``'s log (tools' output, every phase): ``<state root>/reports/<lab>/up.log``."""
    return up_reports_dir(lab) / "up.log"
