"""Host facts: read from fabricated kernel/apt files, and from a real libvirtd."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from labbuilder.adapters import libvirt as lv
from labbuilder.host.facts import apt_source_hosts, nameservers, read_memory_available, read_routes

PROC_ROUTE = """\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0
eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
virbr0\t00000A0A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0
"""


def test_routes_are_read_from_the_kernels_table(tmp_path: Path) -> None:
    path = tmp_path / "route"
    path.write_text(PROC_ROUTE)
    assert [(r.destination, r.dev) for r in read_routes(path)] == [
        ("0.0.0.0/0", "eth0"),
        ("192.0.2.0/24", "eth0"),
        ("10.10.0.0/16", "virbr0"),
    ]


def test_this_hosts_routes_and_memory_are_read() -> None:
    assert any(
        route.destination == "0.0.0.0/0" or "/" in route.destination for route in read_routes()
    )
    memory = read_memory_available()
    assert memory is not None and memory > 0


def test_apt_sources_in_both_formats(tmp_path: Path) -> None:
    (tmp_path / "sources.list").write_text(
        "deb http://mirror.example/debian bookworm main\n# deb http://commented.example/x y\n"
    )
    folder = tmp_path / "sources.list.d"
    folder.mkdir()
    (folder / "debian.sources").write_text(
        "Types: deb\n# http://snapshot.example/archive\nURIs: https://deb.example/debian\n"
        "Suites: bookworm\n"
    )
    (folder / "ignored.txt").write_text("deb http://ignored.example/ x y\n")
    assert apt_source_hosts([tmp_path / "sources.list", folder]) == [
        "mirror.example",
        "deb.example",
    ]


def test_nameservers(tmp_path: Path) -> None:
    path = tmp_path / "resolv.conf"
    path.write_text("search lan\nnameserver 10.255.255.53\nnameserver ::1\n")
    assert nameservers(path) == ["10.255.255.53"]
    assert nameservers(tmp_path / "missing") == []


@pytest.fixture
def conn() -> Iterator[Any]:
    connection = lv.connect("qemu:///system")
    yield connection
    connection.close()


@pytest.mark.integration
def test_libvirt_networks_and_their_owner_lab(conn: Any) -> None:
    xml = f"""<network>
      <name>lbtest-facts</name>
      <metadata><lb:lab xmlns:lb="{lv.METADATA_NS}" name="lbtest-lab"/></metadata>
      <bridge name="lbtestfacts0"/>
      <ip address="10.251.3.1" netmask="255.255.255.0"/>
    </network>"""
    network = conn.networkDefineXML(xml)
    try:
        facts = {fact.name: fact for fact in lv.network_facts(conn)}
        assert facts["lbtest-facts"].lab == "lbtest-lab"
        assert facts["lbtest-facts"].cidrs == ("10.251.3.0/24",)
        assert facts["lbtest-facts"].bridge == "lbtestfacts0"
    finally:
        network.undefine()
    assert "lbtest-facts" not in {fact.name for fact in lv.network_facts(conn)}


@pytest.mark.integration
def test_an_unreachable_libvirt_is_a_hypervisor_error_with_a_hint() -> None:
    from labbuilder.common.errors import HypervisorError

    with pytest.raises(HypervisorError) as err:
        lv.connect("qemu+unix:///system?socket=/nonexistent/libvirt-sock")
    assert "cannot connect to libvirt" in err.value.message
    assert err.value.hint and "libvirtd" in err.value.hint
