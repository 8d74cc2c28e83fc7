"""The class's SSH entry on the host, as text: its sshd configuration, each student's line in
its authorized_keys, and what a student may ask of it.

The entry is an sshd of its own (its own port, host key, authorized_keys and pid file under the
class's state folder; the host's sshd and accounts are untouched). Every key in it carries a
forced command, ``labbuilder class entry <lab>``, and ``restrict`` (no forwarding, no agent, no
X11; a pty only for the console): whatever a student's ssh asks, the entry runs that command,
which reads the request from ``SSH_ORIGINAL_COMMAND``:

- ``relay HOST PORT``: bytes to and from HOST:PORT of the student's own lab (a node's name, or
  an address in one of the lab's networks), opened from the lab's gateway namespace (ssh's
  ProxyCommand);
- ``console NODE``: the node's serial console.

Anything else is refused. Pure; imports the model and common.
"""

from __future__ import annotations

import ipaddress
import shlex
from dataclasses import dataclass
from pathlib import Path

from labbuilder.common.errors import UsageError
from labbuilder.model.lab import Plan


@dataclass(frozen=True)
class Request:
    action: str  # "relay" or "console"
    node: str  # the node (console) or the address asked for (relay)
    port: int = 0


def sshd_config(folder: Path, address: str, port: int) -> str:
    return "\n".join(
        [
            "# labbuilder: a class's SSH entry for its students; nothing else uses it",
            f"Port {port}",
            f"ListenAddress {address}",
            f"HostKey {folder / 'ssh_host_ed25519_key'}",
            f"PidFile {folder / 'sshd.pid'}",
            f"AuthorizedKeysFile {folder / 'authorized_keys'}",
            "AuthorizedPrincipalsFile none",
            "PermitRootLogin forced-commands-only",
            "AllowUsers root",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",  # the folder is labbuilder's, 0700, root's
            "AllowTcpForwarding no",
            "AllowStreamLocalForwarding no",
            "AllowAgentForwarding no",
            "X11Forwarding no",
            "PermitTunnel no",
            "PermitUserEnvironment no",
            "GatewayPorts no",
            "PrintMotd no",
            "MaxStartups 50:30:100",
            "LogLevel VERBOSE",
            "",
        ]
    )


def authorized_key_line(python: str, lab: str, key: str) -> str:
    """The student's key, able to run ``labbuilder class entry <lab>`` and nothing else."""
    command = shlex.join([python, "-m", "labbuilder", "class", "entry", lab])
    if '"' in command or "\n" in command or "\n" in key:
        raise UsageError(f"cannot write a forced command for {lab}: {command!r}")
    return f'restrict,pty,command="{command}" {key.strip()}'


def parse_request(text: str) -> Request:
    """What a student's ssh asked of the entry; UsageError for anything but the two forms."""
    words = text.split()
    hint = (
        "the entry takes `relay HOST PORT` (ssh -F with the class's ssh_config) or `console NODE`"
    )
    if len(words) == 3 and words[0] == "relay" and words[2].isdigit():
        port = int(words[2])
        if 0 < port < 65536:
            return Request("relay", words[1], port)
    if len(words) == 2 and words[0] == "console":
        return Request("console", words[1])
    raise UsageError(f"the class's entry does not take {text[:80]!r}", hint)


def relay_target(plan: Plan, host: str) -> str:
    """The address a student may reach for ``host``: a node of their lab by name, or an
    address inside one of their lab's networks (its nodes, its instances' floating IPs).
    UsageError for anything else: the entry reaches nothing outside the student's lab."""
    for node in plan.nodes:
        if host in (node.name, f"{plan.lab}-{node.name}"):
            return node.management_address
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is not None and any(
        address in ipaddress.ip_network(net.cidr) for net in plan.networks
    ):
        return str(address)
    names = ", ".join(node.name for node in plan.nodes)
    raise UsageError(
        f"{host!r} is not in lab {plan.lab}",
        f"reach your lab's nodes ({names}) or addresses in its networks",
    )


def console_domain(plan: Plan, node: str) -> str:
    for planned in plan.nodes:
        if node in (planned.name, planned.domain):
            return planned.domain
    raise UsageError(
        f"lab {plan.lab} has no node {node!r}",
        f"its nodes: {', '.join(n.name for n in plan.nodes)}",
    )
