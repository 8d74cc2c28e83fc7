"""A lab's state directory: its SSH key, generated secrets, console logs and lock.

Secrets are generated per lab and kept in files of mode 0600; they are never logged.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from labbuilder.errors import HostError, UsageError
from labbuilder.filelock import file_lock
from labbuilder.paths import lab_dir

SECRET_MODE = 0o600


@dataclass(frozen=True)
class LabState:
    lab: str
    directory: Path

    @property
    def key_path(self) -> Path:
        return self.directory / "id_ed25519"

    @property
    def secrets_path(self) -> Path:
        return self.directory / "secrets.json"

    @property
    def console_dir(self) -> Path:
        return self.directory / "console"

    def console_log(self, node: str) -> Path:
        return self.console_dir / f"{node}.log"

    @property
    def ssh_config_path(self) -> Path:
        return self.directory / "ssh_config"

    @property
    def known_hosts_path(self) -> Path:
        return self.directory / "known_hosts"


def lab_state(lab: str, directory: Path | None = None) -> LabState:
    return LabState(lab, directory or lab_dir(lab))


def write_secret_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600 from the first byte on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, SECRET_MODE)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    temporary.chmod(SECRET_MODE)
    temporary.replace(path)


def new_ed25519_key() -> tuple[bytes, bytes]:
    """A new ed25519 key pair: (private key in OpenSSH format, public key without a comment)."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return private, public


def ensure_ssh_key(state: LabState) -> str:
    """The lab's SSH key pair (generated once); returns the public key line."""
    public_path = state.key_path.with_suffix(".pub")
    if not state.key_path.exists() or not public_path.exists():
        private, public = new_ed25519_key()
        write_secret_file(state.key_path, private)
        public_path.write_bytes(public + f" labbuilder-{state.lab}\n".encode())
    return public_path.read_text().strip()


def ensure_host_keys(state: LabState, nodes: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """Each node's SSH host key (ed25519, made here natively and kept in the lab's state), and
    the lab's known_hosts with them. ``nodes`` maps node names to management addresses.

    Handing a node its host key in the seed saves it generating keys at first boot (RSA alone
    takes 10-20 s under emulation), and lets ``ssh -F`` check the host key strictly.
    Returns node -> (private key in OpenSSH format, public key line).
    """
    folder = state.directory / "host-keys"
    keys: dict[str, tuple[str, str]] = {}
    for node in nodes:
        private_path = folder / node
        public_path = folder / f"{node}.pub"
        if not private_path.exists() or not public_path.exists():
            private, public = new_ed25519_key()
            write_secret_file(private_path, private)
            public_path.write_bytes(public + f" root@{node}\n".encode())
        keys[node] = (private_path.read_text(), public_path.read_text().strip())
    lines = []
    for node, address in nodes.items():
        kind, blob = keys[node][1].split()[:2]
        lines.append(f"{node},{state.lab}-{node},{address} {kind} {blob}")
    state.known_hosts_path.write_text("\n".join(lines) + "\n")
    return keys


def load_secrets(state: LabState) -> dict[str, str]:
    if not state.secrets_path.exists():
        return {}
    loaded: dict[str, str] = json.loads(state.secrets_path.read_text())
    return loaded


def ensure_secrets(state: LabState, names: tuple[str, ...]) -> dict[str, str]:
    """Generated secrets for ``names`` (kept across runs), in a 0600 file."""
    values = load_secrets(state)
    missing = [name for name in names if name not in values]
    if missing:
        for name in missing:
            values[name] = secrets.token_urlsafe(12)
        write_secret_file(state.secrets_path, json.dumps(values, indent=1).encode())
    return {name: values[name] for name in names}


def password_hash(password: str) -> str:
    """SHA-512 crypt(3) of ``password`` for cloud-init (the password goes through stdin)."""
    try:
        result = subprocess.run(
            ["openssl", "passwd", "-6", "-stdin"],
            input=password,
            capture_output=True,
            text=True,
            check=True,
        )
    except FileNotFoundError:
        raise HostError("openssl is missing", "apt-get install openssl") from None
    except subprocess.CalledProcessError as err:
        raise HostError(f"openssl passwd failed: {err.stderr.strip()}") from None
    return result.stdout.strip()


@contextmanager
def lab_lock(state: LabState, action: str) -> Iterator[None]:
    """Hold the lab's lock: a second ``up``/``down`` of the same lab is refused, not queued."""
    state.directory.mkdir(parents=True, exist_ok=True)
    with file_lock(state.directory / "lock", blocking=False) as locked:
        if not locked:
            raise UsageError(
                f"another labbuilder command is changing lab {state.lab} right now",
                f"wait for it to finish before running `{action}`",
            )
        yield
