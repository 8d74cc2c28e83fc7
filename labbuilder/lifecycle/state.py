"""A lab's state directory: its SSH key, generated secrets, console logs and lock.

Secrets are generated per lab and kept in files of mode 0600; they are never logged.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import stat
import string
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from labbuilder.adapters import processes
from labbuilder.common.errors import HostError, UsageError
from labbuilder.common.filelock import file_lock
from labbuilder.common.paths import lab_dir, lab_lock_path, state_root

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
    """Write ``data`` to ``path`` with mode 0600 from the first byte on (``write_state_file``)."""
    write_state_file(path, data)


def write_state_file(path: Path, data: bytes | str) -> None:
    """Write a file of labbuilder's state: mode 0600 from the first byte, all or nothing.

    The data goes to a new file of a random name in the same directory, created with
    ``O_EXCL | O_NOFOLLOW`` relative to the directory opened without following links, and is
    then renamed over ``path``: a link or file planted at any name is never written through.
    The directory is made 0700 if missing and must be writable by its owner only; ``path``
    itself must not be a symbolic link.
    """
    content = data.encode() if isinstance(data, str) else data
    ensure_private_dir(path.parent)
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        _refuse_link(path, directory)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        while True:
            temporary = f".{path.name}.{secrets.token_hex(8)}.new"
            try:
                fd = os.open(temporary, flags, SECRET_MODE, dir_fd=directory)
                break
            except FileExistsError:
                continue
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(content)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path.name, src_dir_fd=directory, dst_dir_fd=directory)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary, dir_fd=directory)
            raise
    finally:
        os.close(directory)


def _refuse_link(path: Path, directory: int) -> None:
    try:
        info = os.stat(path.name, dir_fd=directory, follow_symlinks=False)
    except FileNotFoundError:
        return
    refuse_special(path, info, "state files")


def refuse_special(path: Path, info: os.stat_result, files: str) -> None:
    """Refuse (exit 2) to write ``files`` ("state files", "logs") at ``path``, whose
    ``lstat`` is ``info``, unless it is a regular file."""
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISREG(info.st_mode):
        what = "a symbolic link" if stat.S_ISLNK(info.st_mode) else "not a regular file"
        raise UsageError(
            f"{path} is {what}; labbuilder writes its {files} only as regular files",
            f"remove {path} (and find out who put it there)",
        )


def ensure_private_dir(directory: Path) -> None:
    """Make ``directory`` (and missing parents) with mode 0700; check that it is safe."""
    missing: list[Path] = []
    current = directory
    while not os.path.lexists(current) and current != current.parent:
        missing.append(current)
        current = current.parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):
            folder.mkdir(0o700)
    check_private_dir(directory)


def check_private_dir(directory: Path, *, what: str = "state directory") -> None:
    """Refuse a ``directory`` that others could change: a link, not a directory, owned by
    another user, or writable by group or others (its parent too, unless the parent is a
    sticky directory such as /tmp)."""
    try:
        info = os.lstat(directory)
    except FileNotFoundError:
        return
    hint = "labbuilder keeps its state only where its own user alone can write"
    if stat.S_ISLNK(info.st_mode):
        raise UsageError(f"{what} {directory} is a symbolic link", f"{hint}; use its target")
    if not stat.S_ISDIR(info.st_mode):
        raise UsageError(
            f"{what} {directory} is not a directory",
            "point LABBUILDER_STATE_DIR at a directory (or unset it)",
        )
    uid = os.geteuid()
    if info.st_uid not in (uid, 0):
        raise UsageError(
            f"{what} {directory} belongs to user id {info.st_uid}, not to this user ({uid})",
            hint,
        )
    if info.st_mode & 0o022:
        raise UsageError(
            f"{what} {directory} is writable by group or others "
            f"(mode {stat.S_IMODE(info.st_mode):04o})",
            f"chmod go-w {directory}; {hint}",
        )
    parent = directory.parent
    if parent == directory:
        return
    above = parent.stat()
    sticky_root = above.st_mode & stat.S_ISVTX and above.st_uid == 0
    if above.st_mode & 0o022 and not sticky_root:
        raise UsageError(
            f"{what} {directory} is in {parent}, which is writable by group or others "
            f"(mode {stat.S_IMODE(above.st_mode):04o})",
            f"chmod go-w {parent}, or keep labbuilder's state elsewhere",
        )
    if above.st_uid not in (uid, 0):
        raise UsageError(
            f"{what} {directory} is in {parent}, which belongs to user id {above.st_uid}",
            hint,
        )


def check_state_root() -> None:
    """The state directory (``$LABBUILDER_STATE_DIR`` or the default) is safe to use, or absent:
    the nearest existing folder on its path is checked instead then."""
    root = state_root()
    existing = root
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if existing == root:
        check_private_dir(root)
        return
    if existing.is_symlink() or not existing.is_dir():
        raise UsageError(
            f"state directory {root}: {existing} is not a directory",
            "point LABBUILDER_STATE_DIR at a directory (or unset it)",
        )


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
        write_state_file(public_path, public + f" labbuilder-{state.lab}\n".encode())
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
            write_state_file(public_path, public + f" root@{node}\n".encode())
        keys[node] = (private_path.read_text(), public_path.read_text().strip())
    lines = []
    for node, address in nodes.items():
        kind, blob = keys[node][1].split()[:2]
        lines.append(f"{node},{state.lab}-{node},{address} {kind} {blob}")
    write_state_file(state.known_hosts_path, "\n".join(lines) + "\n")
    return keys


def load_secrets(state: LabState) -> dict[str, str]:
    if not os.path.lexists(state.secrets_path):
        return {}
    text = read_state_file(state.secrets_path)
    try:
        loaded = json.loads(text)
    except ValueError as err:
        raise UsageError(
            f"{state.secrets_path} is not the lab's secrets file (not JSON: {err})",
            "labbuilder made it as JSON; remove it only if the lab will be made anew",
        ) from None
    if not isinstance(loaded, dict) or not all(isinstance(v, str) for v in loaded.values()):
        raise UsageError(f"{state.secrets_path} is not the lab's secrets file (not a table)")
    return {str(key): value for key, value in loaded.items()}


def read_state_file(path: Path) -> str:
    """A state file's text, read without following a link planted at its name."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UsageError(
                f"{path} is a symbolic link; labbuilder reads its state files only as they are",
                f"remove {path} (and find out who put it there)",
            ) from None
        raise
    with os.fdopen(fd, encoding="utf-8") as handle:
        return handle.read()


PASSWORD_ALPHABET = string.ascii_letters + string.digits
PASSWORD_LENGTH = 20  # about 119 bits


def new_password() -> str:
    """A generated password of letters and digits only: the guide's commands put passwords in
    shell words, SQL, URLs and configuration files, and some tools read a leading '-' as an
    option (``rabbitmqctl change_password openstack -A...``)."""
    return "".join(secrets.choice(PASSWORD_ALPHABET) for _ in range(PASSWORD_LENGTH))


def ensure_secrets(state: LabState, names: tuple[str, ...]) -> dict[str, str]:
    """Generated secrets for ``names`` (kept across runs), in a 0600 file."""
    values = load_secrets(state)
    missing = [name for name in names if name not in values]
    if missing:
        for name in missing:
            values[name] = new_password()
        write_secret_file(state.secrets_path, json.dumps(values, indent=1).encode())
    return {name: values[name] for name in names}


def password_hash(password: str) -> str:
    """SHA-512 crypt(3) of ``password`` for cloud-init (the password goes through stdin)."""
    try:
        # Neither the password nor its hash goes to the log.
        result = processes.run(
            ["openssl", "passwd", "-6", "-stdin"], input=password, log_output=False
        )
    except processes.ProgramMissing:
        raise HostError("openssl is missing", "apt-get install openssl") from None
    except processes.ProcessFailed as err:
        raise HostError(f"openssl passwd failed: {err.result.errors.strip()}") from None
    return result.output.strip()


@contextmanager
def lab_lock(state: LabState, action: str) -> Iterator[None]:
    """Hold the lab's lock: a second ``up``/``down``/``install``/``snapshot`` of the same lab
    is refused, not queued, and ``gc`` leaves the lab alone meanwhile.

    The lock is per lab name on the host (``paths.lab_lock_path``), not in the state
    directory: the name maps to libvirt objects, whichever state directory a command uses.
    """
    path = lab_lock_path(state.lab)
    if "/" in state.lab or state.lab in ("", ".", ".."):
        raise ValueError(f"{state.lab!r} is not a lab name")
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path, blocking=False) as locked:
        if not locked:
            raise UsageError(
                f"another labbuilder command is changing lab {state.lab} right now",
                f"wait for it to finish before running `{action}`",
            )
        try:
            yield
        finally:
            path.unlink(missing_ok=True)  # the holder may (see filelock); waiters lock anew


def load_state_record(state: LabState) -> dict[str, Any] | None:
    """What ``up`` recorded of the lab (``lab.json``: plan digest, images, probe), or None."""
    path = state.directory / "lab.json"
    if not path.exists():
        return None
    record: dict[str, Any] = json.loads(path.read_text())
    return record


def gateway_namespace(record: dict[str, Any]) -> str | None:
    """The gateway namespace of an isolated lab's record (None: its gateways are on the host)."""
    gateway = record.get("plan", {}).get("gateway")
    return str(gateway["namespace"]) if gateway else None
