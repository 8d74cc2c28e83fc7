"""A student's handout and connection files, and the class entry's rules (pure): the guide's
addresses and the lab's passwords in the handout, an ssh_config whose every node goes through
the entry, and an entry that reaches the student's own lab only."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from labbuilder.classroom.access import (
    Request,
    authorized_key_line,
    console_domain,
    parse_request,
    relay_target,
    sshd_config,
)
from labbuilder.classroom.handouts import (
    Entry,
    StudentLab,
    handout_pdf,
    render_handout,
    render_known_hosts,
    render_ssh_config,
)
from labbuilder.common.errors import UsageError
from labbuilder.lab.classfile import load_class_file
from labbuilder.lab.classplan import student_lab
from labbuilder.lab.planner import plan
from labbuilder.model.lab import HostFacts
from labbuilder.recipe.files import load_recipe

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl bob@laptop"
ENTRY = Entry("trainer.example.org", 2222, "ssh-ed25519 AAAAENTRYKEY")


def student(tmp_path: Path, name: str = "alice") -> StudentLab:
    path = tmp_path / "class.toml"
    path.write_text(f'name = "os101"\nlab = "guide-3node"\n[[students]]\nname = "{name}"\n')
    spec = load_class_file(path)
    recipe = load_recipe(spec.lab.recipe)
    secrets = {name: f"{name.lower()}-Secret1" for name in recipe.secret_names}
    secrets["console_password"] = "console-Secret2"
    return StudentLab(
        class_name="os101",
        student=name,
        plan=plan(student_lab(spec, name), HostFacts()),
        user="debian",
        secrets=secrets,
        purposes=recipe.secrets,
        node_keys={"controller": "ssh-ed25519 AAAACONTROLLER", "network": "ssh-ed25519 AAAANET"},
        template="os101-image",
        stage="image",
    )


def test_the_handout_has_the_guides_addresses_the_labs_passwords_and_the_commands(
    tmp_path: Path,
) -> None:
    text = render_handout(student(tmp_path), ENTRY)
    assert text.startswith("# os101: alice's lab")
    assert "**os101-alice**" in text and 'after the guide\'s "image" chapter' in text
    assert "| controller | controller | 10.0.0.11 |" in text
    assert "| network | network | 10.0.0.21 | 10.0.1.21 | (no address) |" in text
    assert "203.0.113.101-203.0.113.200" in text and "gateway 203.0.113.1" in text
    assert "| `ADMIN_PASS` | `admin_pass-Secret1` | keystone user admin |" in text
    assert "ssh -F ~/.ssh/os101-alice.ssh_config controller" in text
    assert "-L 8080:10.0.0.11:80 controller" in text
    assert "root@trainer.example.org console controller" in text and "-p 2222" in text
    assert "password `console-Secret2`" in text


def test_the_handout_is_also_a_pdf(tmp_path: Path) -> None:
    pdf = handout_pdf(render_handout(student(tmp_path), ENTRY))
    assert pdf.startswith(b"%PDF-") and pdf.rstrip().endswith(b"%%EOF")
    for text in (b"os101: alice's lab", b"10.0.0.11", b"admin_pass-Secret1", b"console controller"):
        assert text in pdf, text


def test_the_ssh_config_reaches_every_node_through_the_entry(tmp_path: Path) -> None:
    config = render_ssh_config(student(tmp_path), ENTRY)
    assert "Host controller\n  HostName 10.0.0.11\n" in config
    assert "Host compute1\n  HostName 10.0.0.31\n" in config
    proxy = next(line for line in config.splitlines() if "ProxyCommand" in line)
    words = shlex.split(proxy.split("ProxyCommand", 1)[1])
    assert words[:3] == ["ssh", "-p", "2222"]
    assert words[-4:] == ["root@trainer.example.org", "relay", "%h", "%p"]
    assert "  User debian" in config and "  IdentityFile ~/.ssh/os101-alice" in config
    known = render_known_hosts(student(tmp_path), ENTRY).splitlines()
    assert known[0] == "[trainer.example.org]:2222 ssh-ed25519 AAAAENTRYKEY"
    assert "controller,10.0.0.11 ssh-ed25519 AAAACONTROLLER" in known


def test_the_entry_takes_a_relay_or_a_console_and_nothing_else() -> None:
    assert parse_request("relay controller 22") == Request("relay", "controller", 22)
    assert parse_request("console compute1") == Request("console", "compute1")
    for bad in ("", "bash", "relay controller", "relay controller 99999", "relay x 22; rm -rf /",
                "console", "scp -t /etc", "relay controller 22 extra"):  # fmt: skip
        with pytest.raises(UsageError):
            parse_request(bad)


def test_the_entry_reaches_the_students_own_lab_only(tmp_path: Path) -> None:
    lab = student(tmp_path).plan
    assert relay_target(lab, "controller") == "10.0.0.11"
    assert relay_target(lab, "os101-alice-network") == "10.0.0.21"
    assert relay_target(lab, "203.0.113.105") == "203.0.113.105"  # a floating IP
    for outside in ("192.168.1.1", "127.0.0.1", "deb.debian.org", "os101-bob-controller"):
        with pytest.raises(UsageError, match="is not in lab os101-alice"):
            relay_target(lab, outside)
    assert console_domain(lab, "controller") == "os101-alice-controller"
    with pytest.raises(UsageError):
        console_domain(lab, "os101-bob-controller")


def test_a_students_key_runs_the_forced_command_only(tmp_path: Path) -> None:
    line = authorized_key_line("/usr/bin/python3", "os101-bob", KEY)
    assert line == (
        'restrict,pty,command="/usr/bin/python3 -m labbuilder class entry os101-bob" ' + KEY
    )
    with pytest.raises(UsageError):
        authorized_key_line('/opt/"odd"/python', "os101-bob", KEY)
    config = sshd_config(tmp_path, "0.0.0.0", 2222)
    for rule in ("PermitRootLogin forced-commands-only", "PasswordAuthentication no",
                 "AllowTcpForwarding no", "Port 2222",
                 f"AuthorizedKeysFile {tmp_path / 'authorized_keys'}"):  # fmt: skip
        assert rule in config.splitlines()
