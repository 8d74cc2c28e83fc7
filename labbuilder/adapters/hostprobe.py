"""The host probe's side effects: reading /proc/cpuinfo, the KVM modules' ``nested`` parameter,
/dev/kvm, apt's proxy settings and DNS, finding a kernel for the Linux proof in the image
cache; and switching nested virtualization on with modprobe.

Paths are module constants so that tests can point them at fabricated files.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import socket
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import libvirt

from labbuilder.adapters import libvirt as lv
from labbuilder.adapters import processes
from labbuilder.adapters.libvirterrors import translated
from labbuilder.adapters.probeguest import boot_probe_guest
from labbuilder.common.errors import HostError
from labbuilder.common.paths import KERNEL_FILE, built_images_dir
from labbuilder.model.probe import DevKvm, KsmFacts, NestedFacts, Resolved

CPUINFO = Path("/proc/cpuinfo")
SYS_MODULE = Path("/sys/module")
DEV_KVM = Path("/dev/kvm")
APT_CONF = (Path("/etc/apt/apt.conf"), Path("/etc/apt/apt.conf.d"))
MODPROBE_CONF = Path("/etc/modprobe.d/labbuilder-nested.conf")
MODULE_FOR_FLAG = {"vmx": "kvm_intel", "svm": "kvm_amd"}
_PROXY = re.compile(r"""\bProxy\s+"([^"]+)"\s*;""", re.IGNORECASE)


def read_cpu_flags(path: Path | None = None) -> frozenset[str]:
    """The first CPU's flags from /proc/cpuinfo ("flags" on x86)."""
    text = (path or CPUINFO).read_text()
    match = re.search(r"^flags\s*:(.*)$", text, re.MULTILINE)
    return frozenset(match.group(1).split()) if match else frozenset()


def read_nested(cpuinfo: Path | None = None, sys_module: Path | None = None) -> NestedFacts:
    flags = read_cpu_flags(cpuinfo)
    flag = next((name for name in MODULE_FOR_FLAG if name in flags), None)
    if flag is None:
        return NestedFacts(None, None, None)
    module = MODULE_FOR_FLAG[flag]
    parameter = (sys_module or SYS_MODULE) / module / "parameters" / "nested"
    value = parameter.read_text().strip() if parameter.exists() else None
    return NestedFacts(flag, module, value)


def read_kvm_modules(sys_module: Path | None = None) -> tuple[str, ...]:
    """The loaded kernel modules whose name starts with kvm (kvm, kvm_intel, kvm_pvm, ...)."""
    try:
        names = [entry.name for entry in (sys_module or SYS_MODULE).iterdir()]
    except OSError:
        return ()
    return tuple(sorted(name for name in names if name.startswith("kvm")))


def find_probe_kernel(cache_dir: Path) -> Path | None:
    """The newest (by modification time) direct-boot kernel of a built image in the image
    cache ``cache_dir``: ``<cache_dir>/built/<image>/vmlinuz``, for the probe's Linux proof.
    None when no image has been built. Builds in progress (``.build-*``) are skipped.

    ``labbuilder.common.paths.default_cache_dir()`` is the usual ``cache_dir``.
    """
    kernels: list[tuple[float, str, Path]] = []
    try:
        images = list(built_images_dir(cache_dir).iterdir())
    except OSError:
        return None
    for image in images:
        kernel = image / KERNEL_FILE
        if image.name.startswith("."):
            continue
        try:
            info = kernel.stat()
        except OSError:
            continue
        if stat.S_ISREG(info.st_mode) and info.st_size > 0:
            kernels.append((info.st_mtime, str(kernel), kernel))
    return max(kernels)[2] if kernels else None


def read_dev_kvm(path: Path | None = None) -> DevKvm:
    path = path or DEV_KVM
    try:
        info = path.stat()
    except FileNotFoundError:
        return DevKvm(exists=False, path=str(path))
    return DevKvm(True, info.st_mode & 0o777, _user(info.st_uid), _group(info.st_gid), str(path))


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def apt_proxy_hosts(locations: Iterable[Path] = APT_CONF) -> list[str]:
    """Host names of apt's proxies (``Acquire::http::Proxy "http://host:3142";``)."""
    files: list[Path] = []
    for location in locations:
        if location.is_dir():
            files += sorted(path for path in location.iterdir() if path.is_file())
        elif location.is_file():
            files.append(location)
    hosts = []
    for file in files:
        text = re.sub(r"(?m)(^|\s)(//|#).*$", "", file.read_text(errors="replace"))
        for url in _PROXY.findall(text):
            host = urlsplit(url).hostname
            if host and host not in hosts:
                hosts.append(host)
    return hosts


def resolve(what: str, host: str) -> Resolved:
    """The IPv4 addresses of ``host``, as the host's resolver gives them."""
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    except OSError as err:
        return Resolved(what, host, (), err.strerror or str(err))
    return Resolved(what, host, tuple(sorted({str(info[4][0]) for info in infos})))


@translated
def libvirt_versions(conn: Any) -> tuple[str, str | None]:
    """libvirt's and the hypervisor's (QEMU's) version, as "9.0.0" and "7.2.0"."""
    qemu: str | None
    try:
        qemu = _version(conn.getVersion())
    except libvirt.libvirtError as err:
        if err.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
            raise
        qemu = None
    return _version(conn.getLibVersion()), qemu


def _version(number: int) -> str:
    return f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"


@translated
def active_domains(conn: Any) -> tuple[str, ...]:
    flags = libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE
    return tuple(sorted(domain.name() for domain in conn.listAllDomains(flags)))


# --- nested virtualization ------------------------------------------------------------------


@dataclass(frozen=True)
class NestedState:
    """What ``enable_nested`` needs to know before it may reload the KVM module."""

    nested: NestedFacts
    kvm_works: bool
    kvm_reason: str  # why KVM does (not) work, for the refusal
    active_domains: tuple[str, ...]
    root: bool


def nested_commands(module: str, conf: Path = MODPROBE_CONF) -> list[str]:
    """The commands that switch nesting on now and on every boot, as a user would type them."""
    return [
        f"modprobe -r {module}",
        f"modprobe {module} nested=1",
        f"echo 'options {module} nested=1' > {conf}",
    ]


def nested_plan(state: NestedState, conf: Path = MODPROBE_CONF) -> list[str]:
    """The actions ``enable_nested`` takes, [] when nesting is on already; or HostError saying
    why it will not, and what to run instead."""
    nested = state.nested
    if nested.cpu_flag is None or nested.module is None:
        raise HostError(
            "nested virtualization cannot be enabled: the CPU offers this host neither vmx "
            "(Intel VT-x) nor svm (AMD-V) (/proc/cpuinfo)",
            "enable VT-x/AMD-V in the firmware setup, or nested virtualization on the "
            "hypervisor this host runs in; then run `labbuilder doctor` again",
        )
    module = nested.module
    manual = " && ".join(nested_commands(module, conf))
    if nested.parameter is None:
        raise HostError(
            f"{module} is not loaded, so this host's KVM cannot be told to nest",
            f"run: modprobe {module} nested=1 && echo 'options {module} nested=1' > {conf}",
        )
    if nested.enabled:
        return []
    if not state.kvm_works:
        raise HostError(
            f"KVM does not run guests on this host ({state.kvm_reason}): nesting would not "
            "help until it does",
            f"make KVM work first (see `labbuilder doctor`), then run: {manual}",
        )
    if state.active_domains:
        raise HostError(
            f"{len(state.active_domains)} guest(s) are running "
            f"({', '.join(state.active_domains)}): {module} cannot be reloaded under them",
            f"shut them down, then run `labbuilder doctor --enable-nested` again, or: {manual}",
        )
    if not state.root:
        raise HostError(
            "reloading a kernel module needs root",
            f"run `sudo labbuilder doctor --enable-nested`, or as root: {manual}",
        )
    return nested_commands(module, conf)


KSM = Path("/sys/kernel/mm/ksm")


def read_ksm(folder: Path = KSM) -> KsmFacts:
    """KSM's state and how many pages it shares (``run`` None: the kernel has no KSM)."""

    def number(name: str) -> int | None:
        try:
            return int((folder / name).read_text().strip())
        except (OSError, ValueError):
            return None

    run = number("run")
    if run is None:
        return KsmFacts(None)
    return KsmFacts(run, number("pages_sharing") or 0, number("pages_shared") or 0)


def enable_ksm(*, dry_run: bool, folder: Path = KSM) -> list[str]:
    """Start KSM (write 1 to ``run``) so guests' identical pages are merged; the actions, []
    when it runs already. QEMU marks guest memory mergeable by default. It lasts until the
    host restarts (a boot script or sysfsutils keeps it). Raises HostError without KSM or root."""
    facts = read_ksm(folder)
    if facts.run is None:
        raise HostError(
            f"this kernel has no KSM ({folder} is missing)",
            "use a kernel built with CONFIG_KSM (Debian's and Ubuntu's are)",
        )
    if facts.run == 1:
        return []
    actions = [f"echo 1 > {folder / 'run'}"]
    if dry_run:
        return actions
    try:
        (folder / "run").write_text("1\n")
    except OSError as err:
        raise HostError(f"cannot start KSM: {err.strerror}", f"as root: {actions[0]}") from None
    return actions


def enable_nested(
    *,
    dry_run: bool,
    uri: str = "qemu:///system",
    kvm_works: bool | None = None,
    timeout: float = 30.0,
    kernel: Path | None = None,
) -> list[str]:
    """Switch on nested virtualization for the lab's compute nodes: reload kvm_intel/kvm_amd
    with nested=1 and persist it in ``MODPROBE_CONF``. Returns the actions (the commands);
    [] when nesting is on already. With ``dry_run``, checks and returns them, changing nothing.

    Refuses (HostError, naming the commands to run by hand) unless KVM really runs a guest
    (boots a probe guest unless ``kvm_works`` says: the boot sector, then ``kernel`` if
    given), no guest is running at ``uri``, and we are root. Reloading the module under
    running guests would kill them.
    """
    nested = read_nested()
    reason = "a KVM probe guest ran" if kvm_works else "a KVM probe guest did not run"
    conn = lv.connect(uri)
    try:
        if kvm_works is None and nested.parameter is not None and not nested.enabled:
            result = boot_probe_guest(conn, domain_type="kvm", timeout=timeout)
            if result.marker_seen and kernel is not None:
                result = boot_probe_guest(conn, domain_type="kvm", timeout=timeout, kernel=kernel)
            kvm_works, reason = result.marker_seen, result.reason
        state = NestedState(nested, bool(kvm_works), reason, active_domains(conn), _is_root())
    finally:
        conn.close()
    actions = nested_plan(state, MODPROBE_CONF)
    if dry_run or not actions:
        return actions
    assert nested.module is not None  # nested_plan refuses without one
    _reload_nested(nested.module)
    MODPROBE_CONF.write_text(
        f"# written by `labbuilder doctor --enable-nested`\noptions {nested.module} nested=1\n"
    )
    if read_nested().enabled is not True:
        raise HostError(
            f"{nested.module} was reloaded with nested=1, but its nested parameter still reads off",
            f"check `dmesg` for {nested.module}'s messages",
        )
    return actions


def _is_root() -> bool:
    return os.geteuid() == 0


def _reload_nested(module: str) -> None:
    _run(["modprobe", "-r", module])
    try:
        _run(["modprobe", module, "nested=1"])
    except HostError:
        with contextlib.suppress(HostError):
            _run(["modprobe", module])  # KVM without nesting is better than no KVM
        raise


def _run(argv: list[str]) -> None:
    """Run a local command; HostError with its stderr if it fails."""
    try:
        processes.run(argv)
    except processes.ProgramMissing:
        raise HostError(
            f"{argv[0]} is not installed", "install it (`apt-get install kmod`)"
        ) from None
    except processes.ProcessFailed as exc:
        output = " ".join((exc.result.errors or exc.result.output).split())
        raise HostError(
            f"`{' '.join(argv)}` failed (exit {exc.result.returncode}): {output}",
            "stop whatever uses /dev/kvm (guests, other hypervisors), then try again",
        ) from None
