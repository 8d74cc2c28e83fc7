"""Runs *inside the controller*, as the admin (``admin-openrc`` sourced): what Tempest's
configuration needs of the cloud, as one JSON line. ``labbuilder verify`` sends it to the warm
Python (or python3) on the controller's standard input; its arguments: the test image's name,
the test flavor's name, the external network's name. Standard library and openstacksdk only."""

import json
import sys
import urllib.parse
import urllib.request

import openstack


def main() -> None:
    image_name, flavor_name, network_name = sys.argv[1:4]
    cloud = openstack.connect()
    services = sorted({service.type for service in cloud.identity.services() if service.is_enabled})
    # What a stage not run yet would make is "" (a lab verified through the image stage has
    # no compute or network service yet).
    image = cloud.image.find_image(image_name) if "image" in services else None
    flavor = cloud.compute.find_flavor(flavor_name) if "compute" in services else None
    network = cloud.network.find_network(network_name) if "network" in services else None
    extensions = []
    if "network" in services:
        extensions = sorted(extension.alias for extension in cloud.network.extensions())
    hosts = []
    if "compute" in services:
        hosts = [h for h in cloud.compute.hypervisors(details=True) if h.state == "up"]
    backend = ""
    backup = False
    if "volumev3" in services:
        pools = list(cloud.block_storage.backend_pools())
        backend = pools[0].capabilities.get("volume_backend_name", "") if pools else ""
        # Zed's openstacksdk has no block_storage.services(): the API's own list.
        listed = cloud.block_storage.get("/os-services").json().get("services", [])
        backup = any(s.get("binary") == "cinder-backup" and s.get("state") == "up" for s in listed)
    object_apis = []
    if "object-store" in services:
        # The proxy's /info (no token needed) lists its middleware.
        parts = urllib.parse.urlsplit(cloud.object_store.get_endpoint())
        info = f"{parts.scheme}://{parts.netloc}/info"
        try:
            with urllib.request.urlopen(info, timeout=60) as page:
                object_apis = sorted(json.load(page))
        except (OSError, ValueError):
            pass  # "all": Tempest's object tests then show what the proxy does not answer
    dashboard = False
    try:
        with urllib.request.urlopen("http://localhost/horizon/", timeout=20) as page:
            dashboard = page.status == 200
    except OSError:
        pass
    print(  # noqa: T201
        json.dumps(
            {
                "image_id": image.id if image else "",
                "flavor_id": flavor.id if flavor else "",
                "public_network_id": network.id if network else "",
                "public_network_name": network.name if network else "",
                "services": services,
                "compute_hosts": len(hosts),
                "dashboard": dashboard,
                "volume_backend": backend,
                "network_extensions": extensions,
                "volume_backup": backup,
                "object_apis": object_apis,
            }
        )
    )


main()
