"""One renderer for libvirt's XML: a jinja2 environment with XML autoescaping and strict
undefined values, over ``templates/`` beside this module and the ``networks/`` data folder.

Domains are described by ``Domain`` (plain values, no plan) and rendered by one template,
``domain.xml.j2``; networks by a template per kind. Every value reaching a template is escaped
for XML, so a path or name holding ``<``, ``&`` or a quote stays one value.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources

import jinja2

from labbuilder.common.resources import data_dir

METADATA_NS = "urn:labbuilder:lab:1"  # labbuilder's <lb:lab> metadata: who owns the object
METADATA_PREFIX = "lb"
DATA_FOLDER_TEMPLATES = ("networks",)  # "networks/nat.xml.j2" is read from that data folder


@dataclass(frozen=True)
class Disk:
    """A disk: a storage volume (``pool`` and ``volume``) or, without a pool, the host's
    file ``file``."""

    device: str  # "vda"
    format: str  # "qcow2" or "raw"
    pool: str | None = None
    volume: str | None = None
    file: str | None = None
    bus: str = "virtio"
    readonly: bool = False
    discard: bool = False  # the guest's discards free the image's blocks (discard="unmap")


@dataclass(frozen=True)
class Nic:
    """A virtio NIC on a libvirt network."""

    network: str
    mac: str


@dataclass(frozen=True)
class Serial:
    """A serial port: a pty whose output libvirt may copy to ``log``, or, with ``file``, a
    port that writes into that file."""

    port: int
    file: str | None = None
    log: str | None = None
    append: bool = True  # the log keeps what earlier boots wrote


@dataclass(frozen=True)
class Domain:
    """A libvirt domain of the pc machine type, as labbuilder defines them.

    Direct kernel boot with ``kernel`` (``initrd`` and ``cmdline`` when given), otherwise from
    the first disk. ``platform``: ACPI, APIC and a UTC clock, what a Linux guest expects.
    ``console`` puts the console on serial port 0; ``rng`` gives the guest the host's
    /dev/urandom. A reboot restarts the guest unless ``on_reboot`` says otherwise; a power-off or
    crash ends it.
    """

    type: str  # "kvm" or "qemu"
    name: str
    memory: int
    memory_unit: str  # "b", "MiB"
    vcpus: int = 1
    metadata: tuple[tuple[str, str], ...] = ()  # the <lb:lab> attributes; () for none
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None
    platform: bool = True
    cpu_passthrough: bool = False
    on_reboot: str = "restart"
    disks: tuple[Disk, ...] = ()
    nics: tuple[Nic, ...] = ()
    serials: tuple[Serial, ...] = ()
    console: bool = True
    rng: bool = True


def _load(name: str) -> str:
    folder, _, file = name.rpartition("/")
    if folder in DATA_FOLDER_TEMPLATES:
        return data_dir(folder).joinpath(file).read_text()
    if folder:
        raise jinja2.TemplateNotFound(name)
    return (resources.files("labbuilder.libvirtxml") / "templates" / name).read_text()


@cache
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FunctionLoader(_load),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    env.globals["ns"] = METADATA_NS
    return env


def render_xml(template: str, **values: object) -> str:
    """Render the XML template ``template`` (a name in ``templates/``, or ``networks/<file>``)
    with ``values``; ``ns`` is labbuilder's metadata namespace."""
    return _environment().get_template(template).render(**values)


def domain_xml(domain: Domain) -> str:
    """The domain XML of ``domain``."""
    return render_xml("domain.xml.j2", domain=domain)
