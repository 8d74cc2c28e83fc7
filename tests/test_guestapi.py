"""The fast path's in-guest API process (labbuilder/install/guest/guestapi.py), run for real on this host with
the guests' openstacksdk against a real HTTP server on 127.0.0.1 that plays keystone, neutron and
nova: requests that never answer, answers that are lost, 503s and slow requests, each asserted
on the exit status, the lines the step's log gets and the objects the cloud ends up with.

The fake cloud keeps its objects in memory; a test scripts faults for a method and path (each
fault is used by one request, in order): ``hang`` never answers and makes nothing, ``lost`` makes
the object and never answers, ``conflict`` makes it and answers 409 (as when an earlier request,
given up on, finished late), a number (``503``) answers with that status, ``slow`` answers after
``SLOW`` seconds. Names start with ``lbtestga-``; nothing outlives the test (the server and
every process are stopped at its end). openstacksdk and keystoneauth1 come from the test extra,
at the versions Debian 12's guests run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from labbuilder.install.guest import GUEST_API_SOURCE

SCRIPT = GUEST_API_SOURCE
PREFIX = "lbtestga-"
HANG = 30.0  # seconds a "hang" or "lost" request is held at most (the test ends it sooner)
SLOW = 2.0  # seconds a "slow" request takes
FAST = {"request_timeout": 1, "retry_delay": 0.1, "heartbeat": 30}  # the document's settings


class FakeCloud:
    """keystone (v3 password tokens), neutron (networks, ports, floating IPs, routers) and nova
    (servers) on one ThreadingHTTPServer; ``requests`` lists every (method, path) it was sent."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        self.bodies: list[tuple[str, str, Any]] = []
        self.faults: dict[tuple[str, str], list[str]] = {}
        self.networks: dict[str, dict[str, Any]] = {}
        self.ports: dict[str, dict[str, Any]] = {}
        self.floating_ips: dict[str, dict[str, Any]] = {}
        self.routers: dict[str, dict[str, Any]] = {}
        self.servers: dict[str, dict[str, Any]] = {}
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    # --- objects a test starts with -------------------------------------------------------

    def add_network(self, name: str, external: bool = False) -> dict[str, Any]:
        network = {
            "id": str(uuid.uuid4()),
            "name": name,
            "status": "ACTIVE",
            "router:external": external,
            "subnets": [],
            "admin_state_up": True,
        }
        self.networks[network["id"]] = network
        return network

    def add_server(self, name: str, network: dict[str, Any]) -> dict[str, Any]:
        server = {"id": str(uuid.uuid4()), "name": name, "status": "ACTIVE", "links": []}
        self.servers[server["id"]] = server
        port = {
            "id": str(uuid.uuid4()),
            "name": "",
            "network_id": network["id"],
            "device_id": server["id"],
            "device_owner": "compute:nova",
            "fixed_ips": [{"subnet_id": str(uuid.uuid4()), "ip_address": "10.0.0.5"}],
            "status": "ACTIVE",
        }
        self.ports[port["id"]] = port
        return server

    def add_router(self, name: str, status: str) -> dict[str, Any]:
        router = {"id": str(uuid.uuid4()), "name": name, "status": status}
        self.routers[router["id"]] = router
        return router

    def count(self, method: str, path: str) -> int:
        return sum(1 for request in self.requests if request == (method, path))

    # --- the HTTP side ----------------------------------------------------------------------

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        cloud = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self.serve("GET")

            def do_POST(self) -> None:
                self.serve("POST")

            def do_PUT(self) -> None:
                self.serve("PUT")

            def do_DELETE(self) -> None:
                self.serve("DELETE")

            def serve(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                parts = urlsplit(self.path)
                path = parts.path.rstrip("/") or "/"
                query = {key: values[0] for key, values in parse_qs(parts.query).items()}
                with cloud.lock:
                    cloud.requests.append((method, path))
                    cloud.bodies.append((method, path, body))
                    faults = cloud.faults.get((method, path), [])
                    fault = faults.pop(0) if faults else ""
                if fault == "hang":
                    cloud.release.wait(HANG)
                    return
                if fault.isdigit():
                    self.answer(int(fault), {"message": f"fault {fault}"})
                    return
                if fault == "slow":
                    time.sleep(SLOW)
                with cloud.lock:
                    status, answer, headers = cloud.route(method, path, query, body)
                if fault == "lost":
                    cloud.release.wait(HANG)
                    return
                if fault == "conflict":
                    self.answer(409, {"NeutronError": {"message": "made by an earlier request"}})
                    return
                self.answer(status, answer, headers)

            def answer(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
                data = json.dumps(body).encode() if body is not None else b""
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for key, value in (headers or {}).items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the client gave up on this request

        return Handler

    def route(
        self, method: str, path: str, query: dict[str, str], body: Any
    ) -> tuple[int, Any, dict[str, str]]:
        if path.startswith("/identity"):
            return self.identity(method, path.removeprefix("/identity"))
        if path.startswith("/network"):
            return self.network(method, path.removeprefix("/network"), query, body)
        if path.startswith("/compute"):
            return self.compute(path.removeprefix("/compute"), query)
        return 404, {"message": f"no {path}"}, {}

    def identity(self, method: str, path: str) -> tuple[int, Any, dict[str, str]]:
        if method == "GET" and path in ("/", "/v3"):
            version = {
                "id": "v3.14",
                "status": "stable",
                "updated": "2020-04-07T00:00:00Z",
                "links": [{"rel": "self", "href": f"{self.url}/identity/v3/"}],
                "media-types": [
                    {
                        "base": "application/json",
                        "type": "application/vnd.openstack.identity-v3+json",
                    }
                ],
            }
            return 200, {"version": version}, {}
        if method == "POST" and path == "/v3/auth/tokens":
            return 201, {"token": self.token()}, {"X-Subject-Token": "lbtestga-token"}
        return 404, {"error": {"message": "not found"}}, {}

    def token(self) -> dict[str, Any]:
        def service(kind: str, name: str, url: str) -> dict[str, Any]:
            endpoint = {
                "id": uuid.uuid4().hex,
                "interface": "public",
                "region": "RegionOne",
                "region_id": "RegionOne",
                "url": url,
            }
            return {"id": uuid.uuid4().hex, "type": kind, "name": name, "endpoints": [endpoint]}

        domain = {"id": "default", "name": "Default"}
        return {
            "methods": ["password"],
            "expires_at": "2099-01-01T00:00:00.000000Z",
            "issued_at": "2026-01-01T00:00:00.000000Z",
            "user": {"id": "u1", "name": "admin", "domain": domain, "password_expires_at": None},
            "project": {"id": "p1", "name": "admin", "domain": domain},
            "roles": [{"id": "r1", "name": "admin"}],
            "catalog": [
                service("identity", "keystone", f"{self.url}/identity/v3"),
                service("network", "neutron", f"{self.url}/network"),
                service("compute", "nova", f"{self.url}/compute/v2.1"),
            ],
        }

    def network(
        self, method: str, path: str, query: dict[str, str], body: Any
    ) -> tuple[int, Any, dict[str, str]]:
        if path == "/":
            link = {"rel": "self", "href": f"{self.url}/network/v2.0/"}
            return 200, {"versions": [{"id": "v2.0", "status": "CURRENT", "links": [link]}]}, {}
        tables = {
            "networks": ("network", self.networks),
            "ports": ("port", self.ports),
            "floatingips": ("floatingip", self.floating_ips),
            "routers": ("router", self.routers),
        }
        match = re.fullmatch(r"/v2\.0/(\w+)(?:/([^/]+))?", path)
        if match is None or match.group(1) not in tables:
            return 404, {"NeutronError": {"message": f"no {path}"}}, {}
        single, table = tables[match.group(1)]
        if match.group(2):
            found = table.get(match.group(2))
            if found is None:
                return 404, {"NeutronError": {"message": f"{single} not found"}}, {}
            return 200, {single: found}, {}
        if method == "POST":
            made = {"id": str(uuid.uuid4()), "status": "ACTIVE", **body[single]}
            if single == "floatingip":
                made["floating_ip_address"] = f"203.0.113.{len(table) + 10}"
            table[made["id"]] = made
            return 201, {single: made}, {}
        rows = [
            row for row in table.values() if all(str(row.get(k)) == v for k, v in query.items())
        ]
        return 200, {match.group(1): rows}, {}

    def compute(self, path: str, query: dict[str, str]) -> tuple[int, Any, dict[str, str]]:
        if path in ("", "/", "/v2.1"):
            link = {"rel": "self", "href": f"{self.url}/compute/v2.1/"}
            version = {
                "id": "v2.1",
                "status": "CURRENT",
                "version": "2.93",
                "min_version": "2.1",
                "updated": "2013-07-23T11:33:21Z",
                "links": [link],
            }
            return 200, {"version": version}, {}
        match = re.fullmatch(r"/v2\.1/servers(?:/([^/]+))?", path)
        if match is None:
            return 404, {"itemNotFound": {"message": f"no {path}"}}, {}
        if match.group(1) and match.group(1) != "detail":
            found = self.servers.get(match.group(1))
            if found is None:
                return 404, {"itemNotFound": {"message": "server not found"}}, {}
            return 200, {"server": found}, {}
        wanted = query.get("name")
        rows = [s for s in self.servers.values() if wanted is None or re.search(wanted, s["name"])]
        return 200, {"servers": rows}, {}


@pytest.fixture
def cloud() -> Iterator[FakeCloud]:
    fake = FakeCloud()
    fake.thread.start()
    try:
        yield fake
    finally:
        fake.release.set()
        fake.server.shutdown()
        fake.server.server_close()


def run_guestapi(
    cloud: FakeCloud, document: dict[str, Any] | str, tmp_path: Path, timeout: float = 60
) -> tuple[int, str, str, float]:
    """Run guestapi.py with the venv's Python and openstacksdk on ``document`` (JSON, or text
    as it is): exit status, stdout, stderr and seconds taken."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OS_")}
    for key in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        env.pop(key, None)
    env.update(
        HOME=str(tmp_path),  # no clouds.yaml of this host's user
        NO_PROXY="127.0.0.1",
        OS_AUTH_URL=f"{cloud.url}/identity/v3",
        OS_IDENTITY_API_VERSION="3",
        OS_USERNAME="admin",
        OS_PASSWORD="lbtestga-secret",
        OS_PROJECT_NAME="admin",
        OS_USER_DOMAIN_NAME="Default",
        OS_PROJECT_DOMAIN_NAME="Default",
        OS_REGION_NAME="RegionOne",
        OS_INTERFACE="public",
    )
    started = time.monotonic()
    with subprocess.Popen(
        [sys.executable, str(SCRIPT)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
    ) as process:
        try:
            out, err = process.communicate(
                document if isinstance(document, str) else json.dumps(document), timeout=timeout
            )
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    return process.returncode, out, err, time.monotonic() - started


def document(*operations: dict[str, Any], **settings: Any) -> dict[str, Any]:
    return {**FAST, **settings, "operations": list(operations)}


NETWORK = {"kind": "network", "name": f"{PREFIX}net"}


def test_a_request_that_never_answers_is_retried_then_fails_naming_it(
    cloud: FakeCloud, tmp_path: Path
) -> None:
    cloud.faults[("POST", "/network/v2.0/networks")] = ["hang"] * 2
    rc, out, err, seconds = run_guestapi(cloud, document(NETWORK, attempts=2), tmp_path)
    assert rc == 1, out + err
    retry, failed = out.splitlines()
    assert retry.startswith(f"retrying network {PREFIX}net (try 2/2) after ConnectTimeout: "), out
    assert failed.startswith(f"FAILED network {PREFIX}net: ConnectTimeout: "), out
    in_flight = rf"; last request: POST {re.escape(cloud.url)}/network/v2\.0/networks \(ReadTimeout after 1\.\d s\)"
    assert re.search(in_flight + "$", failed), out
    assert cloud.count("POST", "/network/v2.0/networks") == 2  # one each try, no silent resend
    assert not cloud.networks  # nothing was made
    assert 2 <= seconds < 15  # two 1 s timeouts, a 0.1 s pause and Python's start


def test_an_operation_with_its_own_credentials_has_the_same_deadline(
    cloud: FakeCloud, tmp_path: Path
) -> None:
    openrc = tmp_path / "demo-openrc"
    openrc.write_text(
        f"export OS_AUTH_URL={cloud.url}/identity/v3\nexport OS_USERNAME=demo\n"
        "export OS_PASSWORD='lbtestga-demo'\nexport OS_PROJECT_NAME=demo\n"
        "export OS_USER_DOMAIN_NAME=Default\nexport OS_PROJECT_DOMAIN_NAME=Default\n"
        "export OS_IDENTITY_API_VERSION=3\n"
    )
    cloud.faults[("POST", "/network/v2.0/networks")] = ["hang"]
    operation = {**NETWORK, "env": str(openrc)}
    rc, out, err, seconds = run_guestapi(cloud, document(operation), tmp_path)
    assert rc == 0, out + err
    assert out.splitlines()[1:] == [f"created network {PREFIX}net"], out
    assert out.startswith(f"retrying network {PREFIX}net (try 2/3) after ConnectTimeout: "), out
    tokens = [body for method, path, body in cloud.bodies if path == "/identity/v3/auth/tokens"]
    assert [t["auth"]["identity"]["password"]["user"]["name"] for t in tokens] == ["demo"]
    assert seconds < 15  # the hung request ended after request_timeout (1 s), not HANG (30 s)


def test_a_503_is_retried_and_the_operation_succeeds(cloud: FakeCloud, tmp_path: Path) -> None:
    cloud.faults[("POST", "/network/v2.0/networks")] = ["503"]
    rc, out, err, _ = run_guestapi(cloud, document(NETWORK), tmp_path)
    assert rc == 0, out + err
    assert out.splitlines() == [
        f"retrying network {PREFIX}net (try 2/3) after HttpException: HttpException: 503: "
        f"Server Error for url: {cloud.url}/network/v2.0/networks, fault 503",
        f"created network {PREFIX}net",
    ], out
    assert cloud.count("POST", "/network/v2.0/networks") == 2
    assert [n["name"] for n in cloud.networks.values()] == [f"{PREFIX}net"]


def test_a_client_error_is_not_retried(cloud: FakeCloud, tmp_path: Path) -> None:
    cloud.faults[("POST", "/network/v2.0/networks")] = ["400"]
    rc, out, err, _ = run_guestapi(
        cloud, document(NETWORK, {"kind": "network", "name": f"{PREFIX}other"}), tmp_path
    )
    assert rc == 1, out + err
    assert out.splitlines()[0].startswith(f"FAILED network {PREFIX}net: BadRequestException: "), out
    assert f"last request: POST {cloud.url}/network/v2.0/networks (answered 400 after " in out
    assert len(out.splitlines()) == 1, out  # no retry, and the next operation never ran
    assert cloud.count("POST", "/network/v2.0/networks") == 1


def test_a_floating_ip_whose_answer_is_lost_is_made_once(cloud: FakeCloud, tmp_path: Path) -> None:
    external = cloud.add_network(f"{PREFIX}ext", external=True)
    server = cloud.add_server(f"{PREFIX}vm", cloud.add_network(f"{PREFIX}int"))
    (port,) = cloud.ports.values()
    cloud.faults[("POST", "/network/v2.0/floatingips")] = ["lost"]
    operation = {"kind": "floating_ip", "network": f"{PREFIX}ext", "server": server["name"]}
    rc, out, err, _ = run_guestapi(cloud, document(operation), tmp_path)
    assert rc == 0, out + err
    what = f"floating IP from {PREFIX}ext for server {PREFIX}vm"
    lines = out.splitlines()
    assert lines[0].startswith(f"retrying {what} (try 2/3) after ConnectTimeout: "), out
    assert lines[1:] == [f"exists {what}"], out
    assert cloud.count("POST", "/network/v2.0/floatingips") == 1
    (address,) = cloud.floating_ips.values()  # one address, bound to the server's port
    assert address["port_id"] == port["id"]
    assert address["floating_network_id"] == external["id"]
    assert not [r for r in cloud.requests if r[0] == "PUT"]


def test_a_floating_ip_made_late_by_an_earlier_request_is_taken(
    cloud: FakeCloud, tmp_path: Path
) -> None:
    cloud.add_network(f"{PREFIX}ext", external=True)
    server = cloud.add_server(f"{PREFIX}vm", cloud.add_network(f"{PREFIX}int"))
    cloud.faults[("POST", "/network/v2.0/floatingips")] = ["conflict"]
    operation = {"kind": "floating_ip", "network": f"{PREFIX}ext", "server": server["name"]}
    rc, out, err, _ = run_guestapi(cloud, document(operation), tmp_path)
    assert rc == 0, out + err
    assert out.splitlines() == [f"exists floating IP from {PREFIX}ext for server {PREFIX}vm"], out
    assert len(cloud.floating_ips) == 1


def test_a_slow_request_is_shown_while_it_runs(cloud: FakeCloud, tmp_path: Path) -> None:
    cloud.faults[("POST", "/network/v2.0/networks")] = ["slow"]
    settings = {"heartbeat": 0.5, "request_timeout": 20}
    rc, out, err, _ = run_guestapi(cloud, document(NETWORK, **settings), tmp_path)
    assert rc == 0, out + err
    lines = out.splitlines()
    waiting = re.compile(
        rf"still waiting on POST {re.escape(cloud.url)}/network/v2\.0/networks \((\d+\.\d) s\)"
    )
    shown = [float(m.group(1)) for m in map(waiting.fullmatch, lines[:-1]) if m]
    assert len(shown) == len(lines) - 1 >= 2, out  # nothing else before the result
    assert shown == sorted(shown) and shown[0] >= 0.5 and shown[-1] < SLOW + 1, out
    assert lines[-1] == f"created network {PREFIX}net", out
    assert "lbtestga-secret" not in out + err and "lbtestga-token" not in out + err


def test_a_wait_for_a_state_is_shown_and_gives_up_saying_what_it_waited_for(
    cloud: FakeCloud, tmp_path: Path
) -> None:
    router = cloud.add_router(f"{PREFIX}router", "BUILD")
    operation = {"kind": "router", "name": f"{PREFIX}router", "timeout": 1.5}
    rc, out, err, seconds = run_guestapi(cloud, document(operation, heartbeat=0.5), tmp_path)
    assert rc == 1, out + err
    *waiting, failed = out.splitlines()
    shown = [
        re.fullmatch(
            rf"still waiting for router {PREFIX}router to become ACTIVE \(status BUILD, (\d\.\d) s\)",
            line,
        )
        for line in waiting
    ]
    assert len(shown) >= 2 and all(shown), out
    assert re.fullmatch(
        rf"FAILED router {PREFIX}router: GaveUp: gave up after 1.5 s waiting for router "
        rf"{PREFIX}router to become ACTIVE \(status BUILD\); last request: GET "
        rf"{re.escape(cloud.url)}/network/v2\.0/routers/{router['id']} \(answered 200 after "
        r"\d+\.\d s\)",
        failed,
    ), out
    assert cloud.count("GET", f"/network/v2.0/routers/{router['id']}") == 2  # at 0 s and 1.5 s
    assert seconds < 15


HINTS = {"request_timeout": "180", "attempts": "3", "retry_delay": "5", "heartbeat": "30"}


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"request_timeout": -1}, "request_timeout = -1 must be a positive number of seconds"),
        ({"request_timeout": 0}, "request_timeout = 0 must be a positive number of seconds"),
        ({"request_timeout": "30"}, 'request_timeout = "30" must be a positive number of seconds'),
        ({"request_timeout": True}, "request_timeout = true must be a positive number of seconds"),
        (
            {"request_timeout": float("inf")},
            "request_timeout = Infinity must be a positive number of seconds",
        ),
        ({"attempts": 0}, "attempts = 0 must be a whole number of tries, 1 or more"),
        ({"attempts": 2.5}, "attempts = 2.5 must be a whole number of tries, 1 or more"),
        ({"heartbeat": None}, "heartbeat = null must be a positive number of seconds"),
        ({"retry_delay": -0.5}, "retry_delay = -0.5 must be a number of seconds, 0 or more"),
    ],
)
def test_bad_settings_are_rejected_before_any_request(
    cloud: FakeCloud, tmp_path: Path, settings: dict[str, Any], message: str
) -> None:
    rc, out, err, _ = run_guestapi(cloud, document(NETWORK, **settings), tmp_path)
    assert rc == 2, out + err
    (key,) = settings
    assert err.splitlines() == [
        f"error: <stdin>: {message}",
        f"hint: leave {key} out for the default, {HINTS[key]}",
    ], err
    assert out == ""
    assert cloud.requests == []


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("operations: []", "error: <stdin>: not JSON: Expecting value: line 1 column 1 (char 0)"),
        ("[]", "error: <stdin>: document = [] must be an object"),
        ('{"operations": {}}', "error: <stdin>: operations = {} must be a list"),
    ],
)
def test_a_document_of_the_wrong_shape_is_rejected(
    cloud: FakeCloud, tmp_path: Path, text: str, error: str
) -> None:
    rc, out, err, _ = run_guestapi(cloud, text, tmp_path)
    assert rc == 2, out + err
    assert err.splitlines()[0] == error, err
    assert err.splitlines()[1].startswith("hint: "), err
    assert cloud.requests == []


def test_calls_of_one_look_share_one_token_per_credentials(
    cloud: FakeCloud, tmp_path: Path
) -> None:
    """The warm Python's calls with LABBUILDER_SHARED_TOKENS set (a board's look: a node's
    checks at once) ask keystone for one token per set of credentials and share it through a
    private folder, and read each service's version document once; without it, each call asks
    for its own."""
    from labbuilder.install.guest import WARM_PYTHON_SOURCE

    cloud.add_network(f"{PREFIX}shared")
    code = "import openstack; c = openstack.connect(); print(len(list(c.network.networks())))"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OS_")}
    for key in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        env.pop(key, None)
    env.update(
        HOME=str(tmp_path), NO_PROXY="127.0.0.1", OS_AUTH_URL=f"{cloud.url}/identity/v3",
        OS_IDENTITY_API_VERSION="3", OS_USERNAME="demo", OS_PASSWORD="lbtestga-secret",
        OS_PROJECT_NAME="demo", OS_USER_DOMAIN_NAME="Default", OS_PROJECT_DOMAIN_NAME="Default",
        OS_REGION_NAME="RegionOne", OS_INTERFACE="public",
        # no server (its module cannot be imported): each call runs in its own process
        WARMPYTHON_DIR=str(tmp_path / "warm"), WARMPYTHON_PRELOAD="lbtestga_no_such_module",
    )  # fmt: skip

    def tokens_asked(extra: dict[str, str], calls: int) -> int:
        before = sum(1 for _, path, _ in cloud.bodies if path.endswith("/auth/tokens"))
        for _ in range(calls):
            done = subprocess.run(
                [sys.executable, str(WARM_PYTHON_SOURCE), "-c", code],
                env={**env, **extra}, capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip
            assert done.returncode == 0 and done.stdout.strip() == "1", done.stderr
        return sum(1 for _, path, _ in cloud.bodies if path.endswith("/auth/tokens")) - before

    def asked(extra: dict[str, str], calls: int) -> tuple[int, list[tuple[str, str]]]:
        """Tokens asked, and the other requests made."""
        before = len(cloud.requests)
        tokens = tokens_asked(extra, calls)
        return tokens, [r for r in cloud.requests[before:] if not r[1].endswith("/auth/tokens")]

    alone, requests = asked({}, 3)
    assert alone == 3
    listed = ("GET", "/network/v2.0/networks")
    versions = [r for r in requests if r != listed]
    assert requests.count(listed) == 3 and versions and len(versions) % 3 == 0, requests
    shared = tmp_path / "tokens"
    shared.mkdir(mode=0o700)
    # and the services' version documents: each read once
    together, requests = asked({"LABBUILDER_SHARED_TOKENS": str(shared)}, 3)
    assert together == 1
    assert requests.count(listed) == 3 and len(requests) == 3 + len(versions) // 3, requests
    kept = [p for p in shared.iterdir() if not p.name.endswith(".lock")]
    assert len(kept) == 1 + len(versions) // 3, kept
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in kept)
    # other credentials: a token of their own
    assert tokens_asked({"LABBUILDER_SHARED_TOKENS": str(shared), "OS_USERNAME": "admin"}, 2) == 1
