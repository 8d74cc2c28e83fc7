"""The image catalog's model: frozen dataclasses describing base images and how to get them.

An image is either downloaded (``DownloadSource``), built locally from a distribution's
archive (``BuildRecipe``), or both. Catalog files in ``images/`` are parsed into these by
``labbuilder.catalog.files``, which checks them with ``verification_problem``; nothing here
does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path


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


HEX_DIGITS = {ChecksumAlgorithm.SHA256: 64, ChecksumAlgorithm.SHA512: 128}
UBUNTU_CLOUDIMAGE_KEYRING = "/usr/share/keyrings/ubuntu-cloudimage-keyring.gpg"  # ubuntu-keyring


@dataclass(frozen=True)
class DownloadSource:
    """Where an image is published and how to verify it."""

    url: str
    checksum_url: str | None  # a SHA256SUMS-style file listing the image's file name
    checksum: str | None  # a pinned hex digest; used when there is no checksum file
    algorithm: ChecksumAlgorithm
    format: DiskFormat
    signature_url: str | None = None  # detached signature of the checksum file, if published
    keyring: Path | None = None  # OpenPGP keyring (binary) that signature_url must verify against
    # Direct kernel boot, for a disk without a boot loader (a whole-disk file system): the
    # kernel and initrd are published next to the image and listed in its checksum file.
    kernel_url: str | None = None
    initrd_url: str | None = None
    cmdline: str | None = None


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


def verification_problem(source: DownloadSource) -> tuple[str, str] | None:
    """What keeps a catalog entry's download from being verified as configured, or None.

    Returns ``(problem, hint)``; the problem names the ``[download]`` keys involved. A catalog
    entry needs exactly one of checksum_url and checksum (a digest of the right length), and a
    signature_url (over the checksum file) comes with the keyring it is verified against.
    Images named by location are unverified on purpose and are not checked with this.
    """
    if source.checksum_url and source.checksum:
        return "[download] has both 'checksum_url' and 'checksum'", (
            "keep one: checksum_url for a published SHA256SUMS-style file, "
            "checksum for a pinned digest"
        )
    if not source.checksum_url and not source.checksum:
        return (
            "[download] has neither 'checksum_url' nor 'checksum', so the image could not be "
            "verified",
            "add checksum_url (the SHA256SUMS/SHA512SUMS file next to the image) or "
            "a pinned checksum",
        )
    digits = HEX_DIGITS[source.algorithm]
    if source.checksum is not None and (
        len(source.checksum) != digits or source.checksum.strip("0123456789abcdefABCDEF")
    ):
        return (
            f"key 'download.checksum' is not a {source.algorithm} digest ({digits} hex digits)",
            "copy the digest from the published checksum file, or set 'algorithm' to match it",
        )
    return _signature_problem(source) or _boot_problem(source)


def _boot_problem(source: DownloadSource) -> tuple[str, str] | None:
    """Direct kernel boot needs all of kernel_url, initrd_url and cmdline, and a checksum file
    that lists the kernel and initrd (a pinned checksum covers the image only)."""
    given = [key for key in ("kernel_url", "initrd_url", "cmdline") if getattr(source, key)]
    if not given:
        return None
    if len(given) != 3:
        missing = sorted({"kernel_url", "initrd_url", "cmdline"} - set(given))
        return (
            f"[download] has {', '.join(given)} but not {', '.join(missing)}",
            "direct kernel boot needs kernel_url, initrd_url and cmdline together; "
            "remove them all to boot the disk's own boot loader",
        )
    if not source.checksum_url:
        return (
            "key 'download.kernel_url' needs 'download.checksum_url': the kernel and initrd "
            "are verified against the same checksum file as the image",
            "publish a checksum file listing the image, the kernel and the initrd",
        )
    return None


def _signature_problem(source: DownloadSource) -> tuple[str, str] | None:
    example = f'keyring = "{UBUNTU_CLOUDIMAGE_KEYRING}" (Debian package ubuntu-keyring)'
    if source.signature_url and not source.checksum_url:
        return (
            "key 'download.signature_url' is set, but there is no 'checksum_url' for it to sign",
            "the signature covers the published checksum file: add checksum_url, or "
            "remove signature_url",
        )
    if source.signature_url and source.keyring is None:
        return (
            "key 'download.keyring' is missing: 'download.signature_url' needs the OpenPGP "
            "keyring its signature must verify against",
            f"add the distribution's keyring file, e.g. {example}",
        )
    if source.keyring is not None and not source.signature_url:
        return "key 'download.keyring' is set without 'download.signature_url'", (
            "add signature_url (the checksum file's detached signature, e.g. SHA256SUMS.gpg), "
            "or remove keyring"
        )
    if source.keyring is not None and not source.keyring.is_absolute():
        return (
            f"key 'download.keyring' is {str(source.keyring)!r}, which is not an absolute path",
            f"write the keyring file's full path, e.g. {example}",
        )
    return None


@dataclass(frozen=True)
class BaseImage:
    """An image in the cache that a lab's nodes boot from: the disk the overlays sit on, and how
    it boots (``labbuilder.images.boot`` resolves a lab's image to one)."""

    name: str
    disk: Path  # qcow2
    digest: str  # identifies the content; names the shared volumes
    kernel: Path | None  # direct kernel boot, or None to boot the disk's own boot loader
    initrd: Path | None
    cmdline: str | None
    cloud_init: CloudInitFlavour
    default_user: str

    @property
    def volume_stem(self) -> str:
        return f"base-{self.name}-{self.digest[:16]}"
