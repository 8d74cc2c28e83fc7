"""The NoCloud seed ISO, read back with pycdlib through each of its name spaces."""

from __future__ import annotations

import io

import pycdlib
import pytest

from labbuilder.lifecycle.seed_iso import build_seed_iso

FILES = {
    "user-data": b"#cloud-config\nlocale: C.UTF-8\n",
    "meta-data": b"instance-id: lbtest-1\nlocal-hostname: controller\n",
    "network-config": b"version: 2\nethernets: {}\n",
    "network-interfaces": b"auto eth0\niface eth0 inet dhcp\n",
}


def _open(data: bytes) -> pycdlib.PyCdlib:
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(data))
    return iso


def _read(iso: pycdlib.PyCdlib, **path: str) -> bytes:
    out = io.BytesIO()
    iso.get_file_from_iso_fp(out, **path)
    return out.getvalue()


def test_volume_id_is_cidata_with_joliet_and_rock_ridge() -> None:
    iso = _open(build_seed_iso(FILES))
    try:
        assert iso.pvd.volume_identifier.decode().strip() == "cidata"
        assert iso.has_rock_ridge()
        assert iso.has_joliet()
    finally:
        iso.close()


@pytest.mark.parametrize("name", sorted(FILES))
def test_files_read_back_by_rock_ridge_and_joliet_names(name: str) -> None:
    iso = _open(build_seed_iso(FILES))
    try:
        assert _read(iso, rr_path=f"/{name}") == FILES[name]
        assert _read(iso, joliet_path=f"/{name}") == FILES[name]
    finally:
        iso.close()


def test_iso9660_names_are_unique_even_when_long_names_share_a_prefix() -> None:
    iso = _open(build_seed_iso(FILES))
    try:
        names = [child.file_identifier().decode() for child in iso.list_children(iso_path="/")]
        files = [n for n in names if n not in (".", "..")]
        assert len(files) == len(set(files)) == len(FILES)
    finally:
        iso.close()


def test_empty_files_are_allowed() -> None:
    iso = _open(build_seed_iso({"user-data": b"", "meta-data": b""}))
    try:
        assert _read(iso, rr_path="/user-data") == b""
    finally:
        iso.close()


def test_missing_meta_data_is_refused() -> None:
    with pytest.raises(ValueError, match="meta-data"):
        build_seed_iso({"user-data": b""})


@pytest.mark.parametrize("name", ["User-Data", "dir/user-data", "", "../x"])
def test_odd_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="plain lower-case"):
        build_seed_iso({"user-data": b"", "meta-data": b"", name: b"x"})
