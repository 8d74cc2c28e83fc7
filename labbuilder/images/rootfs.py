"""The steps of an image build: mmdebstrap a root tree, make it a clean clone source, make a disk.

Everything runs natively on the host as root, with no loop device and no mount: mmdebstrap's
``unshare`` mode keeps its /proc, /sys and /dev mounts in a private mount namespace, and the
tree becomes a whole-disk ext4 filesystem through ``mkfs.ext4 -d`` (no partition table, no boot
loader: the image boots by direct kernel boot with ``KERNEL_CMDLINE``). ``labbuilder.images.build``
drives these steps and caches the result.

A role image is layered: its build unpacks the base build's tree (``TREE_FILE``, kept beside
the base's disk) and installs only the role's packages over it (``layer_argv``), the way
mmdebstrap installs its own (apt outside the tree, dpkg inside it), so the packages every image
shares are downloaded and configured once.

The tools' own output (mmdebstrap, apt, dpkg, mkfs, qemu-img) goes to the ``labbuilder.tools``
logger at DEBUG level, which a command sends to the lab's log file; it never reaches the
terminal. Only a failure's last lines travel, in the ``ImageError``.
"""

from __future__ import annotations

import logging
import re
import shlex
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from labbuilder.adapters import processes
from labbuilder.adapters.processes import TOOLS_LOGGER
from labbuilder.catalog.model import BuildRecipe
from labbuilder.common.errors import HostError, ImageError
from labbuilder.common.resources import data_dir

Log = Callable[[str], None]

ROOT_LABEL = "lbroot"
KERNEL_CMDLINE = f"root=LABEL={ROOT_LABEL} ro console=ttyS0,115200n8 net.ifnames=0"
VARIANT = "apt"
# What every image needs to boot like a cloud image, whatever its recipe lists.
BOOT_PACKAGES = (
    "systemd-sysv",
    "systemd-resolved",
    "initramfs-tools",
    "e2fsprogs",
    "cloud-init",
    "openssh-server",
    "libpam-systemd",  # SSH sessions get a logind session and leave ssh.service's cgroup
    "sudo",
)
# Timers that would reach outside the lab: masked in every image, never unmasked by us.
POLICY_MASKED_UNITS = ("apt-daily.timer", "apt-daily-upgrade.timer")
# Boot-time work with nothing to do in a lab guest (e2scrub_reap: 16 s of CPU under TCG).
POLICY_DISABLED_UNITS = ("e2scrub_reap.service",)
# Per-machine state that clones must not share (globs relative to the root).
IDENTITY_FILES = (
    "etc/ssh/ssh_host_*",
    "var/lib/dbus/machine-id",
    "var/lib/systemd/random-seed",
    "var/lib/systemd/credential.secret",
    "var/lib/rabbitmq/.erlang.cookie",
    "var/lib/cloud/*",
)
# Kept in the image's dpkg configuration, so later installs in the guest skip them too.
DPKG_EXCLUDES = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
)
MERGED_USR_HOOKS = Path("/usr/share/mmdebstrap/hooks/maybe-merged-usr")
CLOUD_CFG = """\
# Written by labbuilder's image builder.
datasource_list: [ NoCloud, None ]
locale: C.UTF-8
system_info:
  network:
    renderers: [ networkd ]
    activators: [ networkd ]
"""
# cloud-init 22.4 renders static addresses for systemd-networkd without IPv6AcceptRA, so
# networkd listens 10 s for router advertisements no lab network sends, at every boot, before
# network-online. Drop-ins for the files it writes for eth0..eth9 (net.ifnames=0) turn that off.
NETWORKD_DROPIN = "[Network]\nIPv6AcceptRA=no\n"
NETWORKD_DROPIN_INTERFACES = tuple(f"eth{i}" for i in range(10))
HOSTS = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
FSTAB = f"LABEL={ROOT_LABEL}\t/\text4\tdefaults,errors=remount-ro\t0\t1\n"
INITRD_MODULES = ("virtio_pci.ko", "virtio_blk.ko")
TREE_FILE = "rootfs.tar"  # a base build's finished tree, which role images are layered on
LAYER_HOOK = ("hooks", "role-layer.sh")  # under images/: installs a role's packages
LAYER_PACKAGES_ENV = "LABBUILDER_ROLE_PACKAGES"
BUILD_SCRIPT_FILE = "build-script.sh"  # a role's build script, beside the build while it runs
# The tree's tar, as mmdebstrap's own tar-in reads it (numeric owners, extended attributes).
TAR_CREATE = ("tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "--format=pax")
_TAIL_LINES = 30  # of a failed command's output, in its ImageError

_FULL = re.compile(r"No space left|Could not allocate|too small|not enough space", re.IGNORECASE)
_tools = logging.getLogger(TOOLS_LOGGER)


def run(
    argv: Sequence[str | Path], *, stream: bool = False, env: Mapping[str, str] | None = None
) -> str:
    """Run ``argv`` (an argv list, never a shell) and return its combined output.

    The image builder's processes, through ``processes.run`` (which logs the command and its
    output to ``labbuilder.tools``; with ``stream`` each line as it arrives, and runs it at a
    lower CPU priority in a ``processes.yielding`` block). ``env`` adds variables to the
    process's environment. Raises ``HostError`` when the program is missing and
    ``ImageError`` (command, exit code, last lines of output) when it fails.
    """
    try:
        return processes.run(argv, stream=stream, env=env, merge_stderr=True).output
    except processes.ProgramMissing as exc:
        raise HostError(
            f"{exc.program} is not installed on this host",
            hint="apt-get install mmdebstrap qemu-utils e2fsprogs",
        ) from exc
    except processes.ProcessFailed as exc:
        raise ImageError(
            "Command: {}\nExit code: {}\nOutput (last lines):\n{}".format(
                " ".join(exc.result.argv),
                exc.result.returncode,
                "\n".join(exc.result.last_lines(_TAIL_LINES)),
            ),
            hint="read the output above; a network error usually means the mirror is unreachable",
        ) from None


def mmdebstrap_argv(
    recipe: BuildRecipe, packages: Sequence[str], root: Path, hooks: Sequence[str] = ()
) -> list[str]:
    """The mmdebstrap command that installs ``packages`` into the new directory ``root``, then
    runs ``hooks`` (``script_hooks``)."""
    argv = ["mmdebstrap", "--mode=unshare", f"--variant={VARIANT}", "--format=directory"]
    if MERGED_USR_HOOKS.is_dir():  # merged /usr without the usrmerge package and its perl
        argv.append(f"--hook-dir={MERGED_USR_HOOKS}")
    argv.append("--include=" + ",".join(packages))
    argv.extend(f"--dpkgopt={opt}" for opt in DPKG_EXCLUDES)
    argv.extend(hooks)
    argv.extend([recipe.suite, str(root), recipe.mirror])
    return argv


def layer_argv(
    recipe: BuildRecipe, tree: Path, root: Path, hook: Path, hooks: Sequence[str] = ()
) -> list[str]:
    """The mmdebstrap command that unpacks the base's ``tree`` (a tar) into the new directory
    ``root`` and installs the packages named in ``LAYER_PACKAGES_ENV`` over it with ``hook``
    (``layer_hook``), then runs ``hooks``."""
    argv = ["mmdebstrap", "--mode=unshare", "--variant=custom", "--format=directory"]
    argv.append(f"--setup-hook=tar-in {tree} /")
    argv.append(f'--customize-hook=sh {shlex.quote(str(hook))} "$1"')
    argv.extend(f"--dpkgopt={opt}" for opt in DPKG_EXCLUDES)
    argv.extend(hooks)
    argv.extend([recipe.suite, str(root), recipe.mirror])
    return argv


def script_hooks(script: Path) -> list[str]:
    """mmdebstrap hooks that run the shell ``script`` inside the tree, after its packages are
    installed: copied in, run with ``/bin/sh -eu`` chrooted into the tree (in mmdebstrap's
    user and mount namespaces, with its /proc, /sys and /dev), removed."""
    if any(char.isspace() for char in str(script)):
        raise ImageError(
            f"the image build's folder {script.parent} has a space in its path",
            hint="set LABBUILDER_CACHE_DIR to a folder without spaces",
        )
    inside = f"/tmp/{script.name}"
    return [
        f"--customize-hook=copy-in {script} /tmp",
        f'--customize-hook=chroot "$1" /bin/sh -eu {inside}',
        f'--customize-hook=rm -f "$1{inside}"',
    ]


def layer_hook() -> Path:
    """The shell script (a data file under ``images/hooks/``) that installs a role's packages."""
    hook = Path(str(data_dir("images").joinpath(*LAYER_HOOK)))
    if not hook.is_file():
        raise ImageError(f"labbuilder's data file {hook} is missing", hint="reinstall labbuilder")
    return hook


def save_tree(root: Path, tree: Path) -> None:
    """Keep the finished tree ``root`` as the tar ``tree``, for role images to be layered on."""
    run([*TAR_CREATE, "-C", root, "-cf", tree, "."])


def customize_rootfs(root: Path, masked_units: Sequence[str]) -> None:
    """Strip per-machine identity, set cloud-init's and systemd's defaults, mask units."""
    _tools.debug("customizing the root filesystem %s", root)
    for pattern in IDENTITY_FILES:
        for path in root.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    (root / "etc/machine-id").write_text("")  # empty: systemd generates one at first boot
    (root / "etc/hostname").write_text("localhost\n")  # cloud-init sets the real one
    (root / "etc/hosts").write_text(HOSTS)
    resolv = root / "etc/resolv.conf"
    if resolv.exists() and not resolv.is_symlink():  # the build host's copy
        resolv.unlink()
    (root / "etc/fstab").write_text(FSTAB)
    (root / "etc/default/locale").write_text("LANG=C.UTF-8\n")
    (root / "etc/cloud/cloud.cfg.d/99_labbuilder.cfg").write_text(CLOUD_CFG)
    for interface in NETWORKD_DROPIN_INTERFACES:
        dropins = root / f"etc/systemd/network/10-cloud-init-{interface}.network.d"
        dropins.mkdir(parents=True, exist_ok=True)
        (dropins / "50-labbuilder-no-ra.conf").write_text(NETWORKD_DROPIN)
    run(["chroot", root, "systemctl", "enable", "systemd-networkd.service"])
    run(["chroot", root, "systemctl", "disable", *POLICY_DISABLED_UNITS])
    run(["chroot", root, "systemctl", "mask", *POLICY_MASKED_UNITS, *masked_units])


def installed_packages(root: Path) -> dict[str, str]:
    """Map each package installed in ``root`` to its version (dpkg-query inside the tree)."""
    out = run(
        ["chroot", root, "dpkg-query", "-W", "-f=${Package}\t${Version}\t${db:Status-Abbrev}\n"]
    )
    packages: dict[str, str] = {}
    for line in out.splitlines():
        package, version, status = line.split("\t")
        if status.strip() == "ii":
            packages[package] = version
    return packages


def enabled_units(root: Path) -> list[str]:
    """The units some target in ``root`` wants at boot (enablement symlinks), less masked ones."""
    system = root / "etc/systemd/system"
    masked = {
        link.name
        for link in system.iterdir()
        if link.is_symlink() and str(link.readlink()) == "/dev/null"
    }
    return sorted({link.name for link in system.glob("*.wants/*")} - masked)


def copy_boot_files(root: Path, kernel: Path, initrd: Path) -> str:
    """Copy the kernel and initrd out of ``root/boot``, check the initrd, return the version."""
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise ImageError(
            f"expected one kernel in the image's /boot, found {[k.name for k in kernels]}",
            hint="list exactly one kernel package in the recipe",
        )
    version = kernels[0].name.removeprefix("vmlinuz-")
    source_initrd = root / "boot" / f"initrd.img-{version}"
    if not source_initrd.is_file():
        raise ImageError(
            f"the image has kernel {version} but no {source_initrd.name}",
            hint="the recipe must install initramfs-tools with the kernel",
        )
    listing = run(["chroot", root, "lsinitramfs", f"/boot/{source_initrd.name}"])
    for module in INITRD_MODULES:
        if f"/{module}" not in listing:
            raise ImageError(
                f"the initrd of kernel {version} lacks {module}: the root disk would be invisible",
                hint="keep MODULES=most in /etc/initramfs-tools/initramfs.conf",
            )
    shutil.copyfile(kernels[0], kernel)
    shutil.copyfile(source_initrd, initrd)
    return version


def make_disk(root: Path, disk: Path, virtual_size: int) -> None:
    """Write ``root`` as a whole-disk ext4 of ``virtual_size`` bytes into the qcow2 ``disk``."""
    raw = disk.with_suffix(".ext4")
    with raw.open("wb") as handle:
        handle.truncate(virtual_size)
    try:
        # Inode tables are zeroed here, once, so no guest zeroes them into its overlay.
        mkfs: list[str | Path] = ["mkfs.ext4", "-q", "-F", "-L", ROOT_LABEL, "-d", root]
        try:
            run([*mkfs, "-E", "lazy_itable_init=0,lazy_journal_init=0", raw])
        except ImageError as exc:
            if not _FULL.search(exc.message):
                raise
            raise ImageError(
                f"the root filesystem does not fit in {virtual_size} bytes: {exc.message}",
                hint="raise the recipe's size",
            ) from exc
        run(["e2fsck", "-f", "-n", raw])
        convert: list[str | Path] = ["qemu-img", "convert", "-c", "-o", "compression_type=zstd"]
        run([*convert, "-f", "raw", "-O", "qcow2", raw, disk])
    finally:
        raw.unlink()
