"""What labbuilder asks of a hypervisor, as a ``Protocol`` with frozen records.

Callers see domains, networks, volumes and snapshots as records read at one moment (names,
state, XML, labbuilder's metadata), and act on them by name; ``adapters.libvirt`` implements
``Hypervisor`` (``LibvirtHypervisor``). Errors are ``HypervisorError``, with libvirt's error code
where libvirt gave one.

Everything labbuilder creates carries ``<lb:lab>`` metadata in the ``METADATA_NS`` namespace, so
which lab owns a network or domain is read from the hypervisor itself, even after a crash.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from labbuilder.adapters.savefile import SaveImage
from labbuilder.libvirtxml.render import METADATA_NS as METADATA_NS
from labbuilder.libvirtxml.render import METADATA_PREFIX as METADATA_PREFIX
from labbuilder.model.lab import LabUse, LibvirtNetworkFact


def owner_lab(xml: str) -> str | None:
    """The lab named in an object's labbuilder metadata, if it has any."""
    root = ET.fromstring(xml)
    lab = root.find(f"metadata/{{{METADATA_NS}}}lab")
    return lab.get("name") if lab is not None else None


def lab_metadata(xml: str) -> dict[str, str]:
    """All attributes of an object's labbuilder metadata (lab, node, role, plan, ...)."""
    root = ET.fromstring(xml)
    element = root.find(f"metadata/{{{METADATA_NS}}}lab")
    return dict(element.attrib) if element is not None else {}


def volume_lab(name: str) -> str | None:
    """The lab a volume of labbuilder's pool belongs to, from its name (``<lab>__<node>__<disk>``);
    None for shared (base) volumes."""
    return name.split("__", 1)[0] if "__" in name else None


@dataclass(frozen=True)
class Domain:
    """A domain as it was when read."""

    name: str
    state: str  # "running", "paused", "shutting down", "shut off", "crashed", "suspended", ...
    active: bool
    xml: str
    memory: int  # bytes it holds now

    @property
    def metadata(self) -> dict[str, str]:
        return lab_metadata(self.xml)

    @property
    def lab(self) -> str | None:
        return owner_lab(self.xml)

    @property
    def node(self) -> str:
        """The lab's name for the node, from the metadata (else the domain's name)."""
        return self.metadata.get("node") or self.name

    @property
    def domain_type(self) -> str:
        """libvirt's domain type: ``kvm`` or ``qemu`` (TCG)."""
        return ET.fromstring(self.xml).get("type", "qemu")


@dataclass(frozen=True)
class Network:
    """A virtual network as it was when read."""

    name: str
    active: bool
    xml: str

    @property
    def metadata(self) -> dict[str, str]:
        return lab_metadata(self.xml)

    @property
    def lab(self) -> str | None:
        return owner_lab(self.xml)


@dataclass(frozen=True)
class Volume:
    """A storage volume of a pool."""

    name: str
    pool: str
    path: str

    @property
    def lab(self) -> str | None:
        return volume_lab(self.name)


@dataclass(frozen=True)
class Snapshot:
    """A domain's snapshot: its name and XML (description, state, memory, disks)."""

    domain: str
    name: str
    xml: str


class Hypervisor(Protocol):
    """The hypervisor of one host, as far as labbuilder's lifecycle uses it. Objects are named;
    ``lab=None`` means every lab's. Only objects carrying labbuilder metadata are listed."""

    # --- reading
    def domains(self, lab: str | None = None) -> list[Domain]: ...
    def domain(self, name: str) -> Domain | None: ...
    def networks(self, lab: str | None = None) -> list[Network]: ...
    def network(self, name: str) -> Network | None: ...
    def network_facts(self) -> tuple[LibvirtNetworkFact, ...]: ...
    def used_macs(self) -> tuple[tuple[str, str], ...]: ...
    def running_memory(self, lab: str) -> int: ...
    def lab_uses(self, pool: str, path: str) -> tuple[LabUse, ...]: ...
    def domain_state(self, name: str) -> str: ...
    def is_active(self, name: str) -> bool: ...

    # --- domains and networks
    def suspend_domain(self, name: str) -> None: ...
    def resume_domain(self, name: str) -> None: ...
    def reset_domain(self, name: str) -> None: ...
    def remove_domain(self, name: str) -> None: ...
    def remove_network(self, name: str) -> None: ...

    # --- making (an existing object of the lab is kept; another owner's is refused)
    def ensure_network(self, name: str, xml: str, *, lab: str | None = None) -> Network: ...
    def ensure_domain(self, name: str, xml: str, *, lab: str | None = None) -> Domain:
        """Define the domain unless it exists, and start it unless it runs."""

    def ensure_pool(self, name: str, path: str) -> str:
        """labbuilder's directory pool ``name`` at ``path``, defined and started; its name."""

    def ensure_uploaded_file(
        self, pool: str, name: str, path: Path, *, progress: Callable[[int], None] | None = None
    ) -> Volume: ...
    def upload(
        self,
        pool: str,
        name: str,
        source: BinaryIO,
        size: int,
        *,
        progress: Callable[[int], None] | None = None,
    ) -> Volume: ...
    def ensure_overlay(self, pool: str, name: str, backing: Volume, capacity: int) -> Volume: ...
    def ensure_empty_disk(self, pool: str, name: str, capacity: int) -> Volume: ...
    def find_volume(self, pool: str, name: str) -> Volume | None: ...
    def volume_backing(self, volume: Volume) -> str | None:
        """The path of the file a qcow2 volume backs onto, if any."""

    def refresh_pool(self, pool: str) -> None:
        """Let the pool list the files written into its directory meanwhile."""

    # --- volumes (in labbuilder's own pool: ``pool`` at ``path``)
    def lab_volumes(self, pool: str, path: str, lab: str | None = None) -> list[Volume]: ...
    def delete_volume(self, volume: Volume) -> None: ...
    def refuse_foreign_pool(self, pool: str, path: str) -> None:
        """Raise ``PlanError`` if the host has a pool named ``pool`` that is not labbuilder's
        directory pool at ``path``."""

    # --- snapshots
    def snapshots(self, domain: str) -> list[Snapshot]: ...
    def create_snapshot(self, domain: str, xml: str) -> None: ...
    def delete_snapshot(self, domain: str, name: str) -> bool: ...
    def revert_snapshot(self, domain: str, name: str, *, running: bool = True) -> None: ...
    def snapshot_state_sizes(self, domain: str) -> dict[str, int] | None: ...
    def writable_disk_paths(self, domain: str) -> list[str] | None: ...

    # --- memory state (save images: ``adapters.savefile``)
    def save_domain(self, name: str, path: Path) -> None:
        """Save the domain's memory to ``path``; the domain stops."""

    def restore_domain(self, image: SaveImage, xml: str, *, paused: bool) -> Domain:
        """A new persistent domain, defined by ``xml``, resumed from the memory in ``image``."""

    def close(self) -> None: ...
