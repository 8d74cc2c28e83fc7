"""Lab files → Lab: the guide's defaults, node groups, and every validation message.

Each error case is (lab file text, expected message): the message must name the file, the
key path, the value and the rule (cloud-init's schema-test style).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from labbuilder.common.errors import LabFileError
from labbuilder.lab.files import builtin_lab_names, load_builtin_lab, load_lab_file, parse_lab
from labbuilder.model.lab import GiB, MiB, Networking, NetworkKind, NicRole, Role

SRC = "lab.toml"


def lab_from(text: str, force: bool = False):  # type: ignore[no-untyped-def]
    return parse_lab(text, source=SRC, force=force)


def test_a_lab_file_with_only_a_name_is_the_guides_three_node_lab() -> None:
    lab = lab_from('name = "mini"')
    builtin = load_builtin_lab("guide-3node")
    assert lab.networks == builtin.networks
    assert [n.name for n in lab.nodes] == ["controller", "network", "compute1"]
    assert [(n.role, n.vcpus, n.memory, n.disk, n.nics) for n in lab.nodes] == [
        (n.role, n.vcpus, n.memory, n.disk, n.nics) for n in builtin.nodes
    ]


def test_guide_3node_has_the_guides_networks_and_minimum_sizes() -> None:
    lab = load_builtin_lab("guide-3node")
    assert lab.networking == Networking.NEUTRON
    nets = {net.name: net for net in lab.networks}
    assert (nets["management"].cidr, nets["management"].gateway) == ("10.0.0.0/24", "10.0.0.1")
    assert nets["management"].kind == NetworkKind.NAT
    assert (nets["tunnel"].cidr, nets["tunnel"].gateway) == ("10.0.1.0/24", None)
    assert nets["tunnel"].kind == NetworkKind.ISOLATED
    assert (nets["external"].cidr, nets["external"].gateway) == ("203.0.113.0/24", "203.0.113.1")
    assert nets["external"].floating_range == ("203.0.113.101", "203.0.113.200")
    sizes = {n.name: (n.vcpus, n.memory, n.disk) for n in lab.nodes}
    assert sizes == {
        "controller": (1, 2 * GiB, 5 * GiB),
        "network": (1, 512 * MiB, 5 * GiB),
        "compute1": (1, 2 * GiB, 10 * GiB),
    }
    nics = {n.name: n.nics for n in lab.nodes}
    assert nics["network"] == (NicRole.MANAGEMENT, NicRole.TUNNEL, NicRole.EXTERNAL)
    assert nics["compute1"] == (NicRole.MANAGEMENT, NicRole.TUNNEL)


def test_guide_2node_legacy_has_no_network_node_and_compute_external_nic() -> None:
    lab = load_builtin_lab("guide-2node-legacy")
    assert lab.networking == Networking.LEGACY
    assert [n.name for n in lab.nodes] == ["controller", "compute1"]
    assert lab.network(NicRole.TUNNEL) is None
    assert lab.nodes[1].nics == (NicRole.MANAGEMENT, NicRole.EXTERNAL)


def test_every_builtin_lab_loads() -> None:
    assert {"guide-3node", "guide-2node-legacy", "guide-full"} <= set(builtin_lab_names())
    for name in builtin_lab_names():
        assert load_builtin_lab(name).name == name


def test_optional_nodes_get_the_guides_roles_disks_and_addresses() -> None:
    lab = lab_from(
        'name = "x"\n[nodes.compute]\ncount = 3\n[nodes.block1]\n[nodes.object]\ncount = 2\n'
    )
    nodes = {n.name: n for n in lab.nodes}
    assert list(nodes) == [
        "controller", "network", "compute1", "compute2", "compute3",
        "block1", "object1", "object2",
    ]  # fmt: skip
    assert nodes["compute2"].role == Role.COMPUTE and nodes["compute2"].index == 2
    assert nodes["block1"].extra_disks[0].purpose == "cinder-volumes"
    assert nodes["object2"].extra_disks[0].purpose == "swift"
    assert nodes["object2"].index == 2


def test_count_zero_removes_a_group_and_a_single_table_overrides_one_node() -> None:
    lab = lab_from(
        'name = "x"\n[nodes.compute]\ncount = 0\n[nodes.controller]\nmemory = "4 GB"\nvcpus = 2\n'
    )
    assert [n.name for n in lab.nodes] == ["controller", "network"]
    assert (lab.nodes[0].memory, lab.nodes[0].vcpus) == (4 * GiB, 2)


def test_force_turns_minimums_into_warnings() -> None:
    text = 'name = "x"\n[nodes.compute1]\nmemory = "1 GiB"\n'
    lab = lab_from(text, force=True)
    assert lab.nodes[2].memory == GiB
    assert lab.warnings == (
        'lab.toml: nodes.compute1.memory = "1 GiB" is below the guide\'s minimum of 2 GB '
        "for a compute node",
    )


def test_load_lab_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "my.toml"
    path.write_text('name = "x"\nnmae = "y"\n')
    with pytest.raises(LabFileError, match=rf"^{path}: unknown key 'nmae'"):
        load_lab_file(path)
    with pytest.raises(LabFileError, match="cannot read the lab file"):
        load_lab_file(tmp_path / "missing.toml")


def test_unknown_builtin_lab_suggests_a_close_name() -> None:
    with pytest.raises(LabFileError) as err:
        load_builtin_lab("guide-3nod")
    assert err.value.hint == "did you mean 'guide-3node'?"


ERRORS = [
    # unknown keys (typos), with a suggestion
    ('name = "x"\nnetworkng = "neutron"', "lab.toml: unknown key 'networkng'", "did you mean 'networking'?"),
    ('name = "x"\n[nodes.compute1]\nmemroy = "2 GB"', "lab.toml: unknown key 'nodes.compute1.memroy'", "did you mean 'memory'?"),
    ('name = "x"\n[networks.management]\ncdir = "10.0.0.0/24"', "lab.toml: unknown key 'networks.management.cdir'", "did you mean 'cidr'?"),
    ('name = "x"\n[options]\nntp = []', "lab.toml: unknown key 'options.ntp'", "did you mean 'ntp_servers'?"),
    # TOML syntax and missing/invalid names
    ('name = "x', "lab.toml: not valid TOML", None),
    ("", 'lab.toml: name = None is not a string', None),
    ('name = "My_Lab"', 'lab.toml: name = "My_Lab" is not a valid name', None),
    ('name = "x"\n[nodes.Compute_1]\nrole = "compute"', 'lab.toml: nodes.Compute_1 = "Compute_1" is not a valid name', None),
    # wrong types
    ('name = 5', "lab.toml: name = 5 is not a string", None),
    ('name = "x"\n[nodes.compute1]\nvcpus = "2"', 'lab.toml: nodes.compute1.vcpus = "2" is not a whole number', None),
    ('name = "x"\n[nodes.compute1]\nvcpus = true', "lab.toml: nodes.compute1.vcpus = true is not a whole number", None),
    ('name = "x"\n[nodes.compute1]\nmemory = 2048', 'lab.toml: nodes.compute1.memory = 2048 is not a size such as "2 GB"', None),
    ('name = "x"\n[nodes.compute1]\nmemory = "lots"', 'lab.toml: nodes.compute1.memory = "lots" expected a number and a unit', None),
    ('name = "x"\nnodes = 3', "lab.toml: nodes = 3 is not a table", None),
    ('name = "x"\n[options]\ninternet = "yes"', 'lab.toml: options.internet = "yes" is not true or false', None),
    ('name = "x"\nnetworking = "flat"', 'lab.toml: networking = "flat" is not one of neutron, legacy', None),
    # bad CIDRs and addresses outside their subnet
    ('name = "x"\n[networks.management]\ncidr = "10.0.0.0/33"', 'lab.toml: networks.management.cidr = "10.0.0.0/33" is not a CIDR', None),
    ('name = "x"\n[networks.management]\ncidr = "10.0.0.5/24"\ngateway = "10.0.0.1"', 'lab.toml: networks.management.cidr = "10.0.0.5/24" has host bits set; the network is 10.0.0.0/24', None),
    ('name = "x"\n[networks.management]\ngateway = "10.0.9.1"', 'lab.toml: networks.management.gateway = "10.0.9.1" is outside networks.management (10.0.0.0/24)', None),
    ('name = "x"\n[nodes.controller]\naddresses = { management = "10.0.5.11" }', "lab.toml: nodes.controller.addresses.management 10.0.5.11 is outside networks.management (10.0.0.0/24)", None),
    ('name = "x"\n[nodes.controller]\naddresses = { management = "10.0.0.300" }', 'lab.toml: nodes.controller.addresses.management = "10.0.0.300" is not an IPv4 address', None),
    ('name = "x"\n[networks.management]\ncidr = "10.9.0.0/28"\ngateway = "10.9.0.1"', "lab.toml: nodes.network (its default management address) 10.9.0.21 is outside networks.management (10.9.0.0/28)", 'set nodes.network.addresses.management = "<an address in 10.9.0.0/28>"'),
    ('name = "x"\n[networks.tunnel]\ngateway = "10.0.1.1"', 'lab.toml: networks.tunnel.gateway = "10.0.1.1" is set, but an isolated network has no gateway', None),
    ('name = "x"\n[networks.tunnel]\ncidr = "10.0.0.0/16"', 'lab.toml: networks.tunnel.cidr = "10.0.0.0/16" overlaps networks.management (10.0.0.0/24)', None),
    # duplicate names, addresses and MACs
    ('name = "x"\n[nodes.compute]\ncount = 2\n[nodes.compute2]\nvcpus = 2', "lab.toml: node 'compute2' is defined twice, by nodes.compute and by nodes.compute2", None),
    ('name = "x"\n[nodes.compute1]\naddresses = { management = "10.0.0.11" }', "lab.toml: nodes controller and compute1 both have the address 10.0.0.11", None),
    ('name = "x"\n[nodes.compute1]\nmacs = { management = "52:54:00:00:00:01" }\n[nodes.network]\nmacs = { management = "52:54:00:00:00:01" }', 'lab.toml: nodes.compute1.macs.management = "52:54:00:00:00:01" is already used by network\'s management NIC', None),
    ('name = "x"\n[nodes.compute1]\nmacs = { management = "52:54:00:00:00" }', 'lab.toml: nodes.compute1.macs.management = "52:54:00:00:00" is not a MAC address', None),
    ('name = "x"\n[nodes.compute1]\nmacs = { management = "01:54:00:00:00:01" }', 'lab.toml: nodes.compute1.macs.management = "01:54:00:00:00:01" is a multicast MAC', None),
    # gateway or floating range inside a DHCP / host range
    ('name = "x"\n[networks.management]\ndhcp_range = "10.0.0.1-10.0.0.50"', 'lab.toml: networks.management.dhcp_range = ["10.0.0.1", "10.0.0.50"] contains the gateway 10.0.0.1', None),
    ('name = "x"\n[networks.management]\ndhcp_range = "10.0.0.2-10.0.0.100"', "lab.toml: nodes.controller (its default management address) 10.0.0.11 is inside networks.management.dhcp_range (10.0.0.2-10.0.0.100)", "node addresses, DHCP and floating ranges must not overlap"),
    ('name = "x"\n[networks.external]\nfloating_range = "203.0.113.1-203.0.113.20"', 'lab.toml: networks.external.floating_range = ["203.0.113.1", "203.0.113.20"] contains the gateway 203.0.113.1', None),
    ('name = "x"\n[networks.external]\nfloating_range = "203.0.113.200-203.0.113.101"', 'lab.toml: networks.external.floating_range = ["203.0.113.200", "203.0.113.101"] ends before it starts', None),
    ('name = "x"\n[networks.external]\nfloating_range = "203.0.113.101-203.0.113.200"\ndhcp_range = "203.0.113.150-203.0.113.250"', 'lab.toml: networks.external.floating_range = ["203.0.113.101", "203.0.113.200"] overlaps the DHCP range 203.0.113.150-203.0.113.250', None),
    ('name = "x"\n[networks.external]\nfloating_range = "203.0.113.101"', 'lab.toml: networks.external.floating_range = "203.0.113.101" is not a range', None),
    # neutron and legacy networking mixed
    ('name = "x"\nnetworking = "legacy"\n[nodes.network]', "lab.toml: nodes.network is a network node, but the lab uses legacy networking, which has no such node", "neutron and legacy networking cannot be mixed: remove the node or set networking = \"neutron\""),
    ('name = "x"\nnetworking = "legacy"\n[networks.tunnel]\ncidr = "10.0.1.0/24"', "lab.toml: networks.tunnel is an instance-tunnel network, but the lab uses networking = \"legacy\"", None),
    # NICs
    ('name = "x"\n[nodes.compute1]\nnics = ["tunnel", "management"]', 'lab.toml: nodes.compute1.nics = ["tunnel", "management"] must start with the management network', None),
    ('name = "x"\n[nodes.network]\naddresses = { external = "203.0.113.5" }', 'lab.toml: nodes.network.addresses.external = "203.0.113.5" is set, but the external NIC stays up without an address', None),
    ('name = "x"\n[nodes.controller]\naddresses = { tunnel = "10.0.1.11" }', 'lab.toml: nodes.controller.addresses.tunnel = "10.0.1.11" is for a tunnel NIC, which node controller does not have', None),
    # sizes below the guide's minimums (the issue's own example)
    ('name = "x"\n[nodes.compute1]\nmemory = "1 GiB"', 'lab.toml: nodes.compute1.memory = "1 GiB" is below the guide\'s minimum of 2 GB for a compute node', "give it at least the guide's minimum, or pass --allow-small"),
    ('name = "x"\n[nodes.network]\ndisk = "4 GB"', 'lab.toml: nodes.network.disk = "4 GB" is below the guide\'s minimum of 5 GB for a network node', None),
    # groups and roles
    ('name = "x"\n[nodes.compute2]\ncount = 2', "lab.toml: nodes.compute2.count = 2 needs a group name without a number, such as 'compute'", None),
    ('name = "x"\n[nodes.db]\nvcpus = 1', "lab.toml: nodes.db needs a role (its name does not say which)", None),
    ('name = "x"\n[nodes.db]\nrole = "database"', 'lab.toml: nodes.db.role = "database" is not one of controller, network, compute, block, object', None),
    # options
    ('name = "x"\n[options]\negress_allow = ["203.0.113.80"]', 'lab.toml: options.egress_allow = ["203.0.113.80"] is set, but options.egress = "nat"', None),
    ('name = "x"\n[options]\negress = "allow"\negress_allow = ["deb.debian.org"]', 'lab.toml: options.egress_allow[0] = "deb.debian.org" is not an IPv4 address', None),
    ('name = "x"\n[options]\napt_proxy = "10.0.0.1:3142"', 'lab.toml: options.apt_proxy = "10.0.0.1:3142" is not an http:// or https:// URL', None),
    ('name = "x"\nlibvirt_uri = "system"', 'lab.toml: libvirt_uri = "system" is not a libvirt URI', None),
    # an isolated lab: its gateway namespace serves no DHCP and lives on this host
    ('name = "x"\n[options]\nisolated = true\n[networks.management]\ndhcp_range = "10.0.0.150-10.0.0.200"', 'lab.toml: networks.management.dhcp_range = ["10.0.0.150", "10.0.0.200"] is set, but an isolated lab\'s gateway serves no DHCP (options.isolated)', "remove dhcp_range (nodes get their addresses from their seed), or set options.isolated = false"),
    ('name = "x"\nlibvirt_uri = "qemu+ssh://h/system"\n[options]\nisolated = true', "lab.toml: options.isolated = true needs the lab on this host, but libvirt_uri names host h", "set options.isolated = false for a lab on another host"),
    ('name = "x"\n[options]\nisolated = "yes"', 'lab.toml: options.isolated = "yes" is not', None),
    # what leaves labbuilder: libvirt URIs, URLs, NTP servers, egress destinations
    ('name = "x"\nlibvirt_uri = "qemu+ext:///system?command=/bin/sh"', 'lab.toml: libvirt_uri = "qemu+ext:///system?command=/bin/sh" is not a libvirt URI labbuilder supports (it has parameters)', "use qemu:///system, qemu:///session or qemu+ssh://[user@]host[:port]/system, without '?' parameters"),
    ('name = "x"\nlibvirt_uri = "qemu+tcp://h/system"', "lab.toml: libvirt_uri = \"qemu+tcp://h/system\" uses the transport 'qemu+tcp', which labbuilder does not support", None),
    ('name = "x"\n[options]\napt_proxy = "http://p:3142\\nAcquire::x \\"y\\";"', 'lab.toml: options.apt_proxy = "http://p:3142\\nAcquire::x \\"y\\";" is not a plain URL: it holds white space, a quote or one of', None),
    ('name = "x"\n[options]\napt_mirror = "http://u:p@m/debian"', 'lab.toml: options.apt_mirror = "http://u:p@m/debian" is a URL with a user or password', "use a proxy or mirror that needs no login"),
    ('name = "x"\n[options]\nntp_servers = ["pool.ntp.org\\nallow all"]', 'lab.toml: options.ntp_servers[0] = "pool.ntp.org\\nallow all" is not a host name or an IP address of an NTP server', None),
    ('name = "x"\n[options]\negress = "allow"\negress_allow = ["127.0.0.0/8"]', 'lab.toml: options.egress_allow[0] = "127.0.0.0/8" is in a range guests cannot be allowed to: loopback', None),
    # limits
    ('name = "x"\n[nodes.compute]\ncount = 65', "lab.toml: nodes.compute.count = 65 is above the most labbuilder allows, 64", "a group has 0 to 64 nodes"),
    ('name = "x"\n[nodes.compute1]\nvcpus = 65', "lab.toml: nodes.compute1.vcpus = 65 is above the most labbuilder allows, 64", None),
    ('name = "x"\n[nodes.compute1]\nmemory = "257 GiB"', 'lab.toml: nodes.compute1.memory = "257 GiB" is above 256 GB, the most labbuilder allows', None),
    ('name = "x"\n[nodes.compute1]\nmemory = "64 MiB"', 'lab.toml: nodes.compute1.memory = "64 MiB" is below 128 MB, the least a guest can have', None),
    ('name = "x"\n[nodes.compute1]\nextra_disks = ["1 GB", "1 GB", "1 GB", "1 GB", "1 GB", "1 GB", "1 GB", "1 GB", "1 GB"]', "lab.toml: nodes.compute1.extra_disks has 9 disks; a node has at most 8 extra disks", None),
    ('name = "x"\ndescription = "a\\u0007b"', 'lab.toml: description = "a\\u0007b" holds a control character', None),
    # reserved ranges and MACs
    ('name = "x"\n[networks.management]\ncidr = "169.254.0.0/24"\ngateway = "169.254.0.1"', 'lab.toml: networks.management.cidr = "169.254.0.0/24" overlaps a range no lab network can use: link-local', None),
    ('name = "x"\n[nodes.compute1]\nmacs = { management = "fe:54:00:00:00:01" }', 'lab.toml: nodes.compute1.macs.management = "fe:54:00:00:00:01" starts with fe, which libvirt reserves', None),
    ('name = "x"\n[nodes.compute1]\nmacs = { management = "00:00:00:00:00:00" }', 'lab.toml: nodes.compute1.macs.management = "00:00:00:00:00:00" is the all-zero MAC', None),
    # names, images, recipes
    ('name = "x"\n[nodes.compute-2]\nrole = "compute"', 'lab.toml: nodes.compute-2 = "compute-2" is not a valid name', "use lower-case letters and digits, starting with a letter, at most 40 characters; no '-': libvirt names are <lab>-<name>, so a '-' would let two labs plan the same name"),
    ('name = "lbbake-1"', 'lab.toml: name = "lbbake-1" starts with \'lbbake\', which labbuilder keeps for its own temporary machines', None),
    ('name = "x"\nrecipe = "./my-recipe"', 'lab.toml: recipe = "./my-recipe" is not a built-in recipe', None),
    ('name = "x"\nimage = "/etc/shadow"', 'lab.toml: image = "/etc/shadow" is a local image, which only a lab file in a folder may name', None),
    ('name = "x"\nimage = "http://localhost/x.qcow2"', 'lab.toml: image = "http://localhost/x.qcow2" names this host', None),
]  # fmt: skip


@pytest.mark.parametrize(("text", "message", "hint"), ERRORS)
def test_validation_message(text: str, message: str, hint: str | None) -> None:
    with pytest.raises(LabFileError) as err:
        lab_from(text)
    assert err.value.message.startswith(message), err.value.message
    assert "\n" not in err.value.message
    if hint is not None:
        assert err.value.hint == hint


def test_an_ipv6_proxy_and_ssh_host_are_fine() -> None:
    lab = lab_from(
        'name = "x"\nlibvirt_uri = "qemu+ssh://root@[2001:db8::1]:2222/system"\n'
        '[options]\napt_proxy = "http://[2001:db8::1]:3142"\nntp_servers = ["2001:db8::123"]\n'
    )
    assert lab.options.apt_proxy == "http://[2001:db8::1]:3142"


def test_a_value_in_a_message_is_one_line_and_cut_short() -> None:
    with pytest.raises(LabFileError) as err:
        lab_from('name = "x"\ndescription = "' + "a\\n" * 500 + '"')
    assert "\n" not in err.value.message
    assert len(err.value.message) < 250 and "… holds a control character" in err.value.message


def test_a_local_image_must_be_a_standalone_qcow2_in_the_lab_files_folder(tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow2"
    image.write_bytes(b"QFI\xfb" + b"\x00\x00\x00\x03" + b"\x00" * 200)
    lab = tmp_path / "lab.toml"
    lab.write_text('name = "x"\nimage = "disk.qcow2"\n')
    assert load_lab_file(lab).image == str(image)
    image.write_bytes(
        b"QFI\xfb" + b"\x00\x00\x00\x03" + b"\x00\x00\x00\x00\x00\x00\x01\x00" + b"\x00" * 200
    )
    with pytest.raises(LabFileError, match="qcow2 image with a backing file"):
        load_lab_file(lab)
