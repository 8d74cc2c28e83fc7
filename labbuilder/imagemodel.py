"""The image catalog's model: frozen dataclasses describing base images and how to get them.

An image is either downloaded (``DownloadSource``), built locally from a distribution's
archive (``BuildRecipe``), or both. Catalog files in ``images/`` are parsed into these by
``labbuilder.catalog``; nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class CloudInitFlavour(StrEnum):
    """Which form of network configuration the image's cloud-init understands."""

    ENI = "eni"  # Ubuntu 14.04's cloud-init 0.7.5: Debian `network-interfaces` text
    V2 = "v2"  # netplan-style network-config version 2


class DiskFormat(StrEnum):
    QCOW2 = "qcow2"
    RAW = "raw"


class ChecksumAlgorithm(StrEnum):
    SHA256 = "sha256"
    SHA512 = "sha512"


@dataclass(frozen=True)
class DownloadSource:
    """Where an image is published and how to verify it."""

    url: str
    checksum_url: str | None  # a SHA256SUMS-style file listing the image's file name
    checksum: str | None  # a pinned hex digest; used when there is no checksum file
    algorithm: ChecksumAlgorithm
    format: DiskFormat
    signature_url: str | None = None  # detached signature of the checksum file, if published


@dataclass(frozen=True)
class BuildRecipe:
    """How to build the image natively on the host from a distribution archive (mmdebstrap)."""

    suite: str  # e.g. "bookworm"
    mirror: str  # e.g. "http://deb.debian.org/debian"
    packages: tuple[str, ...]  # what goes into the image besides the essential set
    kernel_package: str  # e.g. "linux-image-cloud-amd64"
    size: str  # the image's virtual size, e.g. "2 GiB" (nodes grow it to the plan's disk size)


@dataclass(frozen=True)
class ImageEntry:
    """One catalog entry: a base OS image a lab can name."""

    name: str  # e.g. "debian-12", "ubuntu-14.04"
    description: str
    os_family: str  # "debian" or "ubuntu"
    release: str  # "12", "14.04", ...
    cloud_init: CloudInitFlavour
    default_user: str
    console: str  # kernel console notes, e.g. "ttyS0"
    download: DownloadSource | None
    build: BuildRecipe | None
    notes: str = ""
