"""One quoting filter per destination a lab value can reach: shell, apt.conf, INI, chrony/ntp,
/etc/network/interfaces and YAML (cloud-init). Pure functions, registered as jinja filters by
the renderers.

The lab file's values are validated for their type when the lab is read (``labfile``); these
filters are the second fence: whatever reaches a template is written so that its destination
reads it as one value. A value that the destination's syntax has no way to hold (a newline in
an apt.conf string, a space in an NTP server's name) raises ``QuotingError``: it is never
written, rather than written in a form that would add a directive, a line or a command.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable

from labbuilder.common.errors import LabbuilderError


class QuotingError(LabbuilderError):
    """A value cannot be written safely into its destination (refused, never written)."""

    exit_code = 2


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ufeff]")
# chrony.conf and ntp.conf have no quoting: a server is one word of these characters.
_TIME_SERVER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.:-]*$")


def _text(value: object, what: str) -> str:
    if value is None or isinstance(value, bool):
        raise QuotingError(f"{what}: {value!r} is not a value to write")
    return str(value)


def _refuse(value: str, what: str, why: str) -> QuotingError:
    return QuotingError(
        f"{what}: {value!r} {why}",
        "this is a bug: the value should have been refused when the lab was read",
    )


def shell(value: object) -> str:
    """One word for bash: ``'it'\\''s'``. NUL cannot be in an argument, so it is refused."""
    text = _text(value, "shell")
    if "\x00" in text:
        raise _refuse(text, "shell", "contains a NUL byte")
    return shlex.quote(text)


def aptconf(value: object) -> str:
    """An apt.conf string: ``"value"``. apt.conf has no escapes, so a quote, a backslash, a
    newline or any control character cannot be written and is refused."""
    text = _text(value, "apt.conf")
    if '"' in text or "\\" in text or _CONTROL.search(text):
        raise _refuse(text, "apt.conf", "cannot be written as an apt.conf string")
    return f'"{text}"'


def ini(value: object) -> str:
    """A value of an OpenStack (oslo.config) INI option: one line, ``$`` doubled (oslo.config
    expands ``$name``). A newline or control character would start another option: refused."""
    text = _text(value, "INI")
    if _CONTROL.search(text):
        raise _refuse(text, "INI", "contains a newline or control character")
    if text != text.strip():
        raise _refuse(text, "INI", "starts or ends with white space, which INI readers drop")
    return text.replace("$", "$$")


def chrony(value: object) -> str:
    """An NTP server in chrony.conf or ntp.conf: a host name or an address. These files have no
    quoting, so anything but one word of letters, digits, ``.``, ``:`` and ``-`` is refused."""
    text = _text(value, "chrony")
    if not _TIME_SERVER.match(text):
        raise _refuse(text, "chrony", "is not one word naming a host or an address")
    return text


_ENI_WORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.:/_-]*$")


def eni(value: object) -> str:
    """A value in /etc/network/interfaces (and /etc/hosts): one word, as neither file quotes;
    an address, a netmask, an interface or host name."""
    text = _text(value, "interfaces")
    if not _ENI_WORD.match(text):
        raise _refuse(text, "interfaces", "is not one word naming an address, interface or host")
    return text


def yaml(value: object) -> str:
    """A YAML double-quoted scalar that YAML 1.1 (cloud-init's PyYAML) and 1.2 read back as the
    same string: every character outside printable ASCII is escaped (``\\uXXXX``, and
    ``\\UXXXXXXXX`` beyond the BMP, where JSON's surrogate pairs would not do)."""
    text = _text(value, "YAML")
    out = ['"']
    for char in text:
        code = ord(char)
        if char in ('"', "\\"):
            out.append("\\" + char)
        elif 0x20 <= code < 0x7F:
            out.append(char)
        elif 0xD800 <= code <= 0xDFFF:
            raise _refuse(text, "YAML", "holds a lone surrogate, which is no character")
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    out.append('"')
    return "".join(out)


FILTERS: dict[str, Callable[[object], str]] = {
    "shell": shell,
    "aptconf": aptconf,
    "ini": ini,
    "chrony": chrony,
    "eni": eni,
    "yaml": yaml,
}
