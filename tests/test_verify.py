"""`labbuilder verify`'s own parts: the recipe's verify.toml, tempest.conf made from a lab
(golden), Tempest's subunit stream read into cases, the JUnit and the summary, the expected
skips, and running a program with a lab's names (a mount namespace of its own)."""

from __future__ import annotations

import configparser
import datetime as dt
import io
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import subunit

from labbuilder.api.verify import expected_skips
from labbuilder.common.errors import UsageError
from labbuilder.recipe.files import load_recipe
from labbuilder.verify import results
from labbuilder.verify.config import CloudFacts, Target, cloud_skips, tempest_conf
from labbuilder.verify.spec import ExpectedSkip, load_verify_spec

GOLDEN = Path(__file__).parent / "golden" / "tempest-zed-debian-12.conf"
UPDATE = os.environ.get("LABBUILDER_UPDATE_GOLDEN") == "1"
PASSWORD = "Xy7secretAdminPass00"

FACTS = CloudFacts(
    image_id="6f1c0d8e-0000-4000-8000-000000000001",
    flavor_id="5a7b3c2d-0000-4000-8000-000000000002",
    public_network_id="0e2d6f4a-0000-4000-8000-000000000003",
    public_network_name="ext-net",
    services=frozenset({"identity", "image", "compute", "network", "placement"}),
    compute_hosts=1,
    network_extensions=("agent", "external-net", "router", "security-group"),
)


def zed_spec():  # type: ignore[no-untyped-def]
    recipe = load_recipe("zed-debian-12")
    return load_verify_spec(Path(recipe.directory), recipe.name)


def test_the_zed_recipe_names_its_tempest_and_why_each_skip() -> None:
    spec = zed_spec()
    assert spec.tempest == "33.0.0" and "Debian 12" in spec.why_version
    assert spec.ssh_validation and "SSH" in spec.ssh_validation
    assert spec.skips and all(skip.why for skip in spec.skips)
    assert spec.suite_regex("smoke") == "smoke"
    assert spec.suite_regex(r"tempest\.api\.identity") == r"tempest\.api\.identity"


def test_the_guide_recipe_names_the_last_tempest_for_icehouse() -> None:
    recipe = load_recipe("icehouse-ubuntu-14.04")
    assert load_verify_spec(Path(recipe.directory), recipe.name).tempest == "4"


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "tempest is missing"),
        ('tempest = "33.0.0"\nwhat = 1\n', "unknown key what"),
        (
            'tempest = "33.0.0"\n[[skips]]\ntest = "("\nwhy = "x"\n',
            "skips[0].test is not a regular",
        ),
        ('tempest = "33.0.0"\n[[skips]]\ntest = "x"\nwhy = " "\n', "skips[0].why is empty"),
        ('tempest = "33.0.0"\n[[skips]]\ntest = "x"\n', "skips[0]: why is missing"),
        ('tempest = "33.0.0"\nconcurrency = 0\n', "concurrency must be"),
        ('tempest = "33.0.0"\n[timeouts]\ncompute = "long"\n', "timeouts must map"),
        ("tempest = [", "not TOML"),
    ],
)
def test_a_broken_verify_file_is_refused_naming_the_key(
    tmp_path: Path, text: str, words: str
) -> None:
    (tmp_path / "verify.toml").write_text(text)
    with pytest.raises(UsageError) as caught:
        load_verify_spec(tmp_path, "a-recipe")
    assert words in caught.value.message and caught.value.exit_code == 2


def test_a_recipe_without_a_verify_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="says nothing of Tempest"):
        load_verify_spec(tmp_path, "a-recipe")


def test_tempest_conf_for_a_core_path_lab_matches_the_golden_file(tmp_path: Path) -> None:
    target = Target("http://controller:5000/v3", "RegionOne", "admin", PASSWORD)
    text = tempest_conf(zed_spec(), target, FACTS, "/state/labs/lab/verify/1")
    if UPDATE:
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()
    conf = configparser.ConfigParser(interpolation=None)
    conf.read_string(text)
    assert conf["auth"]["admin_password"] == PASSWORD
    assert conf["compute"]["image_ref"] == FACTS.image_id
    assert conf["compute"]["flavor_ref"] == FACTS.flavor_id
    assert conf["network"]["public_network_id"] == FACTS.public_network_id
    assert conf["identity"]["uri_v3"] == "http://controller:5000/v3"
    available = conf["service_available"]
    assert (available["nova"], available["neutron"], available["glance"]) == ("true",) * 3
    assert (available["cinder"], available["swift"], available["horizon"]) == ("false",) * 3
    assert conf["validation"]["run_validation"] == "false"  # the test image has no SSH server
    # the cloud's own extensions (not "all": Tempest would expect metering, which it lacks)
    extensions = conf["network-feature-enabled"]["api_extensions"].split(",")
    assert extensions == ["agent", "external-net", "router", "security-group"]
    assert int(conf["service-clients"]["http_timeout"]) >= 300
    assert not conf.has_section("volume") and not conf.has_section("object-storage")


def test_a_cloud_with_block_and_object_storage_turns_their_tests_on() -> None:
    facts = CloudFacts(
        **{**FACTS.__dict__, "services": FACTS.services | {"volumev3", "object-store"},
           "volume_backend": "lvm", "dashboard": True,
           "object_apis": ("bulk_delete", "slo", "swift", "tempurl")},
    )  # fmt: skip
    target = Target("http://controller:5000/v3", "RegionOne", "admin", PASSWORD,
                    dashboard_url="http://controller/horizon/")  # fmt: skip
    conf = configparser.ConfigParser(interpolation=None)
    conf.read_string(tempest_conf(zed_spec(), target, facts, "/w"))
    available = conf["service_available"]
    assert (available["cinder"], available["swift"], available["horizon"]) == ("true",) * 3
    assert conf["volume"]["backend_names"] == "lvm"
    assert conf["volume"]["build_timeout"] == "1200"
    assert conf["dashboard"]["dashboard_url"] == "http://controller/horizon/"
    # No cinder-backup: its tests are off. Swift's tests expect what its /info lists, not all.
    assert conf["volume-feature-enabled"]["backup"] == "false"
    objects = conf["object-storage-feature-enabled"]
    assert objects["discoverable_apis"] == "bulk_delete,slo,swift,tempurl"
    assert (objects["container_sync"], objects["object_versioning"]) == ("false", "false")
    with_all = CloudFacts(**{**facts.__dict__, "volume_backup": True, "object_apis": ()})
    conf.read_string(tempest_conf(zed_spec(), target, with_all, "/w"))
    assert conf["volume-feature-enabled"]["backup"] == "true"
    assert conf["object-storage-feature-enabled"]["discoverable_apis"] == "all"


def test_account_quota_classes_are_left_out_only_where_swift_has_no_account_quotas() -> None:
    """Their tests skip without the middleware, but only after a setUp that needs a reseller
    admin role the guide does not create: left out, with why, instead of a failed setup."""
    quotas = "tempest.api.object_storage.test_account_quotas.AccountQuotasTest.test_upload_valid_object[id-a22ef352,smoke]"
    negative = "tempest.api.object_storage.test_account_quotas_negative.AccountQuotasNegativeTest.test_user_modify_quota[id-d1dc5076,negative]"
    container = "tempest.api.object_storage.test_container_quotas.ContainerQuotasTest.test_upload_valid_object[id-9a447cf6,smoke]"
    listed = [quotas, negative, container, IDENTITY]
    swift = CloudFacts(**{**FACTS.__dict__, "services": FACTS.services | {"object-store"},
                          "object_apis": ("bulk_delete", "slo", "swift", "tempurl")})  # fmt: skip
    skips = cloud_skips(swift)
    assert [test for test, _ in expected_skips(listed, skips)] == [quotas, negative]
    (skip,) = skips
    assert "account_quotas" in skip.why and "ResellerAdmin" in skip.why
    with_quotas = CloudFacts(**{**swift.__dict__, "object_apis": ("account_quotas", "swift")})
    assert cloud_skips(with_quotas) == ()
    assert cloud_skips(CloudFacts(**{**swift.__dict__, "object_apis": ()})) == ()  # "all"
    assert cloud_skips(FACTS) == ()  # no swift: Tempest skips its classes itself


def stream(*tests: tuple[str, str, dict[str, str]]) -> bytes:
    """A subunit v2 stream as Tempest's run leaves it: each test in progress, then its end."""
    out = io.BytesIO()
    writer = subunit.StreamResultToBytes(out)
    start = dt.datetime(2026, 12, 6, 12, 0, 0, tzinfo=dt.UTC)
    for index, (test, status, details) in enumerate(tests):
        begin = start + dt.timedelta(seconds=10 * index)
        writer.status(test_id=test, test_status="inprogress", timestamp=begin)
        for name, text in details.items():
            writer.status(test_id=test, file_name=name, file_bytes=text.encode(),
                          mime_type="text/plain;charset=utf8", eof=True)  # fmt: skip
        if status != "inprogress":
            writer.status(test_id=test, test_status=status,
                          timestamp=begin + dt.timedelta(seconds=2.5))  # fmt: skip
    return out.getvalue()


IDENTITY = "tempest.api.identity.v3.test_tokens.TokensV3Test.test_create_token[id-6f8e4436,smoke]"
IMAGE = "tempest.api.image.v2.test_versions.VersionsTest.test_list_versions[id-659ea30a,smoke]"
NETWORK = "tempest.api.network.test_networks.NetworksTest.test_list_networks[id-f7ffdeda,smoke]"
SCENARIO = "tempest.scenario.test_server_basic_ops.TestServerBasicOps.test_server_basic_ops[id-7fff3fb3,smoke]"


def test_tempest_results_are_read_from_its_subunit_stream() -> None:
    data = stream(
        (IDENTITY, "success", {}),
        (IMAGE, "fail", {"traceback": "Traceback (most recent call last):\n  ...\nAssertionError: 2 != 3"}),
        (NETWORK, "skip", {"reason": "Neutron support is required"}),
        ("tempest.api.compute.servers.test_create_server.ServersTestJSON.test_list_servers", "inprogress", {}),
    )  # fmt: skip
    cases = results.read_subunit(data)
    by_id = {case.id: case for case in cases}
    assert by_id[IDENTITY].status == results.PASSED and by_id[IDENTITY].seconds == 2.5
    assert by_id[IMAGE].status == results.FAILED
    assert by_id[IMAGE].reason == "AssertionError: 2 != 3"
    assert "Traceback" in by_id[IMAGE].details
    assert by_id[NETWORK].status == results.SKIPPED
    assert by_id[NETWORK].reason == "Neutron support is required"
    cut = [c for c in cases if "test_list_servers" in c.id]
    assert cut and cut[0].status == results.FAILED  # a test that never ended failed
    assert [c.service for c in cases] == ["identity", "image", "network", "compute"]
    assert by_id[IDENTITY].name == IDENTITY.split("[")[0]


def test_a_run_passes_only_with_every_test_reported_and_none_failed() -> None:
    """Exit 0 and "result": "passed" share one rule: Tempest ended well (or was not run,
    every test selected being an expected skip), nothing failed, something was reported."""
    ok = results.TestCase(IDENTITY, results.PASSED, 1.0)
    skip = ExpectedSkip(test=r"^tempest\.scenario\.", why="no SSH server")
    only_skips = results.with_expected_skips([], [("tempest.scenario.test_x.T.test_y", skip)])
    assert results.passed([ok], 0)
    assert results.passed(only_skips, 0)  # nothing ran, each test skipped with its reason
    assert not results.passed([], 0)  # an empty stream: nothing said what happened
    assert not results.passed([ok], 1)  # Tempest's own exit code counts
    assert not results.passed([ok, results.TestCase(IMAGE, results.FAILED, 1.0)], 0)


def test_junit_has_a_case_per_test_and_a_suite_per_service_with_expected_skips() -> None:
    cases = results.read_subunit(
        stream((IDENTITY, "success", {}), (IMAGE, "fail", {"traceback": "AssertionError: no"}))
    )
    skip = ExpectedSkip(
        r"^tempest\.scenario\.test_server_basic_ops\.", "no SSH server in the image"
    )
    listed = [IDENTITY, IMAGE, SCENARIO]
    skipped = expected_skips(listed, [skip])
    assert skipped == [(SCENARIO, skip)]
    cases = results.with_expected_skips(cases, skipped)
    root = ET.fromstring(results.junit_xml(cases, lab="lbtest", suite="smoke", seconds=12.0))
    suites = {suite.get("name"): suite for suite in root.iter("testsuite")}
    assert set(suites) == {"tempest.identity", "tempest.image", "tempest.scenario"}
    assert suites["tempest.image"].get("failures") == "1"
    failure = suites["tempest.image"].find("testcase/failure")
    assert failure is not None and "AssertionError: no" in (failure.text or "")
    skipped_case = suites["tempest.scenario"].find("testcase/skipped")
    assert skipped_case is not None
    assert skipped_case.get("message") == "expected skip: no SSH server in the image"
    assert results.summary(cases) == {
        "identity": {"passed": 1, "failed": 0, "skipped": 0},
        "image": {"passed": 0, "failed": 1, "skipped": 0},
        "scenario": {"passed": 0, "failed": 0, "skipped": 1},
    }
    assert list(results.skip_reasons(cases)) == ["expected skip: no SSH server in the image"]


def test_a_program_sees_the_labs_names_and_the_host_file_stays(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n10.0.0.11 controller\n")
    before = Path("/etc/hosts").read_bytes()
    seen = subprocess.run(
        [sys.executable, "-m", "labbuilder.adapters.nsexec", "--hosts", str(hosts), "--",
         "getent", "hosts", "controller"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert seen.stdout.split() == ["10.0.0.11", "controller"]
    assert Path("/etc/hosts").read_bytes() == before
    outside = subprocess.run(["getent", "hosts", "controller"], capture_output=True, check=False)
    assert outside.returncode != 0 or b"10.0.0.11" not in outside.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "labbuilder.adapters.nsexec", "--hosts", str(hosts), "--netns",
         "lbtest-no-such-namespace", "--", "true"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert missing.returncode == 127 and "No such file" in missing.stderr


def test_a_run_kept_by_stestr_in_subunit_version_1_is_read_too() -> None:
    """stestr's repository keeps a run as a version 1 stream (what a stopped run leaves)."""
    v1 = (
        "time: 2026-12-06 13:20:39.000000Z\n"
        f"test: {IDENTITY}\n"
        "time: 2026-12-06 13:20:41.500000Z\n"
        f"success: {IDENTITY}\n"
        "test: setUpClass (tempest.api.network.test_ports.PortsIpV6TestJSON)\n"
        "skip: setUpClass (tempest.api.network.test_ports.PortsIpV6TestJSON) [\n"
        "IPv6 Tests are disabled.\n"
        "]\n"
        "test: setUpClass (tempest.scenario.test_server_multinode.TestServerMultinode)\n"
        "skip: setUpClass (tempest.scenario.test_server_multinode.TestServerMultinode) [\n"
        "Less than 2 compute nodes, skipping multinode tests.\n"
        "]\n"
        f"test: {NETWORK}\n"
    ).encode()
    cases = results.read_subunit(v1)
    by_id = {case.id: case for case in cases}
    assert by_id[IDENTITY].status == results.PASSED and by_id[IDENTITY].seconds == 2.5
    fixture = by_id["setUpClass (tempest.api.network.test_ports.PortsIpV6TestJSON)"]
    assert fixture.status == results.SKIPPED and "IPv6 Tests are disabled" in fixture.reason
    assert (fixture.service, fixture.method) == ("network", "setUpClass")
    assert fixture.classname == "tempest.api.network.test_ports.PortsIpV6TestJSON"
    scenario = by_id["setUpClass (tempest.scenario.test_server_multinode.TestServerMultinode)"]
    assert scenario.service == "scenario"  # its class's service, as for the API's classes
    assert by_id[NETWORK].status == results.FAILED  # it never ended: the run was stopped


def test_a_recipe_verified_with_another_tempest_is_refused_naming_both() -> None:
    """The guide's own recipe names Tempest 4 (the last for Icehouse); this host has Debian's
    33.0.0 (scripts/setup-host installs it): refused before anything runs, exit 2."""
    from labbuilder.adapters import tempest
    from labbuilder.api.verify import check_tempest

    recipe = load_recipe("icehouse-ubuntu-14.04")
    spec = load_verify_spec(Path(recipe.directory), recipe.name)
    assert tempest.installed_version() == "33.0.0"
    with pytest.raises(UsageError) as refused:
        check_tempest(spec)
    assert "verified with Tempest 4, this host has 33.0.0" in refused.value.message
    assert check_tempest(zed_spec()) == "33.0.0"
