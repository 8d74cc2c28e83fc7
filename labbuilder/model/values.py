"""The types of the lab file's values that leave labbuilder: libvirt URIs, URLs, host names,
time servers, egress destinations and image locations. Pure: no I/O.

Each ``check_*`` returns the value (normalised where that helps) or raises ``ValueProblem``
with the rule it breaks and a hint; ``labfile`` turns that into a ``LabFileError`` naming the key.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from dataclasses import dataclass

SUPPORTED_URIS = "qemu:///system, qemu:///session or qemu+ssh://[user@]host[:port]/system"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*\.?$")
_USER = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}$")
# A URL's path: the characters of RFC 3986 paths that no destination treats specially.
_PATH = re.compile(r"^(/[A-Za-z0-9._~%+,=@:-]*)*$")
_UNSAFE = re.compile(r"[\s\"'`\\;{}<>|$^\x00-\x1f\x7f-\x9f]")


def split_url(text: str, hint: str | None = None) -> urllib.parse.SplitResult:
    """``urllib.parse.urlsplit``, with its ValueError (unbalanced ``[``) as a ValueProblem."""
    try:
        return urllib.parse.urlsplit(text)
    except ValueError:
        raise ValueProblem("is not a URL: its [IPv6 address] is not closed", hint) from None


@dataclass
class ValueProblem(ValueError):
    """A value of the wrong type: ``rule`` completes "<key> = <value> ...", ``hint`` says what
    to write instead."""

    rule: str
    hint: str | None = None

    def __str__(self) -> str:
        return self.rule


def is_hostname(text: str) -> bool:
    """A DNS name (RFC 1123 labels), not an address."""
    return bool(_HOSTNAME.match(text)) and not re.fullmatch(r"[0-9.]+", text)


def check_host(text: str, what: str = "a host name or an IP address") -> str:
    """A host name or an IP address (IPv6 without brackets)."""
    if is_hostname(text):
        return text
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise ValueProblem(f"is not {what}", 'e.g. "ntp.example.org" or "192.0.2.10"') from None
    return text


def check_libvirt_uri(text: str) -> str:
    """Only the transports labbuilder supports, without any query parameter: libvirt's own
    parameters can name a program to run (``command=``), a socket or a key file."""
    hint = f"use {SUPPORTED_URIS}, without '?' parameters"
    if text in ("qemu:///system", "qemu:///session"):
        return text
    if _UNSAFE.search(text) or "?" in text or "#" in text:
        raise ValueProblem("is not a libvirt URI labbuilder supports (it has parameters)", hint)
    parts = split_url(text, hint)
    if "://" not in text:
        raise ValueProblem("is not a libvirt URI such as qemu:///system", hint)
    if parts.scheme != "qemu+ssh":
        raise ValueProblem(
            f"uses the transport {parts.scheme or '(none)'!r}, which labbuilder does not support",
            hint,
        )
    if parts.path != "/system" or parts.query or parts.fragment:
        raise ValueProblem("is not a qemu+ssh://[user@]host[:port]/system URI", hint)
    user, _, hostport = parts.netloc.rpartition("@")
    if user and not _USER.match(user):
        raise ValueProblem(f"has the user name {user!r}, which is not a login name", hint)
    _host_and_port(hostport, hint)
    return text


def _host_and_port(hostport: str, hint: str) -> None:
    if hostport.startswith("["):
        host, _, rest = hostport[1:].partition("]")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueProblem(
                f"names the host [{host}], which is not an IPv6 address", hint
            ) from None
        port = rest.removeprefix(":") if rest.startswith(":") else None
        if rest and port is None:
            raise ValueProblem("has text after its host", hint)
    else:
        host, colon, port_text = hostport.partition(":")
        port = port_text if colon else None
        if not host or host.startswith("-"):
            raise ValueProblem("has no host", hint)
        check_host(host)
    if port is not None and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise ValueProblem(f"has the port {port!r}, which is not 1-65535", hint)


def check_url(text: str, *, what: str = "URL") -> str:
    """An http:// or https:// URL: a host, an optional port and an optional path; no user or
    password, query, fragment, white space, quotes or shell and config syntax."""
    hint = 'e.g. "http://10.0.0.1:3142" or "http://deb.debian.org/debian"'
    if _UNSAFE.search(text):
        raise ValueProblem(
            f"is not a plain {what}: it holds white space, a quote or one of ;{{}}<>|$\\", hint
        )
    parts = split_url(text, hint)
    if parts.scheme not in ("http", "https"):
        raise ValueProblem(f"is not an http:// or https:// {what}", hint)
    if parts.query or parts.fragment or "?" in text or "#" in text:
        raise ValueProblem(f"is not a plain {what}: it has a query or a fragment", hint)
    if "@" in parts.netloc:
        raise ValueProblem(
            f"is a {what} with a user or password, which labbuilder does not take from a lab file",
            "use a proxy or mirror that needs no login",
        )
    _host_and_port(parts.netloc, hint)
    if not _PATH.match(parts.path):
        raise ValueProblem(f"has a path that is not a plain path ({parts.path})", hint)
    return text


def check_image_url(text: str) -> str:
    """An image download: an http(s) URL of a file, not on this host (loopback, link-local)."""
    check_url(text, what="image URL")
    parts = split_url(text)
    if not parts.path.rstrip("/").rsplit("/", 1)[-1] or parts.path.endswith("/"):
        raise ValueProblem("has no file name", "give the full URL of the image file")
    host = (parts.hostname or "").lower()
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if (
        host.rstrip(".") == "localhost"
        or host.endswith(".localhost")
        or (
            address is not None
            and (address.is_loopback or address.is_link_local or address.is_unspecified)
        )
    ):
        raise ValueProblem(
            "names this host (loopback or link-local), which a lab file may not download from",
            "put the image file next to the lab file and name it by its path",
        )
    return text


def check_time_server(text: str) -> str:
    """An NTP server for chrony/ntp.conf: a host name or an address, one word."""
    return check_host(text, "a host name or an IP address of an NTP server")


# Ranges a lab network or an egress destination must not touch: they are not unicast addresses
# of another machine (this host, link-local, multicast, reserved, "this network").
RESERVED_RANGES = (
    ("0.0.0.0/8", '"this network" (0.0.0.0/8)'),
    ("127.0.0.0/8", "loopback (127.0.0.0/8)"),
    ("169.254.0.0/16", "link-local (169.254.0.0/16)"),
    ("224.0.0.0/4", "multicast (224.0.0.0/4)"),
    ("240.0.0.0/4", "reserved (240.0.0.0/4, with the broadcast address)"),
)


def reserved_range(cidr: str) -> str | None:
    """What reserved range ``cidr`` (an IPv4 address or network) overlaps, or None."""
    network = ipaddress.IPv4Network(cidr, strict=False)
    for reserved, what in RESERVED_RANGES:
        if network.overlaps(ipaddress.IPv4Network(reserved)):
            return what
    return None


def check_egress_destination(text: str) -> str:
    """An IPv4 address or CIDR guests may reach, outside the reserved ranges."""
    hint = 'e.g. "203.0.113.80" or "198.51.100.0/24"'
    try:
        network = ipaddress.IPv4Network(text, strict=True)
    except ValueError as err:
        rule = "is not an IPv4 address or CIDR"
        if "has host bits set" in str(err):
            rule = "has host bits set"
        raise ValueProblem(rule, hint) from None
    if network.prefixlen == 0:
        raise ValueProblem("allows everything", 'use egress = "nat" to let guests reach everything')
    reserved = reserved_range(text)
    if reserved is not None:
        raise ValueProblem(f"is in a range guests cannot be allowed to: {reserved}", hint)
    return text


def check_mac(text: str) -> str:
    """A unicast MAC that libvirt and the kernel accept for a guest's NIC (lower case)."""
    mac = text.lower()
    hint = 'e.g. "52:54:00:12:34:56" (52:54:00 is QEMU\'s prefix)'
    if not re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", mac):
        raise ValueProblem("is not a MAC address such as 52:54:00:12:34:56", hint)
    first = int(mac[:2], 16)
    if mac == "00:00:00:00:00:00":
        raise ValueProblem("is the all-zero MAC, which the kernel refuses", hint)
    if first & 1:
        raise ValueProblem("is a multicast MAC; the first byte must be even", hint)
    if first == 0xFE:
        raise ValueProblem(
            "starts with fe, which libvirt reserves for the host's tap devices", hint
        )
    return mac
