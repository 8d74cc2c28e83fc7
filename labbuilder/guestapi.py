#!/usr/bin/env python3
"""Runs *inside a lab node* on the install pipeline's fast path: creates a stage's OpenStack API
objects (projects, users, roles, services, endpoints, images) from one Python process.

Under software emulation every ``openstack`` CLI call pays 14-37 s of Python start-up; this
script pays it once. It reads ``{"operations": [...]}`` (JSON) on stdin, authenticates from the
``OS_*`` environment (an openrc file sourced first), and makes each object unless it exists:
re-running it is safe. It prints one line per operation and exits non-zero on the first error.
It uses only the standard library and openstacksdk (python3-openstacksdk), and must run on the
guest's Python, so labbuilder never imports it.
"""

from __future__ import annotations

import json
import sys
from typing import Any

DEFAULT_DOMAIN = "default"


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
    domain = _domain_id(conn, op.get("domain", DEFAULT_DOMAIN))
    project = conn.get_project(op["project"], domain_id=domain)
    user = conn.get_user(op["user"], domain_id=domain)
    if project is None or user is None:
        raise LookupError(f"project {op['project']} or user {op['user']} does not exist")
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
    image = conn.get_image(op["name"])
    if image is not None and image.status == "active":
        return "exists"
    if image is not None:
        conn.delete_image(image.id, wait=True)
    properties = dict(op.get("properties", {}))
    for key in ("kernel", "ramdisk"):
        if op.get(key):
            other = conn.get_image(op[key])
            if other is None:
                raise LookupError(f"image {op[key]} does not exist")
            properties[f"{key}_id"] = other.id
    conn.create_image(
        op["name"],
        filename=op["file"],
        disk_format=op.get("disk_format", "qcow2"),
        container_format=op.get("container_format", "bare"),
        visibility=op.get("visibility", "public"),
        wait=True,
        timeout=int(op.get("timeout", 900)),
        **properties,
    )
    return "created"


ACTIONS = {
    "domain": _domain,
    "project": _project,
    "user": _user,
    "role": _role,
    "role_assignment": _role_assignment,
    "service": _service,
    "endpoint": _endpoint,
    "image": _image,
}


def _describe(op: dict[str, Any]) -> str:
    if op["kind"] == "role_assignment":
        return f"role {op['role']} for user {op['user']} on project {op['project']}"
    if op["kind"] == "endpoint":
        return f"{op['interface']} endpoint of {op['service']}: {op['url']}"
    return f"{op['kind']} {op.get('name', '')}"


def main() -> int:
    document = json.load(sys.stdin)
    import openstack  # type: ignore[import-not-found]  # imported after reading stdin: the import is the slow part

    conn = openstack.connect()
    for op in document["operations"]:
        try:
            outcome = ACTIONS[op["kind"]](conn, op)
        except Exception as err:  # noqa: BLE001 - reported, then the step fails
            print(f"FAILED {_describe(op)}: {type(err).__name__}: {err}", flush=True)  # noqa: T201
            return 1
        print(f"{outcome} {_describe(op)}", flush=True)  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
