"""Host firewall rules that confine a lab's guests (``Egress``), owned by the lab, removed with it.

Where the rules live, and why
-----------------------------
Each lab with ``egress = "none"`` or ``"allow"`` gets one chain ``LB-<tag>`` (``tag`` is the lab's
``planner.lab_tag``) in the **mangle** table, and one jump ``-i <bridge> -j LB-<tag>`` per lab
bridge at the top of mangle ``FORWARD``. The chain returns for replies (conntrack
ESTABLISHED/RELATED), for traffic leaving through one of the lab's own bridges, for the lab's
subnets and for the allow-list, and drops everything else.

Not filter ``FORWARD``: libvirt (9.0, iptables backend) puts its NAT networks' ACCEPT rules there
(``LIBVIRT_FWX/FWI/FWO``) and re-inserts its jumps at position 1 whenever it re-creates its
chains (daemon start, firewalld reload); Docker does the same with its chains. In one table an
earlier ACCEPT ends the traversal, so a rule of ours at position 1 would have to be re-checked
after every such event. mangle ``FORWARD`` runs at the same hook before filter (priority -150
against 0), libvirt only uses mangle ``POSTROUTING``, and a DROP in any table is final: no
ACCEPT in filter can undo it. The price is that mangle has no REJECT target, so a refused guest
connection times out rather than failing at once. For the same reason it does not matter whether
libvirt uses the nft or the legacy backend of iptables: both hook into the same netfilter.
Guest traffic to the host itself (DNS and DHCP from libvirt's dnsmasq on the gateway, an apt
proxy on the host) is INPUT, not FORWARD, and is not touched.

Every rule carries ``-m comment --comment labbuilder:<lab>``: which lab owns what is read from
the host itself (``owned_labs``), even after a crash. Changes go through ``iptables-restore
--noflush``, one transaction per address family, so a lab is never briefly unfiltered while its
rules are replaced. IPv4 and IPv6 are both handled (IPv6 only drops: lab networks have no IPv6
subnets, but a guest must not escape through IPv6 either).
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from labbuilder.adapters import processes
from labbuilder.common.errors import HostError, PlanError
from labbuilder.lab.planner import lab_tag
from labbuilder.model.lab import Egress

TABLE = "mangle"
HOOK = "FORWARD"
COMMENT_PREFIX = "labbuilder:"
CHAIN_PREFIX = "LB-"
INSTALL_HINT = "apt-get install iptables"

_LAB_NAME = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


@dataclass(frozen=True)
class Family:
    """One address family's iptables programs."""

    version: int  # 4 or 6
    save: str
    restore: str


IPV4 = Family(4, "iptables-save", "iptables-restore")
IPV6 = Family(6, "ip6tables-save", "ip6tables-restore")


@dataclass(frozen=True)
class Rule:
    """One rule of ``iptables-save`` output: ``-A <chain> <spec...>``."""

    chain: str
    spec: str  # the rest of the line after "-A <chain> ", in iptables-save's own quoting
    owner: str | None  # the lab named in a ``labbuilder:<lab>`` comment
    target: str | None  # what ``-j`` jumps to


@dataclass(frozen=True)
class Table:
    """The parsed ``iptables-save -t <table>`` output: its chains and rules."""

    chains: tuple[str, ...]
    rules: tuple[Rule, ...]


def run(argv: Sequence[str], *, stdin: str | None = None) -> str:
    """Run ``argv`` (never through a shell, through ``processes.run``, which logs it and
    ``stdin``: rules, no secret) and return its standard output.

    Raises ``HostError`` when the program is missing or fails.
    """
    args = list(argv)
    try:
        return processes.run(args, input=stdin, log_input=True).output
    except processes.ProgramMissing:
        raise HostError(
            f"{args[0]} is not installed on this host; labbuilder needs it for lab egress rules",
            hint=INSTALL_HINT,
        ) from None
    except processes.ProcessFailed as exc:
        output = (exc.result.errors or exc.result.output).strip()
        hint = (
            "labbuilder changes the host firewall: run it as root"
            if os.geteuid() != 0
            else f"check the host firewall with `{args[0]}`; see the message above"
        )
        raise HostError(
            f"{shlex.join(args)} failed with exit code {exc.result.returncode}: {output}",
            hint=hint,
        ) from None


def chain_name(lab: str) -> str:
    """The lab's own chain, ``LB-<6 hex>`` (iptables allows 28 characters)."""
    return CHAIN_PREFIX + lab_tag(lab)


def comment(lab: str) -> str:
    return COMMENT_PREFIX + lab


def families() -> tuple[Family, ...]:
    """The address families this host has (IPv6 can be disabled on the kernel command line)."""
    return (IPV4, IPV6) if Path("/proc/sys/net/ipv6").is_dir() else (IPV4,)


# --- reading --------------------------------------------------------------------------------


def parse_save(text: str) -> Table:
    """Chains and rules of one table in ``iptables-save`` output (its stable machine format)."""
    chains: list[str] = []
    rules: list[Rule] = []
    for line in text.splitlines():
        if line.startswith(":"):
            chains.append(line[1:].split()[0])
        elif line.startswith("-A "):
            _, chain, *rest = line.split(" ", 2)
            spec = rest[0] if rest else ""
            tokens = shlex.split(spec)
            rules.append(
                Rule(
                    chain=chain,
                    spec=spec,
                    owner=_owner(tokens),
                    target=_option(tokens, "-j"),
                )
            )
    return Table(chains=tuple(chains), rules=tuple(rules))


def _option(tokens: Sequence[str], name: str) -> str | None:
    for i, token in enumerate(tokens[:-1]):
        if token == name:
            return tokens[i + 1]
    return None


def _owner(tokens: Sequence[str]) -> str | None:
    text = _option(tokens, "--comment")
    if text is None or not text.startswith(COMMENT_PREFIX):
        return None
    return text.removeprefix(COMMENT_PREFIX) or None


def read_table(family: Family) -> Table:
    return parse_save(run([family.save, "-t", TABLE]))


def owned_labs() -> set[str]:
    """The labs that have egress rules on this host, read from the rules' comments."""
    return {
        rule.owner
        for family in families()
        for rule in read_table(family).rules
        if rule.owner is not None
    }


def lab_rules(lab: str) -> tuple[str, ...]:
    """The lab's rules, as ``iptables-save`` lines (``-A ...``), IPv4 first; for status output."""
    _check_lab(lab)
    return tuple(
        f"-A {rule.chain} {rule.spec}"
        for family in families()
        for rule in read_table(family).rules
        if rule.owner == lab
    )


# --- changing -------------------------------------------------------------------------------


def ensure_egress(
    lab: str,
    bridges: Sequence[str],
    lab_cidrs: Sequence[str],
    egress: Egress,
    allow: Sequence[str],
) -> None:
    """Make the host's rules for ``lab`` say ``egress``; running it again changes nothing.

    ``nat`` removes the lab's rules (libvirt's NAT alone lets guests reach everything).
    ``none`` and ``allow`` drop forwarded traffic that enters from one of ``bridges`` and goes
    neither to one of the lab's bridges, nor to ``lab_cidrs``, nor (with ``allow``) to
    ``allow``; replies and already established connections pass. ``allow`` is ignored with
    ``none``. Raises ``ValueError`` for arguments the lab checks should have refused.
    """
    _check_lab(lab)
    if egress == Egress.NAT:
        remove_egress(lab)
        return
    if not bridges:
        raise ValueError(f"lab {lab}: egress {egress} needs at least one bridge to filter")
    for bridge in bridges:
        if not _IFNAME.match(bridge):
            raise ValueError(f"lab {lab}: {bridge!r} is not a network interface name")
    internal = [_network(text, "lab subnet") for text in lab_cidrs]
    allowed = [_network(text, "egress destination") for text in allow]
    if egress == Egress.NONE:
        allowed = []
    for family in families():
        destinations = [net for net in [*internal, *allowed] if net.version == family.version]
        script = _ensure_script(lab, read_table(family), list(bridges), destinations)
        run([family.restore, "-w", "--noflush"], stdin=script)


def remove_egress(lab: str) -> None:
    """Remove the lab's jumps and chain, and nothing of any other lab. Idempotent."""
    _check_lab(lab)
    for family in families():
        script = _remove_script(lab, read_table(family))
        if script is not None:
            run([family.restore, "-w", "--noflush"], stdin=script)


def _ensure_script(
    lab: str,
    table: Table,
    bridges: list[str],
    destinations: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
) -> str:
    chain = chain_name(lab)
    _refuse_foreign_chain(lab, chain, table)
    tag = f'-m comment --comment "{comment(lab)}"'
    lines = [f"*{TABLE}", f":{chain} - [0:0]"]  # creates the chain, or flushes the existing one
    lines.append(f"-A {chain} -m conntrack --ctstate RELATED,ESTABLISHED {tag} -j RETURN")
    lines.extend(f"-A {chain} -o {bridge} {tag} -j RETURN" for bridge in bridges)
    lines.extend(f"-A {chain} -d {net} {tag} -j RETURN" for net in destinations)
    lines.append(f"-A {chain} {tag} -j DROP")
    lines.extend(f"-D {rule.chain} {rule.spec}" for rule in _jumps(lab, chain, table))
    lines.extend(f"-I {HOOK} 1 -i {bridge} {tag} -j {chain}" for bridge in reversed(bridges))
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def _remove_script(lab: str, table: Table) -> str | None:
    chain = chain_name(lab)
    lines = [f"-D {rule.chain} {rule.spec}" for rule in _jumps(lab, chain, table)]
    if (
        chain in table.chains
        and not _foreign_rules(lab, chain, table)
        and not _foreign_references(lab, chain, table)
    ):
        lines.extend([f"-F {chain}", f"-X {chain}"])
    if not lines:
        return None
    return "\n".join([f"*{TABLE}", *lines, "COMMIT"]) + "\n"


def _jumps(lab: str, chain: str, table: Table) -> list[Rule]:
    """The lab's rules outside its own chain (its jumps): only rules tagged for the lab."""
    return [rule for rule in table.rules if rule.chain != chain and rule.owner == lab]


def _foreign_rules(lab: str, chain: str, table: Table) -> list[Rule]:
    """Rules in ``chain`` that are not tagged for ``lab``: another lab's (when two lab names
    share a tag) or rules labbuilder did not make."""
    return [rule for rule in table.rules if rule.chain == chain and rule.owner != lab]


def _foreign_references(lab: str, chain: str, table: Table) -> list[Rule]:
    """Rules outside ``chain`` that jump to it and are not tagged for ``lab``."""
    return [
        rule
        for rule in table.rules
        if rule.chain != chain and rule.target == chain and rule.owner != lab
    ]


def check_lab_chain(lab: str) -> None:
    """Refuse (``PlanError``) a lab whose chain exists with rules that are not the lab's:
    `up` asks before it creates anything, as ``ensure_egress`` checks again."""
    _check_lab(lab)
    for family in families():
        _refuse_foreign_chain(lab, chain_name(lab), read_table(family))


def _refuse_foreign_chain(lab: str, chain: str, table: Table) -> None:
    """labbuilder changes a chain only when every rule in it, and every jump to it, is the
    lab's: it never flushes or rewrites a rule it did not tag for that lab."""
    foreign = _foreign_rules(lab, chain, table) + _foreign_references(lab, chain, table)
    if foreign:
        owners = sorted(
            {f"lab {rule.owner}" if rule.owner else "not labbuilder" for rule in foreign}
        )
        raise PlanError(
            f"the firewall chain {chain} of lab {lab} already exists with rules of "
            f"{', '.join(owners)} (in or jumping to it: {foreign[0].chain} {foreign[0].spec})",
            hint="labbuilder never changes rules it did not make: remove that chain "
            "(`iptables -t mangle`), or rename the lab",
        )


def _network(text: str, what: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not an address or CIDR ({what})") from None


def _check_lab(lab: str) -> None:
    if not _LAB_NAME.match(lab):
        raise ValueError(f"{lab!r} is not a lab name")
