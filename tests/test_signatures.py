"""Signed checksum files: real gpg keys made for the test, real gpgv, a real HTTP server.

Keys are made once per module in a temporary GNUPGHOME (``gpg --quick-gen-key``), exported as
binary keyrings and used to sign SHA256SUMS files the way distributions do (``SHA256SUMS.gpg``,
a detached signature). Needs ``gpg`` (Debian package gnupg) and ``gpgv`` on the host.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_download import IMAGE, IMAGE_SHA256, OTHER_SHA256, ImageServer, entry, running_server

from labbuilder.catalog.model import ImageEntry
from labbuilder.common.errors import ImageError
from labbuilder.images.cache import list_cached, pull
from labbuilder.images.signatures import verify_detached

SUMS = f"{OTHER_SHA256} *other.qcow2\n{IMAGE_SHA256} *disk.qcow2\n".encode()


@dataclass(frozen=True)
class Key:
    fingerprint: str
    keyring: Path  # the public key alone, exported as a binary keyring (what gpgv reads)


@dataclass(frozen=True)
class Keys:
    home: Path  # the GNUPGHOME holding the secret keys
    signer: Key
    stranger: Key  # another key, in no keyring the tests trust

    def sign(self, data: bytes, key: Key) -> bytes:
        """A detached binary signature of ``data`` by ``key``."""
        return gpg(self.home, "--local-user", key.fingerprint, "--detach-sign", stdin=data)


def gpg(home: Path, *args: str, stdin: bytes = b"") -> bytes:
    result = subprocess.run(
        ["gpg", "--homedir", str(home), "--batch", "--yes", "--output", "-", *args],
        input=stdin,
        capture_output=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout


def make_key(home: Path, name: str) -> Key:
    uid = f"{name} <{name.lower().replace(' ', '.')}@example.invalid>"
    gpg(home, "--passphrase", "", "--quick-gen-key", uid, "ed25519", "sign", "never")
    listing = gpg(home, "--with-colons", "--list-keys", uid).decode()
    fingerprint = next(line.split(":")[9] for line in listing.splitlines() if line[:4] == "fpr:")
    keyring = home.parent / f"{name.lower().replace(' ', '-')}.gpg"
    keyring.write_bytes(gpg(home, "--export", fingerprint))
    return Key(fingerprint, keyring)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keys]:
    if shutil.which("gpg") is None or shutil.which("gpgv") is None:
        pytest.fail("these tests need gpg and gpgv: apt-get install gnupg gpgv")
    home = tmp_path_factory.mktemp("gpg") / "home"
    home.mkdir(mode=0o700)
    try:
        yield Keys(home, make_key(home, "Test Signer"), make_key(home, "Stranger"))
    finally:  # stop the gpg-agent that gpg started for this home, and only that one
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"], check=False)


@pytest.fixture
def signed_server(keys: Keys) -> Iterator[ImageServer]:
    """The test server, with SHA256SUMS signed by the test signer as SHA256SUMS.gpg."""
    with running_server() as srv:
        srv.state.files["/img/SHA256SUMS"] = SUMS
        srv.state.files["/img/SHA256SUMS.gpg"] = keys.sign(SUMS, keys.signer)
        yield srv


def signed_entry(server: ImageServer, keyring: Path) -> ImageEntry:
    plain = entry(server)
    assert plain.download is not None
    download = dataclasses.replace(
        plain.download, signature_url=server.url("/img/SHA256SUMS.gpg"), keyring=keyring
    )
    return dataclasses.replace(plain, download=download)


def sidecar(path: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads(path.with_name(path.name + ".json").read_text())
    return data


# --- verify_detached -------------------------------------------------------------------------


def test_good_signature_returns_the_signing_key(keys: Keys) -> None:
    signature = keys.sign(SUMS, keys.signer)
    assert verify_detached(SUMS, signature, keys.signer.keyring) == keys.signer.fingerprint


def test_tampered_data_is_rejected(keys: Keys) -> None:
    signature = keys.sign(SUMS, keys.signer)
    with pytest.raises(ImageError) as failed:
        verify_detached(SUMS.replace(b"disk", b"dusk"), signature, keys.signer.keyring)
    assert "BAD signature" in failed.value.message
    assert str(keys.signer.keyring) in failed.value.message
    assert "altered" in (failed.value.hint or "")


def test_signature_by_a_key_not_in_the_keyring_is_rejected(keys: Keys) -> None:
    signature = keys.sign(SUMS, keys.stranger)
    with pytest.raises(ImageError) as failed:
        verify_detached(SUMS, signature, keys.signer.keyring)
    assert "No public key" in failed.value.message
    assert keys.stranger.fingerprint in (failed.value.hint or "")


def test_an_extra_signature_by_an_unknown_key_is_ignored(keys: Keys) -> None:
    both = keys.sign(SUMS, keys.stranger) + keys.sign(SUMS, keys.signer)
    assert verify_detached(SUMS, both, keys.signer.keyring) == keys.signer.fingerprint


def test_garbage_signature_is_rejected(keys: Keys) -> None:
    with pytest.raises(ImageError, match="no valid OpenPGP data") as failed:
        verify_detached(SUMS, b"<html>not found</html>\n", keys.signer.keyring)
    assert "not an OpenPGP signature" in (failed.value.hint or "")


def test_missing_keyring_names_the_package_to_install(keys: Keys, tmp_path: Path) -> None:
    signature = keys.sign(SUMS, keys.signer)
    ubuntu = tmp_path / "ubuntu-cloudimage-keyring.gpg"
    with pytest.raises(ImageError, match="does not exist") as failed:
        verify_detached(SUMS, signature, ubuntu)
    assert str(ubuntu) in failed.value.message
    assert "apt-get install ubuntu-keyring" in (failed.value.hint or "")
    with pytest.raises(ImageError) as failed:
        verify_detached(SUMS, signature, tmp_path / "vendor.gpg")
    assert "apt-file search vendor.gpg" in (failed.value.hint or "")


def test_relative_and_armored_keyrings(
    keys: Keys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    signature = keys.sign(SUMS, keys.signer)
    monkeypatch.chdir(keys.signer.keyring.parent)  # gpgv alone would look in its home
    assert verify_detached(SUMS, signature, Path(keys.signer.keyring.name)) == (
        keys.signer.fingerprint
    )
    armored = tmp_path / "signer.asc"
    armored.write_bytes(gpg(keys.home, "--armor", "--export", keys.signer.fingerprint))
    with pytest.raises(ImageError, match="ASCII-armored") as failed:
        verify_detached(SUMS, signature, armored)
    assert "gpg --dearmor" in (failed.value.hint or "")


def test_missing_gpgv_names_the_package_to_install(
    keys: Keys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    signature = keys.sign(SUMS, keys.signer)
    monkeypatch.setenv("PATH", str(tmp_path))  # no gpgv there
    with pytest.raises(ImageError, match="gpgv is not installed") as failed:
        verify_detached(SUMS, signature, keys.signer.keyring)
    assert failed.value.hint == "apt-get install gpgv"


# --- pull ------------------------------------------------------------------------------------


def test_pull_with_good_signature_records_the_signer(
    keys: Keys, signed_server: ImageServer, tmp_path: Path
) -> None:
    image_entry = signed_entry(signed_server, keys.signer.keyring)
    first = pull(image_entry, tmp_path, retry_delay=0)
    assert first.signed_by == keys.signer.fingerprint and first.verified
    assert first.path.read_bytes() == IMAGE
    assert sidecar(first.path)["signed_by"] == keys.signer.fingerprint
    [record] = list_cached(tmp_path)
    assert record.signed_by == keys.signer.fingerprint

    again = pull(image_entry, tmp_path, retry_delay=0)  # the signature is checked every time
    assert (again.bytes_downloaded, again.signed_by) == (0, keys.signer.fingerprint)
    assert len(signed_server.state.served("/img/SHA256SUMS.gpg")) == 2
    assert pull(image_entry, tmp_path, offline=True).path == first.path


def test_tampered_checksum_file_downloads_nothing(
    keys: Keys, signed_server: ImageServer, tmp_path: Path
) -> None:
    signed_server.state.files["/img/SHA256SUMS"] = SUMS.replace(b"\n", b"\n\n", 1)
    with pytest.raises(ImageError) as failed:
        pull(signed_entry(signed_server, keys.signer.keyring), tmp_path, retry_delay=0)
    message = failed.value.message
    assert signed_server.url("/img/SHA256SUMS ") in message
    assert signed_server.url("/img/SHA256SUMS.gpg") in message
    assert "BAD signature" in message
    assert signed_server.state.served("/img/disk.qcow2") == []
    assert list_cached(tmp_path) == [] and not (tmp_path / "images").exists()


def test_bad_signature_does_not_trust_the_cached_copy(
    keys: Keys, signed_server: ImageServer, tmp_path: Path
) -> None:
    image_entry = signed_entry(signed_server, keys.signer.keyring)
    cached = pull(image_entry, tmp_path, retry_delay=0)
    signed_server.state.files["/img/SHA256SUMS.gpg"] = keys.sign(SUMS, keys.stranger)
    with pytest.raises(ImageError, match="not trusted") as failed:
        pull(image_entry, tmp_path, retry_delay=0)
    assert "No public key" in failed.value.message
    assert keys.stranger.fingerprint in (failed.value.hint or "")
    assert cached.path.read_bytes() == IMAGE  # kept, but not handed out
    assert len(signed_server.state.served("/img/disk.qcow2")) == 1


def test_missing_signature_file_is_an_error(
    keys: Keys, signed_server: ImageServer, tmp_path: Path
) -> None:
    signed_server.state.not_found.add("/img/SHA256SUMS.gpg")
    with pytest.raises(ImageError) as failed:
        pull(signed_entry(signed_server, keys.signer.keyring), tmp_path, retry_delay=0)
    message = failed.value.message
    assert "HTTP 404" in message
    assert signed_server.url("/img/SHA256SUMS ") in message
    assert signed_server.url("/img/SHA256SUMS.gpg") in message
    assert signed_server.state.served("/img/disk.qcow2") == []


def test_missing_keyring_is_an_error_with_the_package_hint(
    signed_server: ImageServer, tmp_path: Path
) -> None:
    keyring = tmp_path / "keyrings" / "ubuntu-cloudimage-keyring.gpg"
    with pytest.raises(ImageError, match="does not exist") as failed:
        pull(signed_entry(signed_server, keyring), tmp_path, retry_delay=0)
    assert str(keyring) in failed.value.message
    assert signed_server.url("/img/SHA256SUMS.gpg") in failed.value.message
    assert "apt-get install ubuntu-keyring" in (failed.value.hint or "")
    assert signed_server.state.served("/img/disk.qcow2") == []


def test_copy_cached_before_signatures_is_adopted_once_the_signature_checks(
    keys: Keys, signed_server: ImageServer, tmp_path: Path
) -> None:
    image_entry = signed_entry(signed_server, keys.signer.keyring)
    unsigned = pull(entry(signed_server), tmp_path, retry_delay=0)  # as before signatures
    assert unsigned.signed_by is None and sidecar(unsigned.path)["signed_by"] is None
    with pytest.raises(ImageError, match="with a checked signature"):
        pull(image_entry, tmp_path, offline=True)

    adopted = pull(image_entry, tmp_path, retry_delay=0)
    assert (adopted.path, adopted.bytes_downloaded) == (unsigned.path, 0)
    assert sidecar(adopted.path)["signed_by"] == keys.signer.fingerprint
    assert pull(image_entry, tmp_path, offline=True).signed_by == keys.signer.fingerprint
