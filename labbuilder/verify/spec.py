"""A recipe's ``verify.toml``: the Tempest it is verified with, its suites, its expected skips.

It sits beside ``recipe.toml`` and is not part of the recipe's digest: what proves a cloud does
not change what is installed (a template stays valid when a skip's reason is reworded).
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labbuilder.common.errors import UsageError

VERIFY_FILE = "verify.toml"
SMOKE = "smoke"
FULL = "full"
# Tempest's own selections: ``smoke`` is what ``tempest run --smoke`` filters on (the tests
# tagged smoke); ``full`` is Tempest's API and scenario tests (what its ``full`` tox job runs).
BUILTIN_SUITES = {SMOKE: "smoke", FULL: r"^tempest\.(api|scenario)\."}


@dataclass(frozen=True)
class ExpectedSkip:
    """Tests (a regular expression over Tempest's test ids) a lab of the recipe does not run,
    and why. They are left out of the run and reported as skipped with ``why``."""

    test: str
    why: str


@dataclass(frozen=True)
class VerifySpec:
    recipe: str
    tempest: str  # the Tempest version the recipe is verified with ("33.0.0")
    why_version: str
    skips: tuple[ExpectedSkip, ...]
    concurrency: int = 2
    timeouts: tuple[tuple[str, int], ...] = ()  # (tempest.conf section, build_timeout seconds)
    ssh_validation: str = ""  # why SSH validation is off ("" when the test image allows it)

    def suite_regex(self, suite: str) -> str:
        """The regular expression of a suite: ``smoke``, ``full``, or a regular expression."""
        return BUILTIN_SUITES.get(suite, suite)


def _key(data: dict[str, Any], key: str, kind: type, where: str) -> Any:
    value = data.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) is not (kind is bool):
        raise UsageError(
            f"{where}: {key} is missing or not a {kind.__name__}",
            f"see the zed-debian-12 recipe's {VERIFY_FILE}",
        )
    return value


def load_verify_spec(recipe_dir: Path, recipe: str) -> VerifySpec:
    """The recipe's ``verify.toml``; a ``UsageError`` (exit 2) naming the key when it is
    missing or wrong."""
    path = recipe_dir / VERIFY_FILE
    if not path.is_file():
        raise UsageError(
            f"recipe {recipe} says nothing of Tempest (no {VERIFY_FILE})",
            "verify a lab of a recipe that has one (zed-debian-12)",
        )
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"{path}: not TOML ({err})", "fix the file") from None
    where = str(path)
    unknown = set(data) - {"tempest", "why_version", "concurrency", "skips", "timeouts", "ssh"}
    if unknown:
        raise UsageError(f"{where}: unknown key {sorted(unknown)[0]}", "remove it")
    skips = []
    for index, entry in enumerate(data.get("skips", [])):
        at = f"{where}: skips[{index}]"
        if not isinstance(entry, dict):
            raise UsageError(f"{at} is not a table", 'give { test = "REGEX", why = "..." }')
        test, why = _key(entry, "test", str, at), _key(entry, "why", str, at)
        try:
            re.compile(test)
        except re.error as err:
            raise UsageError(f"{at}.test is not a regular expression: {err}", "fix it") from None
        if not why.strip():
            raise UsageError(f"{at}.why is empty", "say why the tests are skipped")
        skips.append(ExpectedSkip(test, why.strip()))
    timeouts = data.get("timeouts", {})
    if not isinstance(timeouts, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in timeouts.values()
    ):
        raise UsageError(f"{where}: timeouts must map sections to seconds", "compute = 1200")
    concurrency = data.get("concurrency", 2)
    if not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1:
        raise UsageError(f"{where}: concurrency must be a positive integer", "concurrency = 2")
    ssh = data.get("ssh", {})
    if not isinstance(ssh, dict) or not isinstance(ssh.get("off", ""), str):
        raise UsageError(f"{where}: ssh.off must be a string", 'off = "why"')
    return VerifySpec(
        recipe=recipe,
        tempest=_key(data, "tempest", str, where),
        why_version=str(data.get("why_version", "")),
        skips=tuple(skips),
        concurrency=concurrency,
        timeouts=tuple(sorted(timeouts.items())),
        ssh_validation=ssh.get("off", ""),
    )
