"""The same three-node lab brought up (a) by labbuilder and (b) by a baseline script in the
style of the tools before it (virt-install + cloud-localds, one node after another), with the
same base image and the same readiness test: an SSH login that answers with the node's
hostname, polled from the moment each starts. Both have the base image in place before their
clocks start (the baseline copies it, labbuilder's pool holds it, as on a host that ran a lab
before). Prints seconds to all-nodes-ready, teardown seconds, disk bytes, and the ratio
labbuilder/baseline (target: below 0.8).

Run as root on a host with libvirt: .venv/bin/python bench/up.py
The baseline needs virt-install and cloud-localds (apt-get install virtinst cloud-image-utils).
Both runs use free subnets, the ``lbbench-`` prefix, and remove everything they made.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import paramiko

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from lablib import TEST_CACHE, free_subnets, lab_environment, remove_test_pool  # noqa: E402

from labbuilder.common.paths import pool_dir  # noqa: E402
from labbuilder.host import probecache  # noqa: E402
from labbuilder.images.boot import resolve_base_image  # noqa: E402

NODES = (("controller", 2048, 11), ("network", 512, 21), ("compute1", 2048, 31))


def wait_hostname(address: str, user: str, key: Path, name: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy())  # noqa: S507
        try:
            client.connect(
                address, username=user, key_filename=str(key), timeout=5, banner_timeout=5,
                auth_timeout=5, look_for_keys=False, allow_agent=False,
            )  # fmt: skip
            _, out, _ = client.exec_command("hostname", timeout=30)
            if out.read().decode().strip() == name:
                return
        except (OSError, paramiko.SSHException):
            pass
        finally:
            client.close()
        time.sleep(1)
    raise TimeoutError(f"{name} at {address} did not answer")


def run_labbuilder(work: Path) -> tuple[float, float, int]:
    subnets = free_subnets(3)
    m, t, e = (s.rsplit(".", 1)[0] for s in subnets)
    lab = work / "lab.toml"
    lab.write_text(
        f'name = "lbbench-lb"\n[networks.management]\ncidr = "{subnets[0]}"\ngateway = "{m}.1"\n'
        f'[networks.tunnel]\ncidr = "{subnets[1]}"\n[networks.external]\ncidr = "{subnets[2]}"\n'
        f'gateway = "{e}.1"\nfloating_range = "{e}.101-{e}.200"\n'
        f'[nodes.controller]\naddresses = {{ management = "{m}.11" }}\n'
        f'[nodes.network]\naddresses = {{ management = "{m}.21", tunnel = "{t}.21" }}\n'
        f'[nodes.compute1]\naddresses = {{ management = "{m}.31", tunnel = "{t}.31" }}\n'
        # The baseline's image: the plain base, not the recipe's role images.
        "[options]\nrole_images = false\n"
    )
    env = {**os.environ, **lab_environment(work / "state")}
    command = [sys.executable, "-m", "labbuilder"]
    prewarm_pool(env)  # as the baseline's base copy, made before its clock starts
    state = work / "state" / "labs" / "lbbench-lb"
    started = time.monotonic()
    up = subprocess.Popen([*command, "up", str(lab)], env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)  # fmt: skip
    # The same readiness test as the baseline's, polled from the start: every node answers
    # an SSH login with its hostname (`up` itself goes on to wait for cloud-init to finish).
    key = state / "id_ed25519"
    while not key.exists() and up.poll() is None:
        time.sleep(0.2)
    with ThreadPoolExecutor(max_workers=len(NODES)) as workers:
        waits = [
            workers.submit(wait_hostname, f"{m}.{host}", "debian", key, name, started + 900)
            for name, _, host in NODES
        ]
        for wait in waits:
            wait.result()
    ready = time.monotonic() - started
    _, errors = up.communicate()
    if up.returncode != 0:
        raise SystemExit(f"labbuilder up failed:\n{errors}")
    print(f"labbuilder up returned after {time.monotonic() - started:.1f} s (cloud-init done)")
    pool = pool_dir(env)
    disk = sum(p.stat().st_blocks * 512 for p in pool.glob("lbbench-lb__*"))
    started = time.monotonic()
    subprocess.run([*command, "down", str(lab)], env=env, check=True, capture_output=True)
    remove_test_pool()
    return ready, time.monotonic() - started, disk


def prewarm_pool(env: dict[str, str]) -> None:
    """Put the shared base volumes in the pool, as a host that ran a lab before has them."""
    from labbuilder.adapters import libvirt as lv
    from labbuilder.api.up import upload_base
    from labbuilder.common.paths import pool_name

    image = resolve_base_image("debian-12")
    with lv.LibvirtHypervisor.open("qemu:///system") as hypervisor:
        pool = hypervisor.ensure_pool(pool_name(env), str(pool_dir(env)))
        upload_base(hypervisor, pool, image)


def virsh(*args: str) -> None:
    subprocess.run(["virsh", "-q", "-c", "qemu:///system", *args], check=True, capture_output=True)


def run_baseline(work: Path) -> tuple[float, float, int]:
    image = resolve_base_image("debian-12")
    assert image.kernel is not None and image.initrd is not None
    domain_type = str(probecache.probe("qemu:///system", kernel=image.kernel).domain_type)
    subnets = free_subnets(3)
    m = subnets[0].rsplit(".", 1)[0]
    key = work / "id_rsa"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    # Where QEMU's own user can read them, as a script author would put them.
    disks = Path(tempfile.mkdtemp(prefix="lbbench-", dir="/var/lib/libvirt/images"))
    disks.chmod(0o755)
    base = disks / "base.qcow2"
    shutil.copy(image.disk, base)
    kernel, initrd = disks / "vmlinuz", disks / "initrd.img"
    shutil.copy(image.kernel, kernel)
    shutil.copy(image.initrd, initrd)
    started = time.monotonic()
    for index, (cidr, forward) in enumerate(((subnets[0], "nat"), (subnets[1], None))):
        prefix = cidr.rsplit(".", 1)[0]
        xml = work / f"net{index}.xml"
        ip = f"<ip address='{prefix}.1' netmask='255.255.255.0'/>" if forward else ""
        fwd = f"<forward mode='{forward}'/>" if forward else ""
        xml.write_text(f"<network><name>lbbench-base-{index}</name>{fwd}{ip}</network>")
        virsh("net-create", str(xml))
    for name, memory, host in NODES:
        overlay = disks / f"{name}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base),
                        str(overlay), "10G"], check=True)  # fmt: skip
        (work / f"{name}.user").write_text(
            f"#cloud-config\nhostname: {name}\nssh_authorized_keys:\n"
            f"  - {(work / 'id_rsa.pub').read_text().strip()}\n"
        )
        (work / f"{name}.net").write_text(
            f"version: 2\nethernets:\n  eth0:\n    addresses: [{m}.{host}/24]\n"
            f"    routes: [{{to: 0.0.0.0/0, via: {m}.1}}]\n"
        )
        seed = disks / f"{name}-seed.iso"
        subprocess.run(["cloud-localds", "-N", str(work / f"{name}.net"), str(seed),
                        str(work / f"{name}.user")], check=True)  # fmt: skip
        subprocess.run(
            ["virt-install", "--connect", "qemu:///system", "--name", f"lbbench-base-{name}",
             "--memory", str(memory), "--vcpus", "1", "--import", "--noautoconsole",
             "--virt-type", domain_type,
             "--osinfo", "detect=on,require=off", "--graphics", "none",
             "--boot", f'kernel={kernel},initrd={initrd},kernel_args="{image.cmdline}"',
             "--disk", f"path={overlay},bus=virtio", "--disk", f"path={seed},bus=virtio",
             "--network", "network=lbbench-base-0,model=virtio",
             "--network", "network=lbbench-base-1,model=virtio"],
            check=True, capture_output=True,
        )  # fmt: skip
    for name, _, host in NODES:
        wait_hostname(f"{m}.{host}", "debian", key, name, time.monotonic() + 900)
    ready = time.monotonic() - started
    disk = sum(p.stat().st_blocks * 512 for p in disks.glob("*.qcow2") if p != base)
    disk += sum(p.stat().st_blocks * 512 for p in disks.glob("*.iso"))
    started = time.monotonic()
    teardown_baseline()
    shutil.rmtree(disks)
    return ready, time.monotonic() - started, disk


def teardown_baseline() -> None:
    def quietly(*args: str) -> None:
        command = ["virsh", "-q", "-c", "qemu:///system", *args]
        subprocess.run(command, capture_output=True, check=False)

    for name, _, _ in NODES:
        quietly("destroy", f"lbbench-base-{name}")
        quietly("undefine", f"lbbench-base-{name}")
    for index in range(2):
        quietly("net-destroy", f"lbbench-base-{index}")
    # virt-install defines a storage pool for each folder it finds disks in.
    for pool in ("disks", *(p.name for p in Path("/var/lib/libvirt/images").glob("lbbench-*"))):
        quietly("pool-destroy", pool)
        quietly("pool-undefine", pool)


def main() -> None:
    os.environ.setdefault("LABBUILDER_CACHE_DIR", str(TEST_CACHE))  # share the built image
    with tempfile.TemporaryDirectory(prefix="lbbench-") as folder:
        work = Path(folder)
        (work / "a").mkdir()
        (work / "b").mkdir()
        try:
            base = run_baseline(work / "b")
        finally:
            teardown_baseline()
        ours = run_labbuilder(work / "a")
    print(f"{'':12} {'ready s':>8} {'teardown s':>11} {'disk MB':>8}")
    print(f"{'labbuilder':12} {ours[0]:>8.1f} {ours[1]:>11.1f} {ours[2] / 2**20:>8.0f}")
    print(f"{'baseline':12} {base[0]:>8.1f} {base[1]:>11.1f} {base[2] / 2**20:>8.0f}")
    print(f"ratio labbuilder/baseline (ready): {ours[0] / base[0]:.2f} (target below 0.8)")


if __name__ == "__main__":
    main()
