"""The image catalog: the shipped files parse, bad files are rejected with file and key named."""

from __future__ import annotations

from pathlib import Path

import pytest

from labbuilder.catalog.files import find_image, is_location, load_catalog, parse_image_entry
from labbuilder.catalog.model import (
    ChecksumAlgorithm,
    CloudInitFlavour,
    DiskFormat,
    ImageEntry,
)
from labbuilder.common.errors import ImageError
from labbuilder.common.resources import data_dir

UBUNTU_KEYRING = Path("/usr/share/keyrings/ubuntu-cloudimage-keyring.gpg")
GOOD = """
name = "test-9"
description = "a test image"
os_family = "debian"
release = "9"
cloud_init = "v2"
default_user = "debian"
console = "ttyS0"

[download]
url = "https://example.org/images/test-9.qcow2"
checksum_url = "https://example.org/images/SHA512SUMS"
algorithm = "sha512"
format = "qcow2"

[build]
suite = "stretch"
mirror = "http://deb.debian.org/debian"
packages = ["sudo", "cloud-init"]
kernel_package = "linux-image-amd64"
size = "2 GiB"
"""


def test_every_catalog_file_parses() -> None:
    files = sorted(
        item.name for item in data_dir("images").iterdir() if item.name.endswith(".toml")
    )
    assert files == ["debian-12.toml", "ubuntu-14.04.toml", "ubuntu-24.04.toml"]
    for item in data_dir("images").iterdir():
        if item.name.endswith(".toml"):
            entry = parse_image_entry(item.read_text(encoding="utf-8"), item.name)
            assert entry.name == item.name.removesuffix(".toml")
    assert sorted(load_catalog()) == ["debian-12", "ubuntu-14.04", "ubuntu-24.04"]


def test_catalog_contents() -> None:
    catalog = load_catalog()
    trusty, noble, debian = catalog["ubuntu-14.04"], catalog["ubuntu-24.04"], catalog["debian-12"]
    assert trusty.cloud_init is CloudInitFlavour.ENI and trusty.default_user == "ubuntu"
    assert trusty.download is not None and trusty.download.signature_url is not None
    for ubuntu in (trusty, noble):
        assert ubuntu.download is not None
        assert ubuntu.download.checksum_url is not None
        assert ubuntu.download.signature_url == ubuntu.download.checksum_url + ".gpg"
        assert ubuntu.download.keyring == UBUNTU_KEYRING
    assert trusty.download.url.endswith("/trusty/current/trusty-server-cloudimg-amd64-disk1.img")
    assert noble.cloud_init is CloudInitFlavour.V2 and noble.build is None
    assert debian.download is not None and debian.download.algorithm is ChecksumAlgorithm.SHA512
    assert debian.download.checksum_url is not None
    assert debian.download.checksum_url.endswith("/SHA512SUMS")
    assert debian.download.signature_url is None and debian.download.keyring is None
    assert debian.build is not None and debian.build.suite == "bookworm"
    assert debian.build.kernel_package == "linux-image-cloud-amd64"
    assert {"cloud-init", "openssh-server", "locales"} <= set(debian.build.packages)
    assert debian.build.size == "2 GiB"


def test_good_entry() -> None:
    entry = parse_image_entry(GOOD, "test-9.toml")
    assert entry.download is not None and entry.download.format is DiskFormat.QCOW2
    assert entry.build is not None and entry.build.packages == ("sudo", "cloud-init")


def _edit(old: str, new: str) -> str:
    assert old in GOOD
    return GOOD.replace(old, new)


SIGNATURE = 'signature_url = "https://example.org/images/SHA512SUMS.gpg"'
KEYRING = f'keyring = "{UBUNTU_KEYRING}"'


def _download(*lines: str) -> str:
    """GOOD with these lines added to its [download] section."""
    return _edit('format = "qcow2"', "\n".join(('format = "qcow2"', *lines)))


def test_signed_entry() -> None:
    entry = parse_image_entry(_download(SIGNATURE, KEYRING), "test-9.toml")
    assert entry.download is not None and entry.download.keyring == UBUNTU_KEYRING
    assert entry.download.signature_url == "https://example.org/images/SHA512SUMS.gpg"


@pytest.mark.parametrize(
    ("text", "key", "extra"),
    [
        (_download(SIGNATURE), "download.keyring", "is missing"),
        (_download(KEYRING), "download.keyring", "without 'download.signature_url'"),
        (
            _download(SIGNATURE, 'keyring = "keyrings/ubuntu.gpg"'),
            "download.keyring",
            "not an absolute path",
        ),
        (_download(SIGNATURE, "keyring = 5"), "download.keyring", "must be a string"),
        (_download(SIGNATURE, 'keyring = ""'), "download.keyring", "is missing"),
        (_download(SIGNATURE, 'keyrign = "/k.gpg"'), "download.keyrign", "did you mean 'keyring'"),
        (
            _download(SIGNATURE, KEYRING).replace(
                'checksum_url = "https://example.org/images/SHA512SUMS"',
                f'checksum = "{"a" * 128}"',
            ),
            "download.signature_url",
            "no 'checksum_url' for it to sign",
        ),
    ],
)
def test_bad_signature_settings_name_file_and_key(text: str, key: str, extra: str) -> None:
    with pytest.raises(ImageError) as failed:
        parse_image_entry(text, "images/test-9.toml")
    error = str(failed.value)
    assert "images/test-9.toml" in error and f"'{key}'" in error and extra in error


@pytest.mark.parametrize(
    ("text", "key", "extra"),
    [
        (
            _edit('algorithm = "sha512"', 'algoritm = "sha512"'),
            "download.algoritm",
            "did you mean 'algorithm'",
        ),
        (_edit("[download]", "[downlaod]"), "downlaod", "did you mean 'download'"),
        (_edit("descr", 'colour = "red"\ndescr'), "colour", "known keys"),
        (_edit('release = "9"', "release = 9"), "release", "must be a string"),
        (_edit('cloud_init = "v2"', 'cloud_init = "v3"'), "cloud_init", "eni, v2"),
        (_edit('format = "qcow2"', 'format = "vmdk"'), "download.format", "qcow2, raw"),
        (_edit('algorithm = "sha512"', 'algorithm = "md5"'), "download.algorithm", "sha256"),
        (
            _edit('os_family = "debian"', 'os_family = "debain"'),
            "os_family",
            "did you mean 'debian'",
        ),
        (_edit('console = "ttyS0"\n', ""), "console", "missing"),
        (
            _edit('url = "https://example.org/images/test', 'url = "ftp://example.org/images/test'),
            "download.url",
            "not an http(s) or file URL",
        ),
        (
            _edit('checksum_url = "https://example.org/images/SHA512SUMS"', 'checksum = "abc123"'),
            "download.checksum",
            "128 hex digits",
        ),
        (
            _edit('packages = ["sudo", "cloud-init"]', 'packages = "sudo"'),
            "build.packages",
            "non-empty list",
        ),
        (
            _edit('packages = ["sudo", "cloud-init"]', 'packages = ["sudo", "Bad Name"]'),
            "build.packages[1]",
            "not a Debian package name",
        ),
        (_edit('size = "2 GiB"', 'size = "big"'), "build.size", "not a size"),
        (_edit('suite = "stretch"\n', ""), "build.suite", "missing"),
        (_edit('name = "test-9"', 'name = "Test 9"'), "name", "not a valid image name"),
    ],
)
def test_bad_entries_name_file_and_key(text: str, key: str, extra: str) -> None:
    with pytest.raises(ImageError) as failed:
        parse_image_entry(text, "images/test-9.toml")
    error = str(failed.value)
    assert "images/test-9.toml" in error
    assert f"'{key}'" in error
    assert extra in error


def test_entry_needs_download_or_build() -> None:
    text = GOOD.split("[download]")[0]
    with pytest.raises(ImageError, match=r"test-9\.toml: .*neither a \[download\] nor"):
        parse_image_entry(text, "test-9.toml")


def test_download_needs_exactly_one_way_to_verify() -> None:
    unverified = _edit('checksum_url = "https://example.org/images/SHA512SUMS"\n', "")
    with pytest.raises(ImageError, match="neither 'checksum_url' nor 'checksum'"):
        parse_image_entry(unverified, "test-9.toml")
    both = (
        _edit("[build]", "")
        .replace('format = "qcow2"', f'format = "qcow2"\nchecksum = "{"a" * 128}"')
        .split("suite")[0]
    )
    with pytest.raises(ImageError, match="both 'checksum_url' and 'checksum'"):
        parse_image_entry(both, "test-9.toml")


def test_invalid_toml_names_the_file() -> None:
    with pytest.raises(ImageError, match=r"broken\.toml: not valid TOML.*line 2"):
        parse_image_entry("name = 'x'\nfoo = = 1\n", "broken.toml")


def test_find_image_by_name_and_unknown_name() -> None:
    assert find_image("debian-12").name == "debian-12"
    with pytest.raises(ImageError) as failed:
        find_image("debian-13")
    assert "debian-13" in failed.value.message
    assert "debian-12, ubuntu-14.04, ubuntu-24.04" in failed.value.message
    assert "did you mean 'debian-12'" in (failed.value.hint or "")


def _unverified(entry: ImageEntry) -> None:
    assert entry.download is not None and entry.download.checksum is None
    assert entry.download.checksum_url is None and "unverified" in entry.notes


def test_local_file_and_file_url(tmp_path: Path) -> None:
    qcow2 = tmp_path / "disk.qcow2"
    qcow2.write_bytes(b"QFI\xfb" + bytes(100))
    raw = tmp_path / "disk.img"
    raw.write_bytes(bytes(512))
    for location, base in [
        (str(qcow2), None),
        ("disk.qcow2", tmp_path),
        (qcow2.as_uri(), None),
        ("./disk.qcow2", tmp_path),
    ]:
        assert is_location(location)
        entry = find_image(location, catalog={}, base_dir=base)
        _unverified(entry)
        assert entry.name == qcow2.as_uri()
        assert entry.download is not None and entry.download.format is DiskFormat.QCOW2
    raw_entry = find_image(str(raw), catalog={})
    assert raw_entry.download is not None and raw_entry.download.format is DiskFormat.RAW
    with pytest.raises(ImageError, match="does not exist"):
        find_image(str(tmp_path / "missing.qcow2"), catalog={})


def test_url_location() -> None:
    url = "https://example.org/path/custom.img"
    entry = find_image(url, catalog={})
    _unverified(entry)
    assert entry.name == url and entry.download is not None and entry.download.url == url
    with pytest.raises(ImageError, match="unsupported scheme 'ftp'"):
        find_image("ftp://example.org/x.qcow2", catalog={})
    with pytest.raises(ImageError, match="no host or no file name"):
        find_image("https://example.org/", catalog={})
