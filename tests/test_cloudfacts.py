"""What ``labbuilder verify`` reads of a cloud (labbuilder/install/guest/cloudfacts.py), run for
real on this host with the guests' openstacksdk against a real HTTP server on 127.0.0.1 that
plays keystone, glance, nova, neutron, cinder and swift (test_guestapi.py's fake cloud, with the
catalog and calls of a five-node lab). Nothing outlives the test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_guestapi import FakeCloud

from labbuilder.install.guest import CLOUD_FACTS_SOURCE


class FiveNodeCloud(FakeCloud):
    """The fake cloud with an image, a flavor, a hypervisor, neutron's extensions, and with or
    without cinder (its pools and services) and swift (its proxy's /info)."""

    def __init__(self, *, volume: bool, objects: bool, backup: bool = False) -> None:
        super().__init__()
        self.volume, self.objects, self.backup = volume, objects, backup
        self.image = {"id": str(uuid.uuid4()), "name": "lbtest-image", "status": "active"}
        self.flavor = {"id": "5", "name": "lbtest.tiny", "ram": 64, "vcpus": 1, "disk": 1}
        self.external = self.add_network("ext-net", external=True)

    def kinds(self) -> list[tuple[str, str, str]]:
        listed = [
            ("identity", "keystone", f"{self.url}/identity/v3"),
            ("image", "glance", f"{self.url}/image"),
            ("compute", "nova", f"{self.url}/compute/v2.1"),
            ("network", "neutron", f"{self.url}/network"),
        ]
        if self.volume:
            listed.append(("volumev3", "cinderv3", f"{self.url}/volume/v3/p1"))
        if self.objects:
            listed.append(("object-store", "swift", f"{self.url}/object/v1/AUTH_p1"))
        return listed

    def token(self) -> dict[str, Any]:
        token = super().token()
        token["catalog"] = [
            {
                "id": uuid.uuid4().hex,
                "type": kind,
                "name": name,
                "endpoints": [
                    {
                        "id": uuid.uuid4().hex,
                        "interface": "public",
                        "region": "RegionOne",
                        "region_id": "RegionOne",
                        "url": url,
                    }  # fmt: skip
                ],
            }
            for kind, name, url in self.kinds()
        ]
        return token

    def route(
        self, method: str, path: str, query: dict[str, str], body: Any
    ) -> tuple[int, Any, dict[str, str]]:
        if path == "/identity/v3/services":
            services = [
                {"id": uuid.uuid4().hex, "type": kind, "name": name, "enabled": True}
                for kind, name, _ in self.kinds()
            ]
            return 200, {"services": services}, {}
        if path.startswith("/image"):
            return self.glance(path.removeprefix("/image"), query)
        if path == "/compute/v2.1/flavors/detail":
            return 200, {"flavors": [self.flavor]}, {}
        if path.startswith("/compute/v2.1/flavors/"):
            if path.rsplit("/", 1)[1] == self.flavor["id"]:
                return 200, {"flavor": self.flavor}, {}
            return 404, {"itemNotFound": {"message": "flavor not found"}}, {}
        if path == "/compute/v2.1/os-hypervisors/detail":
            hypervisor = {"id": "1", "hypervisor_hostname": "compute1", "state": "up",
                          "status": "enabled"}  # fmt: skip
            return 200, {"hypervisors": [hypervisor]}, {}
        if path == "/network/v2.0/extensions":
            aliases = ("router", "external-net", "security-group", "agent")
            return 200, {"extensions": [{"alias": a, "name": a} for a in aliases]}, {}
        if self.volume and path.startswith("/volume"):
            return self.cinder(path.removeprefix("/volume"))
        if self.objects and path == "/info":
            return 200, {"swift": {"version": "2.30.0"}, "tempurl": {}, "slo": {}}, {}
        return super().route(method, path, query, body)

    def glance(self, path: str, query: dict[str, str]) -> tuple[int, Any, dict[str, str]]:
        if path in ("", "/"):
            link = {"rel": "self", "href": f"{self.url}/image/v2/"}
            return 200, {"versions": [{"id": "v2.16", "status": "CURRENT", "links": [link]}]}, {}
        if path == "/v2/images":
            wanted = query.get("name")
            rows = [self.image] if wanted in (None, self.image["name"]) else []
            return 200, {"images": rows}, {}
        if path.startswith("/v2/images/") and path.rsplit("/", 1)[1] == self.image["id"]:
            return 200, self.image, {}
        return 404, {"message": f"no {path}"}, {}

    def cinder(self, path: str) -> tuple[int, Any, dict[str, str]]:
        if path in ("", "/", "/v3", "/v3/p1"):
            link = {"rel": "self", "href": f"{self.url}/volume/v3/"}
            version = {"id": "v3.0", "status": "CURRENT", "version": "3.70",
                       "min_version": "3.0", "links": [link]}  # fmt: skip
            return 200, {"versions": [version]}, {}
        if path == "/v3/p1/scheduler-stats/get_pools":
            pool = {"name": "block1@lvm#LVM", "capabilities": {"volume_backend_name": "LVM"}}
            return 200, {"pools": [pool]}, {}
        if path == "/v3/p1/os-services":
            services = [{"binary": "cinder-volume", "host": "block1@lvm", "state": "up"}]
            if self.backup:
                services.append({"binary": "cinder-backup", "host": "block1", "state": "up"})
            services.append({"binary": "cinder-backup", "host": "old", "state": "down"})
            return 200, {"services": services}, {}
        return 404, {"message": f"no {path}"}, {}


@pytest.fixture
def serve() -> Iterator[list[FakeCloud]]:
    started: list[FakeCloud] = []
    try:
        yield started
    finally:
        for fake in started:
            fake.release.set()
            fake.server.shutdown()
            fake.server.server_close()


def facts(cloud: FiveNodeCloud, serve: list[FakeCloud], tmp_path: Path) -> dict[str, Any]:
    serve.append(cloud)
    cloud.thread.start()
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("OS_") and "proxy" not in k.lower()
    }
    env.update(
        HOME=str(tmp_path), NO_PROXY="127.0.0.1", OS_AUTH_URL=f"{cloud.url}/identity/v3",
        OS_IDENTITY_API_VERSION="3", OS_USERNAME="admin", OS_PASSWORD="lbtestcf-secret",
        OS_PROJECT_NAME="admin", OS_USER_DOMAIN_NAME="Default", OS_PROJECT_DOMAIN_NAME="Default",
        OS_REGION_NAME="RegionOne", OS_INTERFACE="public",
    )  # fmt: skip
    done = subprocess.run(
        [sys.executable, str(CLOUD_FACTS_SOURCE), "lbtest-image", "lbtest.tiny", "ext-net"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_a_five_node_cloud_has_its_volume_backend_and_the_proxys_middleware_read(
    serve: list[FakeCloud], tmp_path: Path
) -> None:
    cloud = FiveNodeCloud(volume=True, objects=True)
    read = facts(cloud, serve, tmp_path)
    assert read["image_id"] == cloud.image["id"] and read["flavor_id"] == cloud.flavor["id"]
    assert read["public_network_id"] == cloud.external["id"]
    assert {"volumev3", "object-store"} <= set(read["services"])
    assert read["compute_hosts"] == 1
    assert read["volume_backend"] == "LVM"
    assert read["volume_backup"] is False  # only a cinder-backup that is down
    assert read["object_apis"] == ["slo", "swift", "tempurl"]
    assert ("GET", "/info") in cloud.requests  # the proxy's own, not under the account


def test_a_running_cinder_backup_is_seen_and_a_core_cloud_asks_neither(
    serve: list[FakeCloud], tmp_path: Path
) -> None:
    assert facts(FiveNodeCloud(volume=True, objects=False, backup=True), serve, tmp_path)[
        "volume_backup"
    ]
    core = FiveNodeCloud(volume=False, objects=False)
    read = facts(core, serve, tmp_path)
    assert (read["volume_backend"], read["volume_backup"], read["object_apis"]) == ("", False, [])
    assert not [path for _, path in core.requests if path.startswith(("/volume", "/info"))]
