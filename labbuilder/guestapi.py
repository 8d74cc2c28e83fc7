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
operation and exits non-zero on the first error. It uses only the standard library and
openstacksdk (python3-openstacksdk), and must run on the guest's Python, so labbuilder never
imports it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_DOMAIN = "default"
WAIT = 900  # seconds to wait for a server, volume or stack unless the operation says


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


# --- compute, networking, storage and orchestration objects -----------------------------------


def _found(value: Any, what: str) -> Any:
    if value is None:
        raise LookupError(f"{what} does not exist")
    return value


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
    conn.network.create_security_group_rule(security_group_id=group.id, **wanted)
    return "created"


def _keypair(conn: Any, op: dict[str, Any]) -> str:
    if conn.compute.find_keypair(op["name"]) is not None:
        return "exists"
    public_key = Path(op["public_key_file"]).read_text().strip()
    conn.compute.create_keypair(name=op["name"], public_key=public_key)
    return "created"


def _server(conn: Any, op: dict[str, Any]) -> str:
    wait = int(op.get("timeout", WAIT))
    server = conn.compute.find_server(op["name"])
    outcome = "exists"
    if server is not None and conn.compute.get_server(server.id).status == "ERROR":
        conn.compute.delete_server(server)  # a failed boot of an earlier run: boot it again
        conn.compute.wait_for_delete(server, wait=wait)
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
        conn.compute.wait_for_server(
            server, status="ACTIVE", failures=["ERROR"], interval=5, wait=wait
        )
    except Exception as err:
        fault = getattr(conn.compute.get_server(server.id), "fault", None) or {}
        raise RuntimeError(f"{err}; fault: {fault.get('message', 'none')}") from None
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
    address = conn.network.create_ip(floating_network_id=network.id)
    conn.network.update_ip(address, port_id=ports[0].id)
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
            conn.block_storage.wait_for_status(
                volume,
                status="available",
                failures=["error"],
                interval=5,
                wait=int(op.get("timeout", WAIT)),
            )
            return outcome
        except Exception as error:  # openstacksdk's ResourceFailure: the volume went to error
            if conn.block_storage.get_volume(volume.id).status != "error":
                raise
            print(f"volume {op['name']} went to error (try {attempt + 1}): {error}", flush=True)  # noqa: T201
            _delete_volume(conn, volume)
            volume = None
            time.sleep(30)
    raise RuntimeError(f"volume {op['name']} went to error on every attempt")


def _delete_volume(conn: Any, volume: Any) -> None:
    conn.block_storage.delete_volume(volume)
    conn.block_storage.wait_for_delete(volume, interval=5, wait=300)


def _volume_attachment(conn: Any, op: dict[str, Any]) -> str:
    server = _found(conn.get_server(op["server"]), f"server {op['server']}")
    volume = _found(conn.get_volume(op["volume"]), f"volume {op['volume']}")
    if any(a.get("server_id") == server.id for a in volume.attachments or []):
        return "exists"
    conn.attach_volume(server, volume, wait=True, timeout=int(op.get("timeout", WAIT)))
    return "created"


def _object(conn: Any, op: dict[str, Any]) -> str:
    conn.object_store.create_container(name=op["container"])
    text = str(op.get("content", ""))
    data = Path(op["file"]).read_bytes() if op.get("file") else text.encode()
    conn.object_store.upload_object(container=op["container"], name=op["name"], data=data)
    return "created"


def _stack(conn: Any, op: dict[str, Any]) -> str:
    wait = int(op.get("timeout", WAIT))
    stack = conn.orchestration.find_stack(op["name"])
    if stack is not None:
        stack = conn.orchestration.get_stack(stack.id)
        if stack.status == "CREATE_COMPLETE":
            return "exists"
        if stack.status.endswith("FAILED"):  # an earlier run's: make it again
            conn.delete_stack(stack.id, wait=True)
            stack = None
    if stack is None:
        conn.create_stack(
            op["name"],
            template_file=op["template"],
            wait=False,
            rollback=False,
            **op.get("parameters", {}),
        )
    deadline = time.monotonic() + wait
    while True:
        stack = conn.orchestration.find_stack(op["name"])
        status = stack.status if stack is not None else "missing"
        if status == "CREATE_COMPLETE":
            return "created"
        if status.endswith("FAILED") or time.monotonic() > deadline:
            reason = getattr(stack, "status_reason", "") if stack is not None else ""
            raise RuntimeError(f"stack {op['name']} is {status}: {reason}")
        time.sleep(5)


_CONNECTIONS: dict[str, Any] = {}


def _connect() -> Any:
    import openstack  # type: ignore[import-not-found]

    return openstack.connect()


def _credentials(path: str) -> dict[str, str]:
    """The ``export OS_...=value`` lines of an openrc file."""
    values = {}
    for line in Path(path).read_text().splitlines():
        text = line.strip()
        if text.startswith("export ") and "=" in text:
            key, _, value = text[len("export ") :].partition("=")
            values[key.strip()] = value.strip().strip("'\"")
    return values


def _connection(default: Any, op: dict[str, Any]) -> Any:
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
            _CONNECTIONS[path] = _connect()
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


def main() -> int:
    document = json.load(sys.stdin)
    conn = _connect()  # after reading stdin: importing openstacksdk is the slow part
    for op in document["operations"]:
        try:
            target = _connection(conn, op)
            wanted = op.get("if_service")
            if wanted and not target.has_service(wanted):
                print(f"skipped {_describe(op)}: no {wanted} service in this cloud", flush=True)  # noqa: T201
                continue
            outcome = ACTIONS[op["kind"]](target, op)
        except Exception as err:  # noqa: BLE001 - reported, then the step fails
            print(f"FAILED {_describe(op)}: {type(err).__name__}: {err}", flush=True)  # noqa: T201
            return 1
        print(f"{outcome} {_describe(op)}", flush=True)  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
