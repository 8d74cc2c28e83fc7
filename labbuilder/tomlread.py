"""Typed readers for TOML data, with errors that name the file, the key path and the value.

``Where`` is a place in a file (``lab.toml`` + ``nodes.compute1.memory``); every reader takes
one and raises ``Where.error_class`` (``LabFileError`` by default) when the value is wrong.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from labbuilder.errors import LabbuilderError, LabFileError
from labbuilder.sizes import parse_size

T = TypeVar("T")


def show(value: object) -> str:
    """A value as it would be written in TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(show(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {show(v)}" for k, v in value.items()) + "}"
    return str(value)


@dataclass(frozen=True)
class Where:
    """A place in a TOML file, for error messages: the file and the key path."""

    source: str
    path: str = ""
    error_class: type[LabbuilderError] = LabFileError

    def key(self, name: str) -> Where:
        return replace(self, path=f"{self.path}.{name}" if self.path else name)

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
            raise where.problem(f"unknown key {where.key(key).path!r}", hint)


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


def parse_int(value: object, where: Where, *, minimum: int) -> int:
    number = expect(value, int, "a whole number", where)
    if number < minimum:
        raise where.error(number, f"is below {minimum}")
    return number


def parse_bool(value: object, where: Where) -> bool:
    return expect(value, bool, "true or false", where)


def parse_size_value(value: object, where: Where) -> int:
    text = expect(value, str, 'a size such as "2 GB"', where)
    try:
        size = parse_size(text)
    except ValueError as err:
        raise where.error(text, str(err)) from None
    if size <= 0:
        raise where.error(text, "must be more than zero")
    return size


def parse_str_list(value: object, where: Where) -> tuple[str, ...]:
    items = expect(value, list, "a list of strings", where)
    return tuple(parse_str(item, where.item(i)) for i, item in enumerate(items))


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
