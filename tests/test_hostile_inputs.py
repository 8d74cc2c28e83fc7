"""Hostile and malformed lab files at the command line: `labbuilder plan FILE` answers each with
exit 2 within seconds, one `error:` line naming the file and the key, and a `hint:` line; never a
traceback, a hang, a program run or a host file read. Then a property test feeds `plan`
generated lab files and arguments.

Most cases run ``labbuilder.cli.main.main`` in this process (fast); a few run the real command as a
subprocess, including one that would make libvirt run a program if the URI were used.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from labbuilder.cli.main import main

SECONDS = 5.0  # every answer comes within this (in this process)
PROCESS_SECONDS = 10.0  # with a new Python's start-up, on a loaded 2-core CI host
PYTHON = Path(sys.executable)


def qcow2_header(*, backing: bool = False, data_file: bool = False) -> bytes:
    """The first bytes of a qcow2 image (version 3), with or without a backing/data file."""
    header = b"QFI\xfb" + struct.pack(">I", 3)
    header += struct.pack(">QI", 112 if backing else 0, 11 if backing else 0)  # backing file
    header += struct.pack(">IQ", 16, 10 * 2**30)  # cluster bits, size
    header += b"\0" * (72 - len(header))
    header += struct.pack(">QQQ", 0b100 if data_file else 0, 0, 0)  # incompatible, ...
    header += struct.pack(">II", 4, 104)  # refcount order, header length
    return header + (b"/etc/shadow" if backing else b"") + b"\0" * 512


@dataclass
class Run:
    code: int
    out: str
    err: str
    seconds: float


def run_plan(args: list[str]) -> Run:
    """`labbuilder plan ARGS` in this process, its output captured."""
    out, err = io.StringIO(), io.StringIO()
    started = time.monotonic()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(["plan", *args])
        except SystemExit as done:  # argparse's own refusal (e.g. `--lab -:`): exit 2, said
            code = done.code if isinstance(done.code, int) else 1
    return Run(code, out.getvalue(), err.getvalue(), time.monotonic() - started)


def run_subprocess(args: list[str], cwd: Path) -> Run:
    started = time.monotonic()
    result = subprocess.run(
        [str(PYTHON), "-m", "labbuilder", "plan", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=30,
        env={**os.environ, "COLUMNS": "200"},
    )
    return Run(result.returncode, result.stdout, result.stderr, time.monotonic() - started)


def assert_refused(run: Run, key: str, seconds: float = SECONDS) -> None:
    """Exit 2, one `error:` line naming ``key``, a `hint:` line, no traceback, in time."""
    assert "Traceback" not in run.err, run.err
    assert run.code == 2, (run.code, run.out, run.err)
    lines = run.err.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("error: "), lines
    assert key in lines[0], (key, lines[0])
    assert lines[1].startswith("hint: ") and len(lines[1]) > len("hint: "), lines
    assert run.seconds < seconds, run.seconds


# --- lab file texts ---------------------------------------------------------------------------

LAB = 'name = "lbtest-in-hostile"\n'


def options(body: str) -> str:
    return f"{LAB}[options]\n{body}\n"


# (case id, lab file text, the key the error must name)
TEXT_CASES: list[tuple[str, str, str]] = [
    # libvirt URIs: only qemu:///system, qemu:///session, qemu+ssh://[user@]host[:port]/system
    ("uri-ext-command", f'{LAB}libvirt_uri = "qemu+ext:///system?command=/bin/sh"', "libvirt_uri"),
    ("uri-unix-socket", f'{LAB}libvirt_uri = "qemu+unix:///system?socket=/tmp/x"', "libvirt_uri"),
    ("uri-ssh-keyfile", f'{LAB}libvirt_uri = "qemu+ssh://h/system?keyfile=/root/.ssh/id_rsa"', "libvirt_uri"),
    ("uri-ssh-command", f'{LAB}libvirt_uri = "qemu+ssh://h/system?command=/bin/sh"', "libvirt_uri"),
    ("uri-ssh-netcat", f'{LAB}libvirt_uri = "qemu+ssh://h/system?netcat=/tmp/nc"', "libvirt_uri"),
    ("uri-ssh-option-host", f'{LAB}libvirt_uri = "qemu+ssh://-oProxyCommand=sh/system"', "libvirt_uri"),
    ("uri-tcp", f'{LAB}libvirt_uri = "qemu+tcp://h/system"', "libvirt_uri"),
    ("uri-other-driver", f'{LAB}libvirt_uri = "xen:///system"', "libvirt_uri"),
    ("uri-not-a-uri", f'{LAB}libvirt_uri = "system"', "libvirt_uri"),
    # apt_proxy / apt_mirror reach every guest's apt.conf
    ("proxy-newline", options('apt_proxy = "http://p:3142\\nAcquire::x \\"y\\";"'), "options.apt_proxy"),
    ("proxy-quote", options('apt_proxy = "http://p:3142\\";Acquire::x \\"y"'), "options.apt_proxy"),
    ("mirror-semicolon", options('apt_mirror = "http://m/debian;x"'), "options.apt_mirror"),
    ("proxy-brace", options('apt_proxy = "http://p/{x}"'), "options.apt_proxy"),
    ("proxy-space", options('apt_proxy = "http://p:3142 x"'), "options.apt_proxy"),
    ("mirror-file", options('apt_mirror = "file:///etc/passwd"'), "options.apt_mirror"),
    ("mirror-ftp", options('apt_mirror = "ftp://m/debian"'), "options.apt_mirror"),
    ("proxy-password", options('apt_proxy = "http://u:secret@p:3142"'), "options.apt_proxy"),
    ("proxy-bad-port", options('apt_proxy = "http://p:99999"'), "options.apt_proxy"),
    ("proxy-open-bracket", options('apt_proxy = "http://[::1:3142"'), "options.apt_proxy"),
    ("proxy-bracket-not-v6", options('apt_proxy = "http://[x]:3142"'), "options.apt_proxy"),
    ("image-open-bracket", f'{LAB}image = "https://[x/y.qcow2"', "image"),
    ("uri-open-bracket", f'{LAB}libvirt_uri = "qemu+ssh://[::1/system"', "libvirt_uri"),
    ("proxy-query", options('apt_proxy = "http://p:3142/?x=1"'), "options.apt_proxy"),
    # ntp_servers reach the controller's chrony.conf / ntp.conf
    ("ntp-newline", options('ntp_servers = ["pool.ntp.org\\nallow all"]'), "options.ntp_servers[0]"),
    ("ntp-space", options('ntp_servers = ["a b"]'), "options.ntp_servers[0]"),
    ("ntp-options", options('ntp_servers = ["ok.example", "pool.ntp.org iburst minpoll 0"]'), "options.ntp_servers[1]"),
    ("ntp-not-a-list", options('ntp_servers = "pool.ntp.org"'), "options.ntp_servers"),
    ("ntp-too-many", options(f"ntp_servers = {['n.example'] * 100!r}".replace("'", '"')), "options.ntp_servers"),
    # egress_allow becomes firewall rules
    ("egress-name", options('egress = "allow"\negress_allow = ["deb.debian.org"]'), "options.egress_allow[0]"),
    ("egress-everything", options('egress = "allow"\negress_allow = ["0.0.0.0/0"]'), "options.egress_allow[0]"),
    ("egress-loopback", options('egress = "allow"\negress_allow = ["127.0.0.1"]'), "options.egress_allow[0]"),
    ("egress-shell", options('egress = "allow"\negress_allow = ["1.2.3.4; reboot"]'), "options.egress_allow[0]"),
    # counts and sizes
    ("count-huge", f"{LAB}[nodes.compute]\ncount = 1000000000", "nodes.compute.count"),
    ("count-int64", f"{LAB}[nodes.compute]\ncount = 9223372036854775807", "nodes.compute.count"),
    ("count-negative", f"{LAB}[nodes.compute]\ncount = -1", "nodes.compute.count"),
    ("count-string", f'{LAB}[nodes.compute]\ncount = "3"', "nodes.compute.count"),
    ("nodes-too-many", f"{LAB}[nodes.compute]\ncount = 60\n[nodes.object]\ncount = 10", "nodes.object"),
    ("vcpus-huge", f"{LAB}[nodes.compute1]\nvcpus = 100000", "nodes.compute1.vcpus"),
    ("memory-huge", f'{LAB}[nodes.compute1]\nmemory = "100 TB"', "nodes.compute1.memory"),
    ("disk-huge", f'{LAB}[nodes.compute1]\ndisk = "100000 GB"', "nodes.compute1.disk"),
    ("memory-overflow", f'{LAB}[nodes.compute1]\nmemory = "{"9" * 400} GB"', "nodes.compute1.memory"),
    ("extra-disks-many", f"{LAB}[nodes.compute1]\nextra_disks = {['1 GB'] * 30!r}".replace("'", '"'), "nodes.compute1.extra_disks"),
    ("extra-disk-huge", f'{LAB}[nodes.block1]\nextra_disks = ["100000 GB"]', "nodes.block1.extra_disks[0]"),
    ("extra-disk-root", f'{LAB}[nodes.block1]\nextra_disks = [{{ size = "1 GB", purpose = "root" }}]', "nodes.block1.extra_disks[0].purpose"),
    # reserved ranges
    ("cidr-loopback", f'{LAB}[networks.management]\ncidr = "127.0.0.0/24"\ngateway = "127.0.0.1"', "networks.management.cidr"),
    ("cidr-multicast", f'{LAB}[networks.management]\ncidr = "224.0.0.0/24"\ngateway = "224.0.0.1"', "networks.management.cidr"),
    ("cidr-link-local", f'{LAB}[networks.external]\ncidr = "169.254.0.0/24"\ngateway = "169.254.0.1"', "networks.external.cidr"),
    ("cidr-this-network", f'{LAB}[networks.tunnel]\ncidr = "0.0.0.0/24"', "networks.tunnel.cidr"),
    ("cidr-reserved", f'{LAB}[networks.management]\ncidr = "240.0.0.0/24"\ngateway = "240.0.0.1"', "networks.management.cidr"),
    ("gateway-broadcast", f'{LAB}[networks.management]\ngateway = "10.0.0.255"', "networks.management.gateway"),
    ("gateway-loopback", f'{LAB}[networks.management]\ngateway = "127.0.0.1"', "networks.management.gateway"),
    # MACs libvirt or the kernel refuse
    ("mac-multicast", f'{LAB}[nodes.compute1]\nmacs = {{ management = "01:00:5e:00:00:01" }}', "nodes.compute1.macs.management"),
    ("mac-zero", f'{LAB}[nodes.compute1]\nmacs = {{ management = "00:00:00:00:00:00" }}', "nodes.compute1.macs.management"),
    ("mac-broadcast", f'{LAB}[nodes.compute1]\nmacs = {{ management = "ff:ff:ff:ff:ff:ff" }}', "nodes.compute1.macs.management"),
    ("mac-fe", f'{LAB}[nodes.compute1]\nmacs = {{ management = "FE:54:00:12:34:56" }}', "nodes.compute1.macs.management"),
    # what the recipe cannot install
    ("stage-unknown", options('stages = ["dashboard", "nope"]'), "options.stages[1]"),
    ("stage-not-optional", options('stages = ["identity"]'), "options.stages[0]"),
    ("stage-without-its-node", options('stages = ["block-storage"]'), "options.stages[0]"),
    ("no-controller", f"{LAB}[nodes.controller]\ncount = 0", "nodes.controller"),
    ("two-controllers", f'{LAB}[nodes.boss]\nrole = "controller"\naddresses = {{ management = "10.0.0.12" }}', "nodes.boss"),
    # names: no '-' in node and network names, no reserved lab names
    ("node-name-dash", f'{LAB}[nodes.compute-1]\nrole = "compute"', "nodes.compute-1"),
    ("network-name-dash", f'{LAB}[networks.mgmt-x]\nrole = "management"', "networks.mgmt-x"),
    ("lab-name-bake", 'name = "lbbake-x"', "name"),
    ("lab-name-probe", 'name = "lbprobe"', "name"),
    ("node-name-newline", f'{LAB}[nodes."a\\nb"]\nrole = "compute"', 'nodes."a\\nb"'),
    # recipes: built-in names only
    ("recipe-folder", f'{LAB}recipe = "/tmp/somewhere"', "recipe"),
    ("recipe-relative", f'{LAB}recipe = "../recipes/zed-debian-12"', "recipe"),
    # images: catalog names, http(s) URLs of files, qcow2 files next to the lab file
    ("image-shadow", f'{LAB}image = "/etc/shadow"', "image"),
    ("image-dev", f'{LAB}image = "/dev/sda"', "image"),
    ("image-file-url", f'{LAB}image = "file:///etc/shadow"', "image"),
    ("image-ftp", f'{LAB}image = "ftp://h/x.qcow2"', "image"),
    ("image-localhost", f'{LAB}image = "http://127.0.0.1:8080/x.qcow2"', "image"),
    ("image-metadata", f'{LAB}image = "http://169.254.169.254/latest/x.img"', "image"),
    ("image-unknown", f'{LAB}image = "debian-99"', "image"),
    # text
    ("description-escape", f'{LAB}description = "\\u001b[31mred"', "description"),
    ("description-newline", f'{LAB}description = "a\\nb"', "description"),
    ("deep-nesting", f"{LAB}x = " + "[" * 3000 + "]" * 3000, "not valid TOML"),
    ("unknown-key-newline", f'{LAB}"a\\nb" = 1', "unknown key"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("text", "key"), [c[1:] for c in TEXT_CASES], ids=[c[0] for c in TEXT_CASES]
)
def test_a_hostile_lab_file_is_refused_with_its_key(tmp_path: Path, text: str, key: str) -> None:
    lab = tmp_path / "lab.toml"
    lab.write_text(text)
    run = run_plan([str(lab), "--no-host-check"])
    assert_refused(run, key)
    assert str(lab) in run.err.splitlines()[0]


# --- files that are not lab files, and local images -------------------------------------------


def fifo(folder: Path) -> Path:
    path = folder / "lab.toml"
    os.mkfifo(path)
    return path


def unix_socket(folder: Path) -> Path:
    path = folder / "lab.toml"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
    return path


def symlink_to(target: str) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        path = folder / "lab.toml"
        path.symlink_to(target)
        return path

    return make


def written(data: bytes) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        path = folder / "lab.toml"
        path.write_bytes(data)
        return path

    return make


def lab_with_image(image: str, make: Callable[[Path], None]) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        make(folder)
        path = folder / "lab.toml"
        path.write_text(f'{LAB}image = "{image}"\n')
        return path

    return build


def nothing(folder: Path) -> None:
    del folder


def _fifo_image(folder: Path) -> None:
    os.mkfifo(folder / "disk.qcow2")


def _backing_image(folder: Path) -> None:
    (folder / "disk.qcow2").write_bytes(qcow2_header(backing=True))


def _data_file_image(folder: Path) -> None:
    (folder / "disk.qcow2").write_bytes(qcow2_header(data_file=True))


def _raw_image(folder: Path) -> None:
    (folder / "disk.qcow2").write_bytes(b"root:$6$secret:19000:0:99999:7:::\n")


def _link_out(folder: Path) -> None:
    (folder / "disk.qcow2").symlink_to("/etc/shadow")


def _image_outside(folder: Path) -> None:
    (folder.parent / "outside.qcow2").write_bytes(qcow2_header())


FILE_CASES: list[tuple[str, Callable[[Path], Path], str]] = [
    ("fifo", fifo, "FIFO"),
    ("dev-zero", lambda folder: Path("/dev/zero"), "character device"),
    ("directory", lambda folder: folder, "directory"),
    ("socket", unix_socket, "socket"),
    ("symlink-to-dev-zero", symlink_to("/dev/zero"), "character device"),
    ("missing", lambda folder: folder / "missing.toml", "cannot read"),
    ("two-mib", written(b"# " + b"x" * (2 * 2**20) + b"\n"), "larger than"),
    ("invalid-utf8", written(b'name = "\xff\xfe"\n'), "not UTF-8"),
    ("binary", written(bytes(range(256)) * 8), "UTF-8"),
    ("nul-in-text", written(b'name = "a\x00b"\n'), "not valid TOML"),
    ("image-fifo", lab_with_image("./disk.qcow2", _fifo_image), "image"),
    ("image-backing-file", lab_with_image("disk.qcow2", _backing_image), "image"),
    ("image-data-file", lab_with_image("disk.qcow2", _data_file_image), "image"),
    ("image-not-qcow2", lab_with_image("disk.qcow2", _raw_image), "image"),
    ("image-symlink-out", lab_with_image("disk.qcow2", _link_out), "image"),
    ("image-outside-folder", lab_with_image("../outside.qcow2", _image_outside), "image"),
    ("image-missing", lab_with_image("./none.qcow2", nothing), "image"),
]


@pytest.mark.parametrize(
    ("make", "key"), [c[1:] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES]
)
def test_a_file_that_is_no_lab_file_is_refused(
    tmp_path: Path, make: Callable[[Path], Path], key: str
) -> None:
    folder = tmp_path / "labs"
    folder.mkdir()
    path = make(folder)
    run = run_plan([str(path), "--no-host-check"])
    assert_refused(run, key)


def test_a_standalone_qcow2_next_to_the_lab_file_is_its_image(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "custom.qcow2").write_bytes(qcow2_header())
    lab = tmp_path / "lab.toml"
    lab.write_text(f'{LAB}image = "images/custom.qcow2"\n')
    run = run_plan([str(lab), "--no-host-check", "--json"])
    assert run.code == 0, run.err
    assert f'"image": "{tmp_path / "images" / "custom.qcow2"}"' in run.out


# --- as a subprocess --------------------------------------------------------------------------


def test_a_libvirt_uri_with_a_command_runs_nothing(tmp_path: Path) -> None:
    """With the host check on (plan connects to libvirt), the ext transport's command= would
    run as the caller: it must not run at all."""
    marker = tmp_path / "ran"
    lab = tmp_path / "lab.toml"
    lab.write_text(f'{LAB}libvirt_uri = "qemu+ext:///system?command=/usr/bin/touch%20{marker}"\n')
    run = run_subprocess([str(lab)], tmp_path)
    assert_refused(run, "libvirt_uri", PROCESS_SECONDS)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("make", "key"),
    [(fifo, "FIFO"), (lambda folder: Path("/dev/zero"), "character device")],
    ids=["fifo", "dev-zero"],
)
def test_special_files_as_a_subprocess(
    tmp_path: Path, make: Callable[[Path], Path], key: str
) -> None:
    run = run_subprocess([str(make(tmp_path)), "--no-host-check"], tmp_path)
    assert_refused(run, key, PROCESS_SECONDS)


def test_an_apt_proxy_with_apt_directives_as_a_subprocess(tmp_path: Path) -> None:
    lab = tmp_path / "lab.toml"
    lab.write_text(options('apt_proxy = "http://p:3142\\";\\nAPT::Update::Pre-Invoke {\\"sh\\"}"'))
    run = run_subprocess([str(lab), "--no-host-check"], tmp_path)
    assert_refused(run, "options.apt_proxy", PROCESS_SECONDS)


# --- the property test ------------------------------------------------------------------------

hostile_text = st.sampled_from(
    [
        "", " ", "x", "a\nb", "a\x00b", '"', "'", ";", "{}", "$(id)", "`id`", "[bold]x[/]",
        "\u202e", "\x1b[2J", "../../etc/shadow", "/etc/shadow", "/dev/zero", "file:///etc",
        "http://p:3142", "http://p:3142\n", "https://[::1]/x.qcow2", "http://[::1", "qemu:///system",
        "qemu:///session", "qemu+ssh://u@h:22/system", "qemu+ext:///system?command=/bin/sh",
        "10.0.0.0/24", "127.0.0.0/8", "224.0.0.1", "0.0.0.0/0", "10.0.0.11", "52:54:00:00:00:01",
        "fe:00:00:00:00:01", "2 GB", "0 GB", "99999 TB", "-1 GB", "dashboard", "nope",
        "debian-12", "x" * 300,
    ]
)  # fmt: skip
toml_values = st.one_of(
    st.text(max_size=40).map(lambda text: json.dumps(text, ensure_ascii=False)),
    st.from_regex(r"\A[0-9]{1,400}(\.[0-9]{1,5})? ?[kmgtKMGT]i?[bB]\Z").map(json.dumps),
    hostile_text.map(
        lambda text: '"' + text.encode("unicode_escape").decode().replace('"', '\\"') + '"'
    ),
    st.integers(-(2**63), 2**63 - 1).map(str),
    st.sampled_from(["true", "[]", "{}", '["a"]', "1.5", "nan", "[[]]"]),
)
keys = st.sampled_from(
    [
        "description", "image", "recipe", "libvirt_uri", "networking",
        "options.apt_proxy", "options.apt_mirror", "options.ntp_servers", "options.egress",
        "options.egress_allow", "options.stages", "networks.management.cidr",
        "networks.management.gateway", "networks.external.floating_range",
        "nodes.compute.count", "nodes.compute1.vcpus", "nodes.compute1.memory",
        "nodes.compute1.disk", "nodes.block1.extra_disks", "nodes.controller.count",
        "nodes.network.macs.management", "nodes.compute-1.role", "nodes.db.count",
    ]
)  # fmt: skip


# Values each key takes in a valid lab, so that generated labs also pass and get planned.
VALID = {
    "description": ['"a class lab"', '"[bold]markup[/] stays text"'],
    "image": ['"debian-12"', '"https://images.example.org/x.qcow2"'],
    "recipe": ['"zed-debian-12"', '"icehouse-ubuntu-14.04"'],
    "libvirt_uri": ['"qemu:///system"', '"qemu:///session"'],
    "networking": ['"neutron"'],
    "options.apt_proxy": ['"http://10.0.0.1:3142"'],
    "options.apt_mirror": ['"http://deb.debian.org/debian"'],
    "options.ntp_servers": ['["ntp.example.org", "192.0.2.10"]', "[]"],
    "options.egress": ['"nat"', '"none"'],
    "options.egress_allow": ["[]"],
    "options.stages": ['["dashboard"]', '["orchestration", "telemetry"]', "[]"],
    "networks.management.cidr": ['"10.0.0.0/24"'],
    "networks.management.gateway": ['"10.0.0.1"'],
    "networks.external.floating_range": ['"203.0.113.101-203.0.113.150"'],
    "nodes.compute.count": ["0", "1", "3", "64"],
    "nodes.compute1.vcpus": ["1", "2", "64"],
    "nodes.compute1.memory": ['"2 GB"', '"4 GiB"'],
    "nodes.compute1.disk": ['"10 GB"', '"1 TB"'],
    "nodes.block1.extra_disks": ['["10 GB"]', '[{ size = "5 GB", purpose = "cinder-volumes" }]'],
    "nodes.controller.count": ["1"],
    "nodes.network.macs.management": ['"52:54:00:aa:bb:cc"'],
    "nodes.compute-1.role": ['"compute"'],
    "nodes.db.count": ["0"],
}
assignment = keys.flatmap(
    lambda key: st.tuples(
        st.just(key),
        st.one_of(st.sampled_from(VALID[key]), st.sampled_from(VALID[key]), toml_values),
    )
)


def as_list(key: str, value: str) -> str:
    if key.rsplit(".", 1)[-1] in ("ntp_servers", "egress_allow", "stages", "extra_disks"):
        return f"[{value}]" if not value.startswith("[") else value
    return value


def render_lab(assignments: list[tuple[str, str]]) -> str:
    tables: dict[str, list[str]] = {}
    for key, value in assignments:
        table, _, leaf = key.rpartition(".")
        if table.startswith("nodes.") and table.endswith(".macs"):
            table, leaf, value = table.removesuffix(".macs"), "macs", f"{{ management = {value} }}"
        tables.setdefault(table, []).append(f"{leaf} = {as_list(key, value)}")
    lines = ['name = "lbtest-in-prop"'] + tables.pop("", [])
    for table, body in tables.items():
        lines += [f"[{table}]", *body]
    return "\n".join(lines) + "\n"


_FOLDER = Path(tempfile.mkdtemp(prefix="lbtest-in-prop-"))


@pytest.fixture(scope="module", autouse=True)
def _remove_folder() -> Iterator[None]:
    yield
    for entry in _FOLDER.iterdir():
        entry.unlink()
    _FOLDER.rmdir()


@settings(
    max_examples=300,
    deadline=SECONDS * 1000,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    assignments=st.lists(assignment, max_size=4, unique_by=lambda kv: kv[0]),
    flags=st.lists(st.sampled_from(["--json", "--auto-subnets"]), unique=True),
    host_check=st.integers(0, 9),
)
def test_plan_of_any_lab_file_answers_0_or_2_in_seconds(
    assignments: list[tuple[str, str]], flags: list[str], host_check: int
) -> None:
    text = render_lab(assignments)
    lab = _FOLDER / "lab.toml"
    lab.write_text(text)
    # The host check (libvirt, routes, DNS of apt hosts) for one example in ten, on the default
    # libvirt and without apt hosts (no DNS lookups, no session daemon started).
    checked = host_check == 0 and "apt_" not in text and "libvirt_uri" not in text
    run = run_plan([str(lab), *flags, *([] if checked else ["--no-host-check"])])
    assert "Traceback" not in run.err, (text, run.err)
    assert run.code in (0, 2), (text, run.code, run.err)
    if run.code == 2:
        lines = run.err.splitlines()
        assert lines and lines[0].startswith("error: "), (text, run.err)
    assert run.seconds < SECONDS


@settings(max_examples=60, deadline=SECONDS * 1000)
@given(
    name=st.one_of(hostile_text, st.text(max_size=30)),
    flags=st.lists(st.sampled_from(["--json", "--auto-subnets"]), unique=True),
)
def test_plan_of_any_lab_name_answers_0_or_2_in_seconds(name: str, flags: list[str]) -> None:
    name = name.replace("\x00", "")  # argv cannot hold NUL
    run = run_plan(["--lab", name, "--no-host-check", *flags])
    assert "Traceback" not in run.err, (name, run.err)
    assert run.code in (0, 2), (name, run.code, run.err)
    assert run.seconds < SECONDS
