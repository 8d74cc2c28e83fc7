"""``verify``: OpenStack's own integration tests (Tempest) against a lab that is up."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console

from labbuilder.api import verify as verifier
from labbuilder.cli.common import Sizes, Subparsers, add_lab_arguments, selected_lab
from labbuilder.common.errors import UsageError
from labbuilder.verify import results


def register(commands: Subparsers) -> None:
    verify = commands.add_parser(
        "verify",
        help="run Tempest, OpenStack's own tests, against the lab's cloud",
        description=(
            "Run Tempest (the version the lab's recipe names, Debian's package on this host) "
            "against the lab: a tempest.conf is made from the lab (the admin credentials from "
            "its secrets, the recipe's test image and flavor, the external network, the "
            "services its chapters installed, timeouts for emulation), Tempest runs where the "
            "lab's nodes are (an isolated lab's gateway namespace), the recipe's expected "
            "skips are left out and reported with their reasons. Reports: a JUnit case per "
            "test and a JSON summary per service beside the install's "
            "(<state>/labs/LAB/reports/verify-latest.*); failing tests' tracebacks in "
            "logs/verify.log. Exit 0 when every test run passed, 1 when one failed."
        ),
    )
    add_lab_arguments(verify)
    verify.add_argument(
        "--suite",
        action="append",
        default=[],
        metavar="SUITE",
        help=(
            "smoke (default: Tempest's smoke tests), full (its API and scenario tests), or a "
            "regular expression over test ids (tempest.api.identity); may be given again"
        ),
    )
    verify.add_argument(
        "--concurrency",
        type=int,
        metavar="N",
        help="tests run at once (default: the recipe's, 2 for zed-debian-12)",
    )
    verify.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="stop Tempest after this long (default: no limit)",
    )
    verify.add_argument("--json", action="store_true", help="print the result as JSON")
    verify.set_defaults(handler=cmd_verify)


def cmd_verify(args: argparse.Namespace, console: Console) -> int:
    if args.concurrency is not None and args.concurrency < 1:
        raise UsageError(
            f"--concurrency {args.concurrency} is not a number of tests", "give 1 or more"
        )
    if args.timeout is not None and args.timeout <= 0:
        raise UsageError(f"--timeout {args.timeout:g} is not a duration", "give seconds, > 0")
    lab = selected_lab(args, Sizes.ACCEPT)

    def progress(line: str) -> None:
        # Tempest's own progress, a line per test, as it runs (to stderr under --json)
        if line.strip():
            stream = sys.stderr if args.json else sys.stdout
            stream.write(line + "\n")
            stream.flush()

    result = verifier.verify(
        lab, args.suite, concurrency=args.concurrency, timeout=args.timeout, on_line=progress
    )
    if args.json:
        sys.stdout.write(result.report.read_text() + "\n")  # plain: rich would wrap it
    else:
        print_result(result, console)
    return 0 if result.passed else 1


def print_result(result: verifier.VerifyResult, console: Console) -> None:
    out = console.print
    out(f"\nTempest on lab {result.lab} ({result.suite}): {result.seconds:.0f} s", markup=False)
    for service, counts in result.summary.items():
        out(
            f"  {service:<16} {counts[results.PASSED]:4d} passed  {counts[results.FAILED]:4d} "
            f"failed  {counts[results.SKIPPED]:4d} skipped",
            markup=False,
        )
    if result.ssh_validation:
        out(f"SSH validation off: {result.ssh_validation}", markup=False)
    if all(case.status == results.SKIPPED for case in result.cases) and result.cases:
        out("no test ran: every test selected was skipped (reasons below)", markup=False)
    for reason, tests in results.skip_reasons(result.cases).items():
        out(f"skipped ({len(tests)}): {reason}", markup=False, highlight=False)
    for case in result.failed:
        out(f"FAILED {case.name}: {case.reason}", markup=False, highlight=False)
    out(f"reports: {result.junit} {result.report}", markup=False, highlight=False)
