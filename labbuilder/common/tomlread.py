"""Typed readers for TOML data, with errors that name the file, the key path and the value.

``Where`` is a place in a file (``lab.toml`` + ``nodes.compute1.memory``); every reader takes
one and raises ``Where.error_class`` (``LabFileError`` by default) when the value is wrong.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from labbuilder.common.errors import LabbuilderError, LabFileError
from labbuilder.common.sizes import parse_size

T = TypeVar("T")


SHOWN_LENGTH = 120  # an error message shows at most this much of a value


def show(value: object, limit: int = SHOWN_LENGTH) -> str:
    """A value as it would be written in TOML, on one line, cut to about ``limit`` characters.

    Control characters are escaped (``\\n``, ``\\u0000``), so a message naming a value is always
    one line, whatever the value holds.
    """
    text = _show(value, limit, depth=0)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _show(value: object, limit: int, depth: int) -> str:
    if depth > 8:
        return "…"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _quoted(value[: limit + 1])
    if isinstance(value, list | tuple):
        items = [_show(item, limit, depth + 1) for item in value[:16]]
        return "[" + ", ".join(items + (["…"] if len(value) > 16 else [])) + "]"
    if isinstance(value, dict):
        pairs = [
            f"{show_key(k)} = {_show(v, limit, depth + 1)}" for k, v in list(value.items())[:16]
        ]
        return "{" + ", ".join(pairs + (["…"] if len(value) > 16 else [])) + "}"
    if isinstance(value, int) and abs(value) > 10**30:
        return f"{value:.3e}"
    return str(value)


_ESCAPES = {
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
    '"': '\\"',
    "\\": "\\\\",
}


def _quoted(text: str) -> str:
    out = []
    for char in text:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif char.isprintable() or char == " ":
            out.append(char)
        elif ord(char) <= 0xFFFF:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(f"\\U{ord(char):08x}")
    return '"' + "".join(out) + '"'


def show_key(name: str) -> str:
    """A key as TOML writes it: bare when it can be, else quoted (``nodes."a b"``)."""
    if name and len(name) <= 64 and all(c.isascii() and (c.isalnum() or c in "_-") for c in name):
        return name
    return show(name, 66)


@dataclass(frozen=True)
class Where:
    """A place in a TOML file, for error messages: the file and the key path."""

    source: str
    path: str = ""
    error_class: type[LabbuilderError] = LabFileError

    def key(self, name: str) -> Where:
        shown = show_key(name)
        return replace(self, path=f"{self.path}.{shown}" if self.path else shown)

    def item(self, index: int) -> Where:
        return replace(self, path=f"{self.path}[{index}]")

    def error(self, value: object, rule: str, hint: str | None = None) -> LabbuilderError:
        """``<file>: <key> = <value> <rule>``."""
        return self.error_class(f"{self.source}: {self.path} = {show(value)} {rule}", hint)

    def problem(self, text: str, hint: str | None = None) -> LabbuilderError:
        """``<file>: <text>``, for problems that are not about one value."""
        return self.error_class(f"{self.source}: {text}", hint)


# --- small typed readers --------------------------------------------------------------------


def check_keys(table: Mapping[str, Any], allowed: tuple[str, ...], where: Where) -> None:
    for key in table:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            close = close or [name for name in allowed if name.startswith(key[:3])][:1]
            hint = f"did you mean {close[0]!r}?" if close else f"allowed keys: {', '.join(allowed)}"
            raise where.problem(f"unknown key '{where.key(key).path}'", hint)


def expect(value: object, kind: type[T], what: str, where: Where) -> T:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise where.error(value, f"is not {what}")
    return value


def parse_str(value: object, where: Where) -> str:
    return expect(value, str, "a string", where)


def parse_table(value: object, where: Where) -> dict[str, Any]:
    return expect(value, dict, "a table", where)


def parse_name(value: object, where: Where, *, max_length: int = 63) -> str:
    """A hostname label (RFC 1123), lower case, starting with a letter."""
    text = parse_str(value, where)
    if not is_hostname(text) or len(text) > max_length:
        raise where.error(
            text,
            "is not a valid name",
            f"use lower-case letters, digits and '-', starting with a letter, "
            f"at most {max_length} characters",
        )
    return text


def is_hostname(text: str) -> bool:
    return (
        0 < len(text) <= 63
        and text[0].isascii()
        and text[0].isalpha()
        and text[-1] != "-"
        and all(c.isascii() and (c.isdigit() or c.islower() or c == "-") for c in text)
    )


def parse_enum(value: object, kind: Callable[[str], T], where: Where) -> T:
    text = parse_str(value, where)
    try:
        return kind(text)
    except ValueError:
        choices = [str(member) for member in kind]  # type: ignore[attr-defined]
        raise where.error(text, f"is not one of {', '.join(choices)}") from None


def parse_int(
    value: object,
    where: Where,
    *,
    minimum: int,
    maximum: int | None = None,
    hint: str | None = None,
) -> int:
    number = expect(value, int, "a whole number", where)
    if number < minimum:
        raise where.error(number, f"is below {minimum}", hint)
    if maximum is not None and number > maximum:
        raise where.error(number, f"is above the most labbuilder allows, {maximum}", hint)
    return number


def parse_bool(value: object, where: Where) -> bool:
    return expect(value, bool, "true or false", where)


def parse_size_value(value: object, where: Where) -> int:
    text = expect(value, str, 'a size such as "2 GB"', where)
    try:
        size = parse_size(text)
    except ValueError as err:
        raise where.error(text, str(err)) from None
    except OverflowError:
        raise where.error(text, "is far too big a size") from None
    if size <= 0:
        raise where.error(text, "must be more than zero")
    return size


def parse_str_list(value: object, where: Where, *, max_items: int | None = None) -> tuple[str, ...]:
    items = expect(value, list, "a list of strings", where)
    if max_items is not None and len(items) > max_items:
        raise where.problem(
            f"{where.path} has {len(items)} entries; labbuilder allows at most {max_items}"
        )
    return tuple(parse_str(item, where.item(i)) for i, item in enumerate(items))


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def has_control(text: str) -> bool:
    """True if ``text`` holds a control character (a newline, a tab, NUL, an escape, ...)."""
    return _CONTROL.search(text) is not None


def parse_line(value: object, where: Where, *, max_length: int, hint: str | None = None) -> str:
    """A string of printable characters on one line, at most ``max_length`` long."""
    text = parse_str(value, where)
    if has_control(text):
        raise where.error(text, "holds a control character (a newline, a tab, an escape)", hint)
    if len(text) > max_length:
        raise where.error(text, f"is longer than {max_length} characters", hint)
    return text


def parse_range(value: object, where: Where) -> tuple[str, str]:
    """An address range, "first-last" or ["first", "last"]. Addresses are checked later."""
    if isinstance(value, str):
        parts = [part.strip() for part in value.split("-")]
    elif isinstance(value, list):
        parts = [parse_str(item, where.item(i)) for i, item in enumerate(value)]
    else:
        raise where.error(value, 'is not a range such as "203.0.113.101-203.0.113.200"')
    if len(parts) != 2 or not all(parts):
        raise where.error(value, 'is not a range such as "203.0.113.101-203.0.113.200"')
    return parts[0], parts[1]
