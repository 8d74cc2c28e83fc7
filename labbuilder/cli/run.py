"""``run`` (for CI: up, install, reports, down, optionally repeated) and ``up --install`` (one
``run --keep``): the whole path from a lab file to a checked cloud, with reports kept whatever
fails."""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from rich.console import Console

from labbuilder.api import install as installer
from labbuilder.api import verify as verifier
from labbuilder.cli.common import (
    Sizes,
    Subparsers,
    add_lab_arguments,
    lab_option,
    selected_lab,
)
from labbuilder.cli.install import (
    add_install_options,
    check_optional_stages,
    print_summary,
    run_install,
    selection_from,
)
from labbuilder.cli.upwatch import (
    copy_consoles,
    copy_logs,
    up_log_path,
    up_reports_dir,
    up_watched,
)
from labbuilder.cli.verify import print_result as print_verified
from labbuilder.common.errors import UsageError
from labbuilder.common.paths import state_root
from labbuilder.install.report import error_entry
from labbuilder.lifecycle.state import lab_state
from labbuilder.model.lab import Lab


def register(commands: Subparsers) -> None:
    run = commands.add_parser(
        "run",
        help="for CI: up, install, reports, down, in one command",
        description=(
            "Bring the lab up, install the recipe, keep the reports, and take the lab down "
            "again. On failure the lab is kept for inspection unless --always-down. With "
            "--repeat N it does this N times from scratch and reports how many runs passed "
            "(flakiness), with each stage's times."
        ),
        epilog="Exit codes: 0 every run passed, 1 a run failed, 2 bad input, 130 interrupted. "
        "The reports of a run are copied to --report-dir whatever failed.",
    )
    add_lab_arguments(run, allow_small=True)
    add_install_options(run)
    run.add_argument(
        "--auto-subnets",
        action="store_true",
        help="move lab networks that clash with the host to free subnets",
    )
    run.add_argument("--keep", action="store_true", help="keep the lab when the run passes")
    run.add_argument(
        "--always-down", action="store_true", help="take the lab down even when the run fails"
    )
    run.add_argument(
        "--repeat", type=positive_int, default=1, metavar="N", help="fresh runs (default 1)"
    )
    run.add_argument(
        "--report-dir",
        type=report_dir_path,
        metavar="DIR",
        help="where the JUnit and JSON reports are copied (default: "
        "<state root>/runs/<lab>-<time>/); they outlive the lab",
    )
    run.add_argument(
        "--verify",
        action="store_true",
        help="once the install passes, run Tempest against the lab (`labbuilder verify`); "
        "the run passes only if Tempest does",
    )
    run.add_argument(
        "--verify-suite",
        action="append",
        default=[],
        metavar="SUITE",
        help="the Tempest suite --verify runs: smoke (default), full or a regular expression; "
        "may be given again",
    )
    run.add_argument("--json", action="store_true", help="print a JSON summary of the runs")
    run.set_defaults(handler=cmd_run)


def positive_int(text: str) -> int:
    """An argparse type: a whole number of 1 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: give 1 or more")
    return value


def report_dir_path(text: str) -> Path:
    """An argparse type: a folder for reports (it may not exist yet; it must not be a file)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("the folder's path is empty")
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a folder")
    return path


def cmd_run(args: argparse.Namespace, console: Console) -> int:
    from labbuilder.api import facade as api

    lab = selected_lab(args, Sizes.FLAG)
    selection = selection_from(args)
    if args.verify_suite and not args.verify:
        raise UsageError("--verify-suite chooses what --verify runs", "add --verify")
    if args.keep and args.repeat > 1:
        raise UsageError(
            "--keep keeps one lab; it cannot be combined with --repeat",
            "leave out --keep, or --repeat",
        )
    check_optional_stages(lab, selection)  # a bad recipe or stage fails before `up`
    installer.dry_run(lab, selection)  # so do --from, --until and --only
    stamp = time.strftime("%Y%m%dT%H%M%S")
    report_dir = args.report_dir or state_root() / "runs" / f"{lab.name}-{stamp}"
    try:
        report_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(
            f"--report-dir {report_dir}: cannot make the folder: {err.strerror}",
            "give a folder labbuilder can write",
        ) from None
    runs: list[dict[str, object]] = []
    status = 0
    progress = Console(stderr=True, emoji=False, highlight=False, markup=False)

    def summary() -> None:
        passed = sum(1 for run in runs if run["passed"])
        if args.json:
            console.print_json(json.dumps({"lab": lab.name, "passed": passed, "runs": runs}))
        else:
            console.print(f"{passed} of {len(runs)} runs passed; reports in {report_dir}")

    for number in range(1, args.repeat + 1):
        progress.print(f"run {number}/{args.repeat}: up")
        started = time.monotonic()
        since = time.time()
        marks = log_marks(lab)
        target = report_dir / f"run-{number}" if args.repeat > 1 else report_dir
        up_seconds: float | None = None
        try:
            up = up_watched(
                lab,
                auto_subnets=args.auto_subnets,
                from_template=getattr(args, "from_template", None),
            )
            up_seconds = up.seconds
            result = run_install(lab, selection, json_output=args.json)
            verified = None
            if args.verify and result.ok:
                progress.print(f"run {number}/{args.repeat}: verify (Tempest)")
                verified = verifier.verify(lab, args.verify_suite, on_line=progress.print)
        except BaseException as err:
            # Whatever stopped the run, its reports (up's, and install's so far) are kept.
            copied = copy_reports(lab, target, since)
            copy_logs(marks, target)
            copy_consoles(lab, target, since)
            err.add_note(f"reports in {target}" if copied else "no report was written")
            if args.always_down and not isinstance(err, KeyboardInterrupt):
                try:
                    api.down(lab)
                except Exception as failed:  # noqa: BLE001 - the first error is the one to show
                    err.add_note(f"taking the lab down failed too: {failed}")
            runs.append(
                {
                    "run": number,
                    "passed": False,
                    "error": error_entry(err, "up" if up_seconds is None else "install"),
                    "up_seconds": None if up_seconds is None else round(up_seconds, 1),
                    "total_seconds": round(time.monotonic() - started, 1),
                    "reports": str(target),
                    "kept": not args.always_down or isinstance(err, KeyboardInterrupt),
                }
            )
            summary()
            raise
        copy_reports(lab, target, since)
        copy_logs(marks, target)
        copy_consoles(lab, target, since)
        ok = result.ok and (verified is None or verified.passed)
        keep = (args.keep and ok) or (not ok and not args.always_down)
        if not keep:
            api.down(lab)
        runs.append(
            {
                "run": number,
                "passed": ok,
                "up_seconds": round(up.seconds, 1),
                "install_seconds": round(result.info.seconds, 1),
                "total_seconds": round(time.monotonic() - started, 1),
                "stages": {stage.name: round(stage.seconds, 1) for stage in result.stages},
                "reports": str(target),
                "kept": keep,
                **({} if verified is None else {"verify": {
                    "passed": verified.passed,
                    "seconds": round(verified.seconds, 1),
                    "summary": verified.summary,
                }}),
            }
        )  # fmt: skip
        if not args.json:
            print_summary(console, result)
            if verified is not None:
                print_verified(verified, console)
        if not ok:
            status = 1
            if keep:
                console.print(
                    f"the lab is kept for inspection: `labbuilder ssh {lab_option(lab)} NODE`, "
                    f"`labbuilder down {lab_option(lab)}` when done"
                )
                break
    summary()
    return status


def cmd_up_install(args: argparse.Namespace, console: Console) -> int:
    """``up --install``: one ``run --keep``. Bring the lab up, install its recipe (the core path
    to a launched instance, and the optional stages the lab file selects), keep the lab whether
    the install passes or fails, and say where the reports are."""
    defaults: dict[str, object] = {"recipe": None, "start": None, "until": None, "only": []}
    defaults |= {"optional": [], "faithful": False, "force": False, "no_snapshots": False}
    defaults |= {"repeat": 1, "keep": True, "always_down": False, "report_dir": None}
    defaults |= {"verify": False, "verify_suite": []}
    run_args = argparse.Namespace(**{**vars(args), **defaults})
    status = cmd_run(run_args, console)
    if status == 0 and not args.json:
        lab = selected_lab(args, Sizes.FLAG)
        console.print(
            f"lab {lab.name} is up with recipe {lab.recipe} installed: "
            f"`labbuilder ssh {lab_option(lab)} controller`, `labbuilder down {lab_option(lab)}` "
            "when done",
            markup=False,
            soft_wrap=True,
        )
    return status


def log_marks(lab: Lab) -> dict[Path, int]:
    """The lab's ``up`` and ``install`` logs, each with its size now (where a run begins)."""
    logs = (up_log_path(lab.name), lab_state(lab.name).directory / "logs" / "install.log")
    marks: dict[Path, int] = {}
    for log in logs:
        try:
            marks[log] = log.stat().st_size if log.is_file() and not log.is_symlink() else 0
        except OSError:
            marks[log] = 0
    return marks


def copy_reports(lab: Lab, target: Path, since: float) -> list[Path]:
    """Copy the reports of the lab written since ``since`` (epoch seconds) to ``target``:
    ``up-<time>``/``install-<time>`` as they are, and the newest as ``up-latest`` and
    ``latest`` (install), in JUnit XML and JSON."""
    folders = {"up": up_reports_dir(lab.name), "install": lab_state(lab.name).directory / "reports"}
    copied: list[Path] = []
    target.mkdir(parents=True, exist_ok=True)
    folders["verify"] = folders["install"]
    for kind, latest in (("up", "up-latest"), ("install", "latest"), ("verify", "verify-latest")):
        for suffix in (".xml", ".json"):
            found = sorted(
                path
                for path in folders[kind].glob(f"{kind}-*{suffix}")
                if not path.is_symlink()
                and path.stem not in ("up-latest", "verify-latest")
                and path.stat().st_mtime >= since - 1
            )
            for path in found:
                shutil.copy2(path, target / path.name)
                copied.append(target / path.name)
            if found:
                shutil.copy2(found[-1], target / f"{latest}{suffix}")
    return copied
