#!/usr/bin/env python3
"""Runs *inside a lab node* on the install pipeline's fast path: creates a stage's OpenStack API
objects (projects, users, roles, services, endpoints, images; flavors, networks, subnets,
routers, security group rules, key pairs, servers, floating IPs, volumes, objects, stacks) from
one Python process.

Under software emulation every ``openstack`` CLI call pays 14-37 s of Python start-up; this
script pays it once. It reads ``{"operations": [...]}`` (JSON) on stdin, authenticates from the
``OS_*`` environment (an openrc file sourced first), and makes each object unless it exists:
re-running it is safe. An operation with ``env`` (the path of another openrc file, such as
``/root/demo-openrc``) is made with that file's credentials instead, as the guide's "source
demo-openrc.sh" steps do. An operation with ``if_service`` (a service type) is skipped unless
the cloud's catalog has that service: objects of the optional chapters. It prints one line per
operation and exits non-zero on the first error (2 when the document itself is wrong, before
anything is made).

Nothing waits without end. Every HTTP request has a timeout (``request_timeout``, 180 s). An
operation that fails with a lost connection, a request timeout or an HTTP 502/503/504 answer is
run again, up to ``attempts`` (3) times in all, ``retry_delay`` (5) seconds apart, each retry
logged as ``retrying <operation> (try 2/3) after <error>``: every operation looks for its object
before making it, so a retry after a lost answer finds the object instead of making a second
one (a floating IP is created already bound to its port for that reason), and openstacksdk's
own silent resend of a request, POSTs included, is turned off. Other errors fail at once. Every
wait for a state (a server ACTIVE, a volume available or attached, an image active, a router
ACTIVE, a deletion done) has its own deadline (the operation's ``timeout``) and says what it
waited for when it gives up (``gave up after 900 s waiting for server demo-instance1 to become
ACTIVE (status BUILD)``). What runs is never hidden: every ``heartbeat`` (30) seconds a request
takes, a line ``still waiting on <METHOD> <URL> (<n> s)``, and every ``heartbeat`` seconds a wait
for a state takes, ``still waiting for <what> (status <status>, <n> s)``; a FAILED line names
the operation's last request (method, URL, outcome, seconds). The document's top-level keys
``request_timeout``, ``attempts``, ``retry_delay`` and ``heartbeat`` change those defaults.
Request bodies and headers (tokens, passwords) are never printed.

It uses only the standard library and openstacksdk (python3-openstacksdk), and must run on the
guest's Python, so labbuilder never imports it.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_DOMAIN = "default"
WAIT = 900  # seconds to wait for a server, volume, image or stack unless the operation says
DELETE_WAIT = 300  # seconds to wait for a deletion unless the operation's timeout is longer
ROUTER_WAIT = 300  # seconds to wait for a router to become ACTIVE unless the operation says
POLL = 5.0  # seconds between two looks at an object whose state is awaited
REQUEST_TIMEOUT = 180.0  # seconds an HTTP request may take (openstacksdk's api_timeout)
ATTEMPTS = 3  # tries of an operation that failed with a retriable error
RETRY_DELAY = 5.0  # seconds between two tries
HEARTBEAT = 30.0  # seconds between two "still waiting on" lines for a request in flight
RETRIABLE_STATUS = frozenset({502, 503, 504})


class InputError(Exception):
    """The input document is wrong: nothing has been made."""

    def __init__(self, key: str, value: Any, rule: str, hint: str) -> None:
        super().__init__(f"<stdin>: {key} = {json.dumps(value)} {rule}")
        self.hint = hint


class GaveUp(Exception):
    """A wait for a state ran past its deadline."""


class StateFailed(RuntimeError):
    """An awaited object went to a failed state."""


@dataclass(frozen=True)
class Settings:
    """How long a request may take and how often an operation is tried (the document's keys)."""

    request_timeout: float = REQUEST_TIMEOUT
    attempts: int = ATTEMPTS
    retry_delay: float = RETRY_DELAY
    heartbeat: float = HEARTBEAT


_RULES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "request_timeout": ("must be a positive number of seconds", lambda v: v > 0),
    "attempts": ("must be a whole number of tries, 1 or more", lambda v: v == int(v) and v >= 1),
    "retry_delay": ("must be a number of seconds, 0 or more", lambda v: v >= 0),
    "heartbeat": ("must be a positive number of seconds", lambda v: v > 0),
}


def settings(document: Any) -> Settings:
    """The document's settings, checked: raises InputError naming the first wrong key."""
    if not isinstance(document, dict):
        raise InputError("document", document, "must be an object", 'give {"operations": [...]}')
    if not isinstance(document.get("operations"), list):
        raise InputError(
            "operations",
            document.get("operations"),
            "must be a list",
            "give each object to make as one item of operations",
        )
    values: dict[str, Any] = {}
    for key, (rule, valid) in _RULES.items():
        if key not in document:
            continue
        value = document[key]
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not (number and math.isfinite(value) and valid(value)):
            raise InputError(key, value, rule, f"leave {key} out for the default, {_default(key)}")
        values[key] = int(value) if key == "attempts" else float(value)
    return Settings(**values)


def _default(key: str) -> str:
    return f"{getattr(Settings(), key):g}"


# --- the HTTP requests made, and a watchdog for the one in flight -----------------------------


@dataclass
class _Call:
    number: int
    method: str
    url: str
    started: float
    ended: float | None = None
    outcome: str = ""
    reported: int = 0  # "still waiting on" lines printed for it


@dataclass
class _Wait:
    what: str
    started: float
    status: str = "unknown"
    reported: int = 0  # "still waiting for" lines printed for it


def _seconds(value: float) -> str:
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}"


class Calls:
    """The HTTP requests made: the one in flight and the last one, as method, URL and timing
    (never headers or bodies: they hold tokens and passwords); and the wait for a state that
    runs, if any."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: _Call | None = None
        self._last: _Call | None = None
        self._wait: _Wait | None = None
        self.count = 0

    def start(self, method: str, url: str) -> _Call:
        with self._lock:
            self.count += 1
            call = _Call(self.count, method, url, time.monotonic())
            self._current = self._last = call
            return call

    def finish(self, call: _Call, outcome: str) -> None:
        with self._lock:
            call.ended = time.monotonic()
            call.outcome = outcome
            if self._current is call:
                self._current = None

    def wait(self, what: str | None, status: str = "unknown") -> None:
        """A wait for ``what`` runs (its object's status now ``status``); None: it has ended."""
        with self._lock:
            if what is None:
                self._wait = None
            elif self._wait is None or self._wait.what != what:
                self._wait = _Wait(what, time.monotonic(), status)
            else:
                self._wait.status = status

    def overdue(self, heartbeat: float) -> str | None:
        """A "still waiting" line when the request in flight, else the wait for a state, has run
        another ``heartbeat`` seconds."""
        now = time.monotonic()
        with self._lock:
            call = self._current
            if call is not None and now - call.started >= (call.reported + 1) * heartbeat:
                call.reported = int((now - call.started) // heartbeat)
                return (
                    f"still waiting on {call.method} {call.url} ({_seconds(now - call.started)} s)"
                )
            wait = self._wait
            if wait is not None and now - wait.started >= (wait.reported + 1) * heartbeat:
                wait.reported = int((now - wait.started) // heartbeat)
                elapsed = _seconds(now - wait.started)
                return f"still waiting for {wait.what} (status {wait.status}, {elapsed} s)"
            return None

    def describe(self, since: int) -> str:
        """The request in flight or the last one made after request number ``since``."""
        with self._lock:
            call = self._current or self._last
            if call is None or call.number <= since:
                return "no request made"
            if call.ended is None:
                elapsed = time.monotonic() - call.started
                return f"in flight: {call.method} {call.url} ({_seconds(elapsed)} s)"
            took = _seconds(call.ended - call.started)
            return f"last request: {call.method} {call.url} ({call.outcome} after {took} s)"


CALLS = Calls()


def _shown_url(url: Any, params: Any) -> str:
    text = str(url)
    if params and isinstance(params, dict | list | tuple):
        query = urllib.parse.urlencode(params, doseq=True)
        text = f"{text}{'&' if '?' in text else '?'}{query}"
    return text


def _instrument(conn: Any) -> None:
    """Record each HTTP request the connection makes, through requests' public
    ``Session.request`` (the requests.Session inside keystoneauth's session), and turn off
    openstacksdk's silent resend of a request after a lost connection: it resends POSTs too
    (a second network, server or rule when only the answer was lost). Retries are this
    script's: logged, and each looks for its object before making it."""
    auth_session = conn.session
    http = auth_session.session
    send = http.request
    auth_request = auth_session.request

    def request(method: Any, url: Any, *args: Any, **kwargs: Any) -> Any:
        call = CALLS.start(str(method).upper(), _shown_url(url, kwargs.get("params")))
        try:
            response = send(method, url, *args, **kwargs)
        except BaseException as err:
            CALLS.finish(call, type(err).__name__)
            raise
        CALLS.finish(call, f"answered {response.status_code}")
        return response

    def request_once(url: Any, method: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["connect_retries"] = 0
        return auth_request(url, method, *args, **kwargs)

    http.request = request
    auth_session.request = request_once


_OUTPUT = threading.Lock()


def say(line: str) -> None:
    """Print one line of the step's log, whole: the watchdog's thread prints too."""
    with _OUTPUT:
        sys.stdout.write(f"{line}\n")
        sys.stdout.flush()


def _watchdog(heartbeat: float) -> None:
    tick = min(1.0, max(0.05, heartbeat / 4))
    while True:
        time.sleep(tick)
        line = CALLS.overdue(heartbeat)
        if line:
            say(line)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _sdk_exceptions() -> Any:
    return importlib.import_module("openstack.exceptions")


def _retriable(err: BaseException | None) -> bool:
    """A lost connection, a request timeout (keystoneauth raises ConnectTimeout for a read
    timeout too) or an HTTP 502/503/504 answer, here or as the cause of a wrapping error."""
    ksa: Any = importlib.import_module("keystoneauth1.exceptions")
    sdk = _sdk_exceptions()
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, ksa.SSLError):
            return False  # a certificate does not get better by asking again
        if isinstance(err, ksa.RetriableConnectionFailure | ksa.ConnectionError):
            return True
        if isinstance(err, sdk.HttpException) and err.status_code in RETRIABLE_STATUS:
            return True
        if isinstance(err, ksa.HttpError) and err.http_status in RETRIABLE_STATUS:
            return True
        err = err.__cause__ or err.__context__
    return False


def _wait_for(
    what: str,
    seconds: float,
    status: Callable[[], str],
    done: Collection[str],
    failures: Collection[str] = (),
) -> str:
    """Poll ``status`` until it is in ``done``; ``what`` names the wait in its errors and in
    the "still waiting for" lines, as in "server demo-instance1 to become ACTIVE"."""
    deadline = time.monotonic() + seconds
    CALLS.wait(what)
    try:
        while True:
            current = status()
            CALLS.wait(what, current)
            if current in done:
                return current
            if current in failures:
                raise StateFailed(f"status {current} while waiting for {what}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise GaveUp(f"gave up after {seconds:g} s waiting for {what} (status {current})")
            time.sleep(min(POLL, left))
    finally:
        CALLS.wait(None)


def _timeout(op: dict[str, Any], default: float) -> float:
    return float(op.get("timeout", default))


def _domain_id(conn: Any, name: str) -> str:
    domain = conn.get_domain(name_or_id=name)
    if domain is None:
        raise LookupError(f"domain {name} does not exist")
    return str(domain.id)


def _project(conn: Any, op: dict[str, Any]) -> str:
    domain = _domain_id(conn, op.get("domain", DEFAULT_DOMAIN))
    if conn.get_project(op["name"], domain_id=domain) is not None:
        return "exists"
    conn.create_project(op["name"], domain_id=domain, description=op.get("description", ""))
    return "created"


def _domain(conn: Any, op: dict[str, Any]) -> str:
    if conn.get_domain(name_or_id=op["name"]) is not None:
        return "exists"
    conn.create_domain(op["name"], description=op.get("description", ""))
    return "created"


def _user(conn: Any, op: dict[str, Any]) -> str:
    domain = _domain_id(conn, op.get("domain", DEFAULT_DOMAIN))
    user = conn.get_user(op["name"], domain_id=domain)
    if user is not None:
        if op.get("password"):
            conn.update_user(user.id, password=op["password"])
            return "updated"
        return "exists"
    conn.create_user(
        op["name"],
        password=op.get("password"),
        email=op.get("email"),
        domain_id=domain,
    )
    return "created"


def _role(conn: Any, op: dict[str, Any]) -> str:
    if conn.get_role(op["name"]) is not None:
        return "exists"
    conn.create_role(op["name"])
    return "created"


def _role_assignment(conn: Any, op: dict[str, Any]) -> str:
    """A role for a user on a project (``domain``: theirs), or on a domain (``scope_domain``;
    the user in ``domain``), as heat's stack domain admin needs."""
    domain = _domain_id(conn, op.get("domain", DEFAULT_DOMAIN))
    user = conn.get_user(op["user"], domain_id=domain)
    if user is None:
        raise LookupError(f"user {op['user']} does not exist")
    if op.get("scope_domain"):
        scope = _domain_id(conn, op["scope_domain"])
        changed = conn.grant_role(op["role"], user=user.id, domain=scope)
        return "created" if changed else "exists"
    project = conn.get_project(op["project"], domain_id=domain)
    if project is None:
        raise LookupError(f"project {op['project']} does not exist")
    changed = conn.grant_role(op["role"], user=user.id, project=project.id)
    return "created" if changed else "exists"


def _service(conn: Any, op: dict[str, Any]) -> str:
    if conn.get_service(op["name"]) is not None:
        return "exists"
    conn.create_service(op["name"], type=op["type"], description=op.get("description", ""))
    return "created"


def _endpoint(conn: Any, op: dict[str, Any]) -> str:
    service = conn.get_service(op["service"])
    if service is None:
        raise LookupError(f"service {op['service']} does not exist")
    region = op.get("region", "RegionOne")
    for endpoint in conn.identity.endpoints(service_id=service.id, interface=op["interface"]):
        if endpoint.region_id == region:
            if endpoint.url == op["url"]:
                return "exists"
            conn.identity.update_endpoint(endpoint, url=op["url"])
            return "updated"
    conn.identity.create_endpoint(
        service_id=service.id, interface=op["interface"], url=op["url"], region_id=region
    )
    return "created"


def _image(conn: Any, op: dict[str, Any]) -> str:
    wait = _timeout(op, WAIT)
    image = conn.get_image(op["name"])
    if image is not None and image.status == "active":
        return "exists"
    if image is not None:  # an earlier run's upload that did not finish: upload it again
        conn.image.delete_image(image.id, ignore_missing=True)
        _wait_for(
            f"image {op['name']} to be deleted",
            max(wait, DELETE_WAIT),
            lambda: _status(conn.image.find_image(image.id)),
            done={"deleted"},
        )
    properties = dict(op.get("properties", {}))
    for key in ("kernel", "ramdisk"):
        if op.get(key):
            other = conn.get_image(op[key])
            if other is None:
                raise LookupError(f"image {op[key]} does not exist")
            properties[f"{key}_id"] = other.id
    image = conn.create_image(
        op["name"],
        filename=op["file"],
        disk_format=op.get("disk_format", "qcow2"),
        container_format=op.get("container_format", "bare"),
        visibility=op.get("visibility", "public"),
        wait=False,
        **properties,
    )
    _wait_for(
        f"image {op['name']} to become active",
        wait,
        lambda: _status(conn.image.find_image(image.id)),
        done={"active"},
        failures={"killed", "deleted"},
    )
    return "created"


# --- compute, networking, storage and orchestration objects -----------------------------------


def _found(value: Any, what: str) -> Any:
    if value is None:
        raise LookupError(f"{what} does not exist")
    return value


def _status(found: Any) -> str:
    """An object's status, or ``deleted`` when a look-up found none."""
    return "deleted" if found is None else str(found.status)


def _flavor(conn: Any, op: dict[str, Any]) -> str:
    if conn.get_flavor(op["name"]) is not None:
        return "exists"
    conn.create_flavor(
        op["name"],
        ram=int(op["ram"]),
        vcpus=int(op.get("vcpus", 1)),
        disk=int(op.get("disk", 0)),
        flavorid=str(op.get("id", "auto")),
        is_public=bool(op.get("public", True)),
    )
    return "created"


def _network(conn: Any, op: dict[str, Any]) -> str:
    if conn.network.find_network(op["name"]) is not None:
        return "exists"
    attrs: dict[str, Any] = {"name": op["name"]}
    for key, attr in (
        ("shared", "is_shared"),
        ("external", "is_router_external"),
        ("provider_network_type", "provider_network_type"),
        ("provider_physical_network", "provider_physical_network"),
    ):
        if key in op:
            attrs[attr] = op[key]
    conn.network.create_network(**attrs)
    return "created"


def _subnet(conn: Any, op: dict[str, Any]) -> str:
    network = _found(conn.network.find_network(op["network"]), f"network {op['network']}")
    if conn.network.find_subnet(op["name"], network_id=network.id) is not None:
        return "exists"
    attrs: dict[str, Any] = {
        "name": op["name"],
        "network_id": network.id,
        "ip_version": 4,
        "cidr": op["cidr"],
        "is_dhcp_enabled": bool(op.get("dhcp", True)),
    }
    if op.get("gateway"):
        attrs["gateway_ip"] = op["gateway"]
    if op.get("allocation_pools"):
        attrs["allocation_pools"] = op["allocation_pools"]
    if op.get("dns_nameservers"):
        attrs["dns_nameservers"] = op["dns_nameservers"]
    conn.network.create_subnet(**attrs)
    return "created"


def _router(conn: Any, op: dict[str, Any]) -> str:
    router = conn.network.find_router(op["name"])
    outcome = "exists"
    if router is None:
        router = conn.network.create_router(name=op["name"])
        outcome = "created"
    attached = {
        fixed["subnet_id"]
        for port in conn.network.ports(device_id=router.id)
        if port.device_owner == "network:router_interface"
        for fixed in port.fixed_ips
    }
    for name in op.get("interfaces", []):
        subnet = _found(conn.network.find_subnet(name), f"subnet {name}")
        if subnet.id not in attached:
            conn.network.add_interface_to_router(router, subnet_id=subnet.id)
            outcome = "created" if outcome == "created" else "updated"
    if op.get("external_gateway"):
        name = op["external_gateway"]
        network = _found(conn.network.find_network(name), f"network {name}")
        current = conn.network.get_router(router.id).external_gateway_info or {}
        if current.get("network_id") != network.id:
            conn.network.update_router(router, external_gateway_info={"network_id": network.id})
            outcome = "created" if outcome == "created" else "updated"
    _wait_for(
        f"router {op['name']} to become ACTIVE",
        _timeout(op, ROUTER_WAIT),
        lambda: _status(conn.network.find_router(router.id)),
        done={"ACTIVE"},
        failures={"ERROR"},
    )
    return outcome


def _security_group_rule(conn: Any, op: dict[str, Any]) -> str:
    name = op.get("group", "default")
    group = _found(
        conn.network.find_security_group(name, project_id=conn.current_project_id),
        f"security group {name}",
    )
    wanted = {
        "direction": "ingress",
        "ether_type": "IPv4",  # openstacksdk's name for the API's ethertype
        "protocol": op["protocol"],
        "port_range_min": op.get("port_min"),
        "port_range_max": op.get("port_max", op.get("port_min")),
        "remote_ip_prefix": op.get("remote", "0.0.0.0/0"),
    }
    for rule in conn.network.security_group_rules(security_group_id=group.id):
        if all(getattr(rule, key) == value for key, value in wanted.items()):
            return "exists"
    try:
        conn.network.create_security_group_rule(security_group_id=group.id, **wanted)
    except _sdk_exceptions().ConflictException:  # neutron's answer to the same rule twice:
        return "exists"  # an earlier try's request, whose answer was lost, made it
    return "created"


def _keypair(conn: Any, op: dict[str, Any]) -> str:
    if conn.compute.find_keypair(op["name"]) is not None:
        return "exists"
    public_key = Path(op["public_key_file"]).read_text().strip()
    conn.compute.create_keypair(name=op["name"], public_key=public_key)
    return "created"


def _server(conn: Any, op: dict[str, Any]) -> str:
    wait = _timeout(op, WAIT)
    server = conn.compute.find_server(op["name"])
    outcome = "exists"
    if server is not None and conn.compute.get_server(server.id).status == "ERROR":
        conn.compute.delete_server(server)  # a failed boot of an earlier run: boot it again
        _wait_for(
            f"server {op['name']} to be deleted",
            wait,
            lambda: _status(conn.compute.find_server(server.id)),
            done={"deleted", "DELETED"},
        )
        server = None
    if server is None:
        image = _found(conn.image.find_image(op["image"]), f"image {op['image']}")
        flavor = _found(conn.compute.find_flavor(op["flavor"]), f"flavor {op['flavor']}")
        network = _found(conn.network.find_network(op["network"]), f"network {op['network']}")
        attrs: dict[str, Any] = {
            "name": op["name"],
            "image_id": image.id,
            "flavor_id": flavor.id,
            "networks": [{"uuid": network.id}],
            "security_groups": [{"name": g} for g in op.get("security_groups", ["default"])],
        }
        if op.get("key_name"):
            attrs["key_name"] = op["key_name"]
        server = conn.compute.create_server(**attrs)
        outcome = "created"
    try:
        _wait_for(
            f"server {op['name']} to become ACTIVE",
            wait,
            lambda: _status(conn.compute.find_server(server.id)),
            done={"ACTIVE"},
            failures={"ERROR", "deleted"},
        )
    except StateFailed as err:
        fault = getattr(conn.compute.find_server(server.id), "fault", None) or {}
        raise StateFailed(f"{err}; fault: {fault.get('message', 'none')}") from None
    return outcome


def _floating_ip(conn: Any, op: dict[str, Any]) -> str:
    server = _found(conn.compute.find_server(op["server"]), f"server {op['server']}")
    network = _found(conn.network.find_network(op["network"]), f"network {op['network']}")
    ports = list(conn.network.ports(device_id=server.id))
    if not ports:
        raise LookupError(f"server {op['server']} has no port")
    for port in ports:
        if any(True for _ in conn.network.ips(port_id=port.id)):
            return "exists"
    # Created bound to its port in one request: a retry after a lost answer finds it above,
    # where an unbound address would be made a second time.
    try:
        conn.network.create_ip(floating_network_id=network.id, port_id=ports[0].id)
    except _sdk_exceptions().ConflictException:  # the port has an address: an earlier try's
        if not any(True for _ in conn.network.ips(port_id=ports[0].id)):  # request made it late
            raise
        return "exists"
    return "created"


def _volume(conn: Any, op: dict[str, Any]) -> str:
    """A volume that becomes available. A volume in ``error`` (the scheduler had no back end yet:
    a volume service that has just started reports its capacity a little later) is deleted and
    made again, up to ``attempts`` times."""
    volume = conn.block_storage.find_volume(op["name"])
    outcome = "exists"
    if volume is not None:
        status = conn.block_storage.get_volume(volume.id).status
        if status in ("available", "in-use"):
            return outcome
        if status == "error":
            _delete_volume(conn, volume)
            volume = None
    for attempt in range(int(op.get("attempts", 3))):
        if volume is None:
            volume = conn.block_storage.create_volume(name=op["name"], size=int(op["size"]))
            outcome = "created"
        try:
            _wait_for(
                f"volume {op['name']} to become available",
                _timeout(op, WAIT),
                _volume_status(conn, volume.id),
                done={"available", "in-use"},
                failures={"error", "deleted"},
            )
            return outcome
        except StateFailed as error:
            if _status(conn.block_storage.find_volume(volume.id)) != "error":
                raise
            say(f"volume {op['name']} went to error (try {attempt + 1}): {error}")
            _delete_volume(conn, volume)
            volume = None
            time.sleep(30)
    raise RuntimeError(f"volume {op['name']} went to error on every attempt")


def _volume_status(conn: Any, volume_id: str) -> Callable[[], str]:
    return lambda: _status(conn.block_storage.find_volume(volume_id))


def _delete_volume(conn: Any, volume: Any) -> None:
    conn.block_storage.delete_volume(volume, ignore_missing=True)
    _wait_for(
        f"volume {volume.name} to be deleted",
        DELETE_WAIT,
        lambda: _status(conn.block_storage.find_volume(volume.id)),
        done={"deleted"},
        failures={"error_deleting"},
    )


def _volume_attachment(conn: Any, op: dict[str, Any]) -> str:
    server = _found(conn.get_server(op["server"]), f"server {op['server']}")
    volume = _found(conn.get_volume(op["volume"]), f"volume {op['volume']}")
    if any(a.get("server_id") == server.id for a in volume.attachments or []):
        return "exists"
    if volume.status not in ("attaching", "reserved"):  # else an earlier try's attachment
        conn.attach_volume(server, volume, wait=False)
    _wait_for(
        f"volume {op['volume']} to be attached to server {op['server']}",
        _timeout(op, WAIT),
        lambda: _status(conn.block_storage.find_volume(volume.id)),
        done={"in-use"},
        failures={"error", "error_attaching", "available", "deleted"},
    )
    return "created"


def _object(conn: Any, op: dict[str, Any]) -> str:
    conn.object_store.create_container(name=op["container"])
    text = str(op.get("content", ""))
    data = Path(op["file"]).read_bytes() if op.get("file") else text.encode()
    conn.object_store.upload_object(container=op["container"], name=op["name"], data=data)
    return "created"


def _stack(conn: Any, op: dict[str, Any]) -> str:
    wait = _timeout(op, WAIT)
    stack = conn.orchestration.find_stack(op["name"])
    if stack is not None:
        stack = conn.orchestration.get_stack(stack.id)
        if stack.status == "CREATE_COMPLETE":
            return "exists"
        if stack.status.endswith("FAILED"):  # an earlier run's: make it again
            conn.orchestration.delete_stack(stack.id, ignore_missing=True)
            _wait_for(
                f"stack {op['name']} to be deleted",
                wait,
                lambda: _status(conn.orchestration.find_stack(stack.id)),
                done={"deleted", "DELETE_COMPLETE"},
                failures={"DELETE_FAILED"},
            )
            stack = None
    if stack is None:
        conn.create_stack(
            op["name"],
            template_file=op["template"],
            wait=False,
            rollback=False,
            **op.get("parameters", {}),
        )
    try:
        _wait_for(
            f"stack {op['name']} to become CREATE_COMPLETE",
            wait,
            lambda: _status(conn.orchestration.find_stack(op["name"])),
            done={"CREATE_COMPLETE"},
            failures={"CREATE_FAILED", "ROLLBACK_COMPLETE", "ROLLBACK_FAILED"},
        )
    except StateFailed as err:
        stack = conn.orchestration.find_stack(op["name"])
        raise StateFailed(f"{err}: {getattr(stack, 'status_reason', '')}") from None
    return "created"


_CONNECTIONS: dict[str, Any] = {}


def _connect(config: Settings) -> Any:
    """A connection from the ``OS_*`` environment whose requests time out and are recorded."""
    # Imported by name: mypy checks this file with and without openstacksdk installed.
    openstack: Any = importlib.import_module("openstack")
    conn = openstack.connect(api_timeout=config.request_timeout)
    _instrument(conn)
    return conn


def _credentials(path: str) -> dict[str, str]:
    """The ``export OS_...=value`` lines of an openrc file."""
    values = {}
    for line in Path(path).read_text().splitlines():
        text = line.strip()
        if text.startswith("export ") and "=" in text:
            key, _, value = text[len("export ") :].partition("=")
            values[key.strip()] = value.strip().strip("'\"")
    return values


def _connection(default: Any, op: dict[str, Any], config: Settings) -> Any:
    """The connection an operation runs with: its ``env`` file's credentials, else the default."""
    path = op.get("env")
    if not path:
        return default
    if path not in _CONNECTIONS:
        saved = dict(os.environ)
        try:
            for key in [key for key in os.environ if key.startswith("OS_")]:
                del os.environ[key]
            os.environ.update(_credentials(path))
            _CONNECTIONS[path] = _connect(config)
        finally:
            os.environ.clear()
            os.environ.update(saved)
    return _CONNECTIONS[path]


ACTIONS = {
    "domain": _domain,
    "project": _project,
    "user": _user,
    "role": _role,
    "role_assignment": _role_assignment,
    "service": _service,
    "endpoint": _endpoint,
    "image": _image,
    "flavor": _flavor,
    "network": _network,
    "subnet": _subnet,
    "router": _router,
    "security_group_rule": _security_group_rule,
    "keypair": _keypair,
    "server": _server,
    "floating_ip": _floating_ip,
    "volume": _volume,
    "volume_attachment": _volume_attachment,
    "object": _object,
    "stack": _stack,
}


def _describe(op: dict[str, Any]) -> str:
    if op["kind"] == "role_assignment":
        scope = op.get("scope_domain")
        on = f"domain {scope}" if scope else f"project {op['project']}"
        return f"role {op['role']} for user {op['user']} on {on}"
    if op["kind"] == "endpoint":
        return f"{op['interface']} endpoint of {op['service']}: {op['url']}"
    if op["kind"] == "security_group_rule":
        ports = f" {op['port_min']}" if op.get("port_min") is not None else ""
        return f"{op['protocol']}{ports} rule in security group {op.get('group', 'default')}"
    if op["kind"] == "floating_ip":
        return f"floating IP from {op['network']} for server {op['server']}"
    if op["kind"] == "volume_attachment":
        return f"volume {op['volume']} attached to server {op['server']}"
    if op["kind"] == "object":
        return f"object {op['container']}/{op['name']}"
    return f"{op['kind']} {op.get('name', '')}"


SKIPPED = "skipped"


def _once(conn: Any, op: dict[str, Any], config: Settings) -> str:
    target = _connection(conn, op, config)
    wanted = op.get("if_service")
    if wanted and not target.has_service(wanted):
        return SKIPPED
    return ACTIONS[op["kind"]](target, op)


def _run(conn: Any, op: dict[str, Any], config: Settings) -> str:
    """Run an operation, again after a retriable error, up to ``attempts`` times in all."""
    attempt = 1
    while True:
        try:
            return _once(conn, op, config)
        except Exception as err:
            if attempt >= config.attempts or not _retriable(err):
                raise
            attempt += 1
            say(
                f"retrying {_describe(op)} (try {attempt}/{config.attempts}) after "
                f"{type(err).__name__}: {_one_line(err)}"
            )
            time.sleep(config.retry_delay)


def main() -> int:
    try:
        document = json.load(sys.stdin)
        config = settings(document)
    except ValueError as err:
        text = f'error: <stdin>: not JSON: {_one_line(err)}\nhint: give {{"operations": [...]}}'
        print(text, file=sys.stderr)  # noqa: T201
        return 2
    except InputError as err:
        print(f"error: {_one_line(err)}\nhint: {err.hint}", file=sys.stderr)  # noqa: T201
        return 2
    threading.Thread(target=_watchdog, args=(config.heartbeat,), daemon=True).start()
    try:  # after reading stdin: importing openstacksdk is the slow part
        conn = _connect(config)
    except Exception as err:  # noqa: BLE001 - reported, then the step fails
        say(f"FAILED connecting: {type(err).__name__}: {_one_line(err)}")
        return 1
    for op in document["operations"]:
        made = CALLS.count
        try:
            outcome = _run(conn, op, config)
        except Exception as err:  # noqa: BLE001 - reported, then the step fails
            say(
                f"FAILED {_describe(op)}: {type(err).__name__}: {_one_line(err)}; "
                f"{CALLS.describe(made)}"
            )
            return 1
        if outcome == SKIPPED:
            wanted = op["if_service"]
            say(f"skipped {_describe(op)}: no {wanted} service in this cloud")
        else:
            say(f"{outcome} {_describe(op)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
