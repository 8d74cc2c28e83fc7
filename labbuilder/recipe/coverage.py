"""How faithfully a recipe follows its guide: every installing line of the guide, mapped to the
recipe steps that implement it or to an explained deviation. Pure: texts in, a report out.

The guide is a text file (the "seed"); its *installing lines* are its commands and the lines of
its configuration examples, found by ``installing_lines``: inside the guide's fenced blocks, a
prompt (``# cmd`` for a known command, ``$ cmd``, ``mysql>``) with the lines that continue it
(``¥``/``\\`` continuations, an open quote or SQL statement, ``--option`` lines), and every
line of a block that reads as configuration (``[section]``, ``key = value``, ...), comments
aside; plus inline commands outside blocks, and the prose instructions the recipe's
``coverage.toml`` lists (``extra``), less the lines it excludes. Sample output is not an
installing line.

A line is *mapped* when a step's (or a check's) ``guide`` reference (``"L1030-1045, L1046"``)
contains it, *explained* when a deviation of ``coverage.toml`` contains it; coverage is the share
of installing lines that are either. A mapped line that is not explained must also be *matched*:
its tokens (every word of a command, the key and the value of a configuration line; not the
guide's placeholders) appear, quotes and comments aside, in what one of its steps runs as
rendered (``texts``: scripts with their files, and checks; secrets by their names, as the guide
writes them). A reference cannot claim a line its step does not implement, and every change to
a command or a value has to be explained.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from labbuilder.common.errors import RecipeError
from labbuilder.recipe.model import Recipe, StepSpec

LineRange = tuple[int, int]

_FENCE = re.compile(r"^(?:-\s*)?```\s*$")
_INLINE = re.compile(r"^\s*(?:-\s*)?`([#$]\s+.+)`\s*$")
_PRE = re.compile(r"<pre>([#$]\s[^<]+)</pre>")
_REFERENCE = re.compile(r"L(\d+)(?:\s*-\s*L?(\d+))?")
_CONFIG = tuple(
    re.compile(pattern)
    for pattern in (
        r"^\[[^\]]+\]$",  # [section]
        r"^[\w.\-]+\s*=",  # key = value, key=value
        r"^[A-Za-z][\w.\- ]*\s=\s",  # key with spaces = value (rsyncd.conf)
        r"^export \w+=",  # openrc.sh
        r"^(?:auto|iface)\s",  # /etc/network/interfaces
        r"^-l\s",  # /etc/memcached.conf
        r"^\w+\s*\{$",  # lvm.conf's devices {
        r"^\d+\.\d+\.\d+\.\d+\s+[\w-]+$",  # /etc/hosts
    )
)


@dataclass(frozen=True)
class GuideLine:
    """One installing line of the guide."""

    number: int
    text: str
    kind: str  # "command", "continuation", "config", "inline", "prose"


@dataclass(frozen=True)
class Deviation:
    """Guide lines the recipe deliberately does not implement as written, and why."""

    lines: tuple[LineRange, ...]
    reason: str

    def contains(self, number: int) -> bool:
        return any(first <= number <= last for first, last in self.lines)


@dataclass(frozen=True)
class CoverageSpec:
    """A recipe's coverage.toml: which guide, which extra lines, which deviations."""

    seed: str  # the guide's text, relative to the recipe folder
    sha256: str  # of the seed, so the line numbers cannot drift silently
    commands: frozenset[str]  # what `# word` must start with to be a root prompt
    extra: tuple[tuple[LineRange, str], ...]  # prose instructions that are installing lines
    exclude: tuple[tuple[LineRange, str], ...]  # lines the heuristic takes wrongly
    deviations: tuple[Deviation, ...]


@dataclass(frozen=True)
class LineCoverage:
    line: GuideLine
    steps: tuple[str, ...]  # "stage/step" whose guide reference contains the line
    deviation: str | None  # the reason, when a deviation explains the line
    unmatched: tuple[str, ...] = ()  # tokens of a mapped line its steps do not mention

    @property
    def status(self) -> str:
        if self.deviation is not None:
            return "explained"
        if self.steps and not self.unmatched:
            return "mapped"
        if self.steps:
            return "unmatched"
        return "missing"


@dataclass(frozen=True)
class CoverageReport:
    recipe: str
    seed: str
    lines: tuple[LineCoverage, ...]
    deviations: tuple[Deviation, ...]
    unused_references: tuple[str, ...]  # "stage/step: L..." of steps naming no installing line

    @property
    def total(self) -> int:
        return len(self.lines)

    def count(self, status: str) -> int:
        return sum(1 for line in self.lines if line.status == status)

    @property
    def percent(self) -> float:
        covered = self.count("mapped") + self.count("explained")
        return 100.0 * covered / self.total if self.total else 100.0

    @property
    def complete(self) -> bool:
        return self.count("mapped") + self.count("explained") == self.total


# --- the guide's references and installing lines ------------------------------------------------


def parse_references(text: str) -> tuple[LineRange, ...]:
    """``"L1030-1045, L1046 (...)"`` → ((1030, 1045), (1046, 1046))."""
    ranges = []
    for match in _REFERENCE.finditer(text):
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) else first
        ranges.append((min(first, last), max(first, last)))
    return tuple(ranges)


def installing_lines(seed: str, commands: Iterable[str]) -> tuple[GuideLine, ...]:
    """The guide's commands and configuration lines, by the heuristic of the module docstring."""
    known = frozenset(commands)
    found: list[GuideLine] = []
    block: list[tuple[int, str]] = []
    fenced = False
    for number, raw in enumerate(seed.split("\n"), start=1):
        if _FENCE.match(raw.strip()):
            if fenced:
                found.extend(_block_lines(block, known))
                block = []
            fenced = not fenced
            continue
        if fenced:
            block.append((number, raw.rstrip()))
        elif _INLINE.match(raw) or _PRE.search(raw):
            found.append(GuideLine(number, raw.strip(), "inline"))
    return tuple(found)


def _is_prompt(text: str, known: frozenset[str]) -> bool:
    if re.match(r"^\$\s+\S", text) or text.startswith(("mysql> ", "C:\\>")):
        return True
    match = re.match(r"^#\s*(\S+)", text)
    return match is not None and match.group(1).lstrip("(") in known


def _block_lines(block: Sequence[tuple[int, str]], known: frozenset[str]) -> list[GuideLine]:
    if any(_is_prompt(text.strip(), known) for _, text in block):
        return _command_lines(block, known)
    if any(pattern.match(text.strip()) for pattern in _CONFIG for _, text in block):
        return [
            GuideLine(number, text.strip(), "config")
            for number, text in block
            if text.strip()
            and text.strip() != "..."
            and not (text.strip().startswith("#") and not text.strip().startswith("#!"))
        ]
    return []  # sample output


def _command_lines(block: Sequence[tuple[int, str]], known: frozenset[str]) -> list[GuideLine]:
    lines: list[GuideLine] = []
    going_on = in_sql = in_quote = False
    for number, raw in block:
        text = raw.strip()
        if _is_prompt(text, known):
            kind = "command"
        elif going_on or in_sql or in_quote or re.match(r"^--[A-Za-z]", text):
            kind = "continuation"
        else:  # output: whatever was open is closed
            going_on = in_sql = in_quote = False
            continue
        lines.append(GuideLine(number, text, kind))
        going_on = bool(re.search(r"(?:¥|\\|--|/)$", text))
        if text.startswith("mysql> "):
            statement = text.removeprefix("mysql> ").strip()
            in_sql = not statement.endswith(";") and statement not in ("exit", "quit")
        elif in_sql:
            in_sql = not text.endswith(";")
        if text.count("'") % 2 or text.count('"') % 2:
            in_quote = not in_quote
    return lines


# --- coverage.toml -------------------------------------------------------------------------------


def parse_coverage_spec(text: str, source: str) -> CoverageSpec:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise RecipeError(f"{source}: not valid TOML: {err}") from None
    unknown = sorted(set(data) - {"seed", "sha256", "commands", "extra", "exclude", "deviation"})
    if unknown:
        raise RecipeError(f"{source}: unknown keys {', '.join(unknown)}")

    def ranged(key: str) -> tuple[tuple[LineRange, str], ...]:
        items: list[tuple[LineRange, str]] = []
        for i, item in enumerate(data.get(key, [])):
            lines = parse_references(str(item.get("lines", "")))
            reason = str(item.get("reason", "")).strip()
            if not lines or not reason:
                raise RecipeError(f'{source}: {key}[{i}] needs lines ("L12-34") and a reason')
            items.extend((line_range, reason) for line_range in lines)
        return tuple(items)

    deviations = []
    for i, item in enumerate(data.get("deviation", [])):
        lines = parse_references(str(item.get("lines", "")))
        reason = " ".join(str(item.get("reason", "")).split())
        if not lines or not reason:
            raise RecipeError(f'{source}: deviation[{i}] needs lines ("L12-34") and a reason')
        deviations.append(Deviation(lines, reason))
    for key in ("seed", "sha256"):
        if not isinstance(data.get(key), str):
            raise RecipeError(f"{source}: the key {key!r} is missing")
    return CoverageSpec(
        seed=data["seed"],
        sha256=data["sha256"],
        commands=frozenset(str(word) for word in data.get("commands", [])),
        extra=ranged("extra"),
        exclude=ranged("exclude"),
        deviations=tuple(deviations),
    )


def guide_lines(seed: str, spec: CoverageSpec) -> tuple[GuideLine, ...]:
    """The installing lines: the heuristic's, plus ``extra``, less ``exclude``."""
    texts = seed.split("\n")
    by_number = {line.number: line for line in installing_lines(seed, spec.commands)}
    for (first, last), _ in spec.extra:
        for number in range(first, last + 1):
            if number not in by_number and texts[number - 1].strip():
                by_number[number] = GuideLine(number, texts[number - 1].strip(), "prose")
    for (first, last), _ in spec.exclude:
        for number in range(first, last + 1):
            by_number.pop(number, None)
    return tuple(by_number[number] for number in sorted(by_number))


# --- the report ----------------------------------------------------------------------------------


def step_references(recipe: Recipe) -> list[tuple[str, StepSpec, tuple[LineRange, ...]]]:
    """Each step with the guide ranges it and its checks name."""
    found = []
    for stage in recipe.stages:
        for step in stage.steps:
            ranges = parse_references(step.guide)
            for check in step.checks:
                ranges += parse_references(check.guide)
            found.append((f"{stage.name}/{step.name}", step, ranges))
    return found


def line_tokens(line: GuideLine, secrets: Iterable[str] = ()) -> tuple[str, ...]:
    """What a step implementing ``line`` must contain, quotes aside: every word of a command,
    the key and the value of a configuration line; not the guide's placeholders (``DEMO_NET_ID``,
    ``<password>``; the recipe's secrets are not placeholders: --dry-run renders them by name),
    nor prose or the continuation marks ``¥`` and ``\\``."""
    if line.kind not in ("command", "continuation", "config", "inline"):
        return ()
    text = line.text
    if line.kind == "inline":
        text = re.sub(r"^(?:-\s*)?`|`$", "", text)
    if line.kind != "config":
        text = re.sub(r"^(?:#|\$|mysql>|C:\\>)\s+", "", text)
    else:
        section = re.match(r"^\[([^\]]+)\]$", text)
        setting = re.match(
            r"^(?:export\s+)?['\"]?([\w.\-]+(?: [\w.\-]+)*?)['\"]?\s*[=:]\s*(.*?),?$", text
        )
        if section:
            return (section.group(1),)
        if setting and not text.startswith(("#", "dpkg")):
            key, value = setting.group(1), _unquote(setting.group(2))
            return tuple(t for t in (key, value) if t and not _placeholder(t, secrets))
    words = (_unquote(word) for word in text.split())
    return tuple(
        dict.fromkeys(
            word
            for word in words
            if word and word not in ("¥", "\\", "...") and not _placeholder(word, secrets)
        )
    )


def _code(text: str) -> str:
    """A script without its comment lines (the step's notes quote the guide's wrong text)."""
    return "\n".join(line for line in text.splitlines() if not re.match(r"^\s*#(?!!)", line))


def _unquote(text: str) -> str:
    return text.replace("'", "").replace('"', "").strip()


def _placeholder(word: str, secrets: Iterable[str]) -> bool:
    if re.search(r"<[^>]+>", word):
        return True
    names = re.findall(r"[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+", word)
    known = set(secrets)
    return any(name not in known for name in names)


def coverage_report(
    recipe: Recipe, spec: CoverageSpec, seed: str, texts: Mapping[str, str]
) -> CoverageReport:
    """``texts``: what each step (``"stage/step"``) runs, as rendered: scripts and checks."""
    lines = guide_lines(seed, spec)
    references = step_references(recipe)
    numbers = {line.number for line in lines}
    flat = {name: _unquote(_code(text)) for name, text in texts.items()}
    results = []
    for line in lines:
        steps = tuple(
            name
            for name, _, ranges in references
            if any(first <= line.number <= last for first, last in ranges)
        )
        deviation = next((d.reason for d in spec.deviations if d.contains(line.number)), None)
        unmatched: tuple[str, ...] = ()
        if steps and deviation is None:
            unmatched = tuple(
                token
                for token in line_tokens(line, recipe.secret_names)
                if not any(token in flat.get(name, "") for name in steps)
            )
        results.append(LineCoverage(line, steps, deviation, unmatched))
    unused = tuple(
        f"{name}: {step.guide}"
        for name, step, ranges in references
        if ranges
        and not any(first <= number <= last for first, last in ranges for number in numbers)
    )
    return CoverageReport(recipe.name, spec.seed, tuple(results), spec.deviations, unused)


def report_dict(report: CoverageReport) -> dict[str, object]:
    """The report as JSON-ready data."""
    return {
        "recipe": report.recipe,
        "seed": report.seed,
        "installing_lines": report.total,
        "mapped": report.count("mapped"),
        "explained": report.count("explained"),
        "unmatched": report.count("unmatched"),
        "missing": report.count("missing"),
        "percent": round(report.percent, 2),
        "lines": [
            {
                "line": item.line.number,
                "kind": item.line.kind,
                "text": item.line.text,
                "status": item.status,
                "steps": list(item.steps),
                "deviation": item.deviation,
                "unmatched": list(item.unmatched),
            }
            for item in report.lines
        ],
        "deviations": [
            {
                "lines": ", ".join(f"L{a}" if a == b else f"L{a}-{b}" for a, b in d.lines),
                "reason": d.reason,
            }
            for d in report.deviations
        ],
        "unused_references": list(report.unused_references),
    }
