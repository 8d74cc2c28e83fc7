"""The host probe's decision, remembered until the host changes.

Acceleration does not change while the host runs, but proving it boots a guest; on hosts where
libvirt cannot use KVM that alone can take a minute. ``up`` reuses the last decision while the
boot ID, /dev/kvm's owner and mode and the libvirt URI are the same; ``doctor`` always probes.
"""

from __future__ import annotations

import json
from pathlib import Path

from labbuilder.common.paths import default_cache_dir, state_root
from labbuilder.host.probe import HostProbe, find_probe_kernel, probe_host
from labbuilder.lifecycle.state import write_secret_file
from labbuilder.model.probe import Acceleration, DomainType, VirtType

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


PROBE_VERSION = 2  # bump when the probe proves acceleration differently


def host_key(uri: str, kernel: Path | None) -> str:
    """What the decision depends on, as one string."""
    boot = BOOT_ID.read_text().strip() if BOOT_ID.exists() else "?"
    try:
        kvm = Path("/dev/kvm").stat()
        device = f"{kvm.st_mode:o}:{kvm.st_gid}"
    except OSError:
        device = "none"
    return f"v{PROBE_VERSION}|{uri}|{boot}|{device}|{kernel}"


def cache_path() -> Path:
    """Beside the image cache: a fact about the host, shared by every lab (and test) on it."""
    return default_cache_dir() / "probe.json"


def probe(uri: str, *, kernel: Path | None = None, fresh: bool = False) -> HostProbe:
    """The host's probe answer. ``kernel`` is the Linux kernel the lab boots: only booting it
    under KVM proves that KVM runs the lab (without one, the cache's newest built kernel)."""
    kernel = kernel or find_probe_kernel(default_cache_dir())
    key = host_key(uri, kernel)
    path = cache_path()
    if not fresh and path.exists():
        try:
            saved = json.loads(path.read_text())
            if saved.get("key") == key:
                return HostProbe(
                    uri=uri,
                    findings=(),
                    acceleration=Acceleration(saved["acceleration"]),
                    nested=saved["nested"],
                    virt_type=VirtType(saved["virt_type"]),
                    cpu_passthrough=saved["cpu_passthrough"],
                    domain_type=DomainType(saved["domain_type"]),
                    libvirt_version=saved.get("libvirt_version"),
                    qemu_version=saved.get("qemu_version"),
                )
        except (ValueError, KeyError):
            pass  # an unreadable cache is probed afresh
    result = probe_host(uri, storage=state_root(), kernel=kernel)
    if result.libvirt_version is not None:  # only a real answer is worth remembering
        record = {
            "key": key,
            "acceleration": str(result.acceleration),
            "nested": result.nested,
            "virt_type": str(result.virt_type),
            "cpu_passthrough": result.cpu_passthrough,
            "domain_type": str(result.domain_type),
            "libvirt_version": result.libvirt_version,
            "qemu_version": result.qemu_version,
        }
        write_secret_file(path, json.dumps(record, indent=1).encode())
    return result
