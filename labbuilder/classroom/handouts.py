"""A student's handout and connection files, rendered from their lab's plan and secrets.

``student_files`` gives, per student: ``handout.md`` (the lab's nodes and networks as the guide
names them, the guide's password table with the lab's values, how to connect, the console),
``<class>-<student>.ssh_config`` (every node by name, through the class's SSH entry on the host)
and ``<class>-<student>.known_hosts`` (the entry's host key and the nodes' host keys). Pure.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import jinja2

from labbuilder.model.lab import Plan

CONSOLE_SECRET = "console_password"


@dataclass(frozen=True)
class Entry:
    """The class's SSH entry on the host: where students connect, and its host key."""

    host: str
    port: int
    host_key: str  # "ssh-ed25519 AAAA..."


@dataclass(frozen=True)
class StudentLab:
    class_name: str
    student: str
    plan: Plan
    user: str  # the guests' login user
    secrets: Mapping[str, str]  # the lab's secrets.json
    purposes: tuple[tuple[str, str], ...]  # the recipe's secrets: (name, what it is for)
    node_keys: Mapping[str, str]  # node -> its SSH host public key ("ssh-ed25519 AAAA...")
    template: str | None = None
    stage: str | None = None

    @property
    def name(self) -> str:
        return f"{self.class_name}-{self.student}"


def _load(name: str) -> str:
    return (resources.files("labbuilder.classroom") / "templates" / name).read_text()


@cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FunctionLoader(_load),
        autoescape=False,  # noqa: S701 - Markdown and ssh_config for the student, not HTML
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )


def file_names(lab: StudentLab) -> dict[str, str]:
    return {
        "key_file": lab.name,
        "config_file": f"{lab.name}.ssh_config",
        "known_hosts_file": f"{lab.name}.known_hosts",
    }


def render_handout(lab: StudentLab, entry: Entry) -> str:
    plan = lab.plan
    networks = [
        {
            "name": net.name,
            "cidr": net.cidr,
            "gateway": net.gateway,
            "floating": "-".join(net.floating_range) if net.floating_range else None,
        }
        for net in plan.networks
    ]
    nodes = [
        {
            "name": node.name,
            "role": str(node.role),
            "addresses": {nic.network: nic.address or "(no address)" for nic in node.nics},
        }
        for node in plan.nodes
    ]
    secrets = [
        (name, lab.secrets[name], purpose) for name, purpose in lab.purposes if name in lab.secrets
    ]
    controller = next((n for n in plan.nodes if str(n.role) == "controller"), plan.nodes[0])
    values: dict[str, Any] = {
        "class_name": lab.class_name,
        "student": lab.student,
        "lab": lab.name,
        "template": lab.template,
        "stage": lab.stage,
        "networks": networks,
        "nodes": nodes,
        "secrets": secrets,
        "user": lab.user,
        "access_host": entry.host,
        "access_port": entry.port,
        "controller_address": controller.management_address,
        "console_password": lab.secrets.get(CONSOLE_SECRET, "(none)"),
        **file_names(lab),
    }
    return _environment().get_template("handout.md.j2").render(values)


def render_ssh_config(lab: StudentLab, entry: Entry) -> str:
    """Every node by its name, reached through the class's entry (``ssh -W``-like: the entry's
    forced command relays to the node the student names, in their own lab only)."""
    names = file_names(lab)
    key = f"~/.ssh/{names['key_file']}"
    known = f"~/.ssh/{names['known_hosts_file']}"
    proxy = shlex.join(
        [
            "ssh", "-p", str(entry.port), "-i", key, "-o", "IdentitiesOnly=yes",
            "-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes",
            f"root@{entry.host}", "relay",
        ]
    )  # fmt: skip
    lines = [f"# {lab.name}: {lab.student}'s lab of class {lab.class_name}"]
    for node in lab.plan.nodes:
        lines += [f"Host {node.name}", f"  HostName {node.management_address}"]
    lines += [
        "Host *",
        f"  User {lab.user}",
        f"  IdentityFile {key}",
        "  IdentitiesOnly yes",
        f"  UserKnownHostsFile {known}",
        "  StrictHostKeyChecking yes",
        # ssh expands %h and %p itself: they are not quoted
        f"  ProxyCommand {proxy} %h %p",
        "",
    ]
    return "\n".join(lines)


def render_known_hosts(lab: StudentLab, entry: Entry) -> str:
    """The entry's host key under ``[host]:port``, each node's under its name and address."""
    entry_name = entry.host if entry.port == 22 else f"[{entry.host}]:{entry.port}"
    lines = [f"{entry_name} {entry.host_key}"]
    for node in lab.plan.nodes:
        if node.name in lab.node_keys:
            lines.append(f"{node.name},{node.management_address} {lab.node_keys[node.name]}")
    return "\n".join(lines) + "\n"


def handout_pdf(markdown: str) -> bytes:
    """The handout as a PDF: headings, paragraphs and lists in a proportional font, tables and
    commands in a monospaced one, one page or more (A4). Uncompressed: a few KB."""
    from fpdf import FPDF

    pdf = FPDF(format="A4")
    pdf.set_compression(False)
    pdf.set_auto_page_break(auto=True, margin=15)
    pdf.add_page()
    width = pdf.w - pdf.l_margin - pdf.r_margin
    in_code = False
    for raw in markdown.splitlines():
        line = _latin1(raw)
        if line.startswith("```"):
            in_code = not in_code
            pdf.ln(1)
            continue
        if in_code or line.startswith("|"):
            if line.startswith("|---"):
                continue
            pdf.set_font("Courier", size=8)
            text = line if in_code else " ".join(cell.strip() for cell in line.split("|"))
            pdf.multi_cell(width, 4, text.replace("`", ""), new_x="LMARGIN", new_y="NEXT")
            continue
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            pdf.ln(2)
            pdf.set_font("Helvetica", style="B", size=16 if level == 1 else 12)
            pdf.multi_cell(width, 7, line.lstrip("# "), new_x="LMARGIN", new_y="NEXT")
            continue
        pdf.set_font("Helvetica", size=10)
        if not line.strip():
            pdf.ln(2)
            continue
        pdf.multi_cell(
            width, 5, line.replace("**", "").replace("`", ""), new_x="LMARGIN", new_y="NEXT"
        )
    return bytes(pdf.output())


def _latin1(text: str) -> str:
    """The PDF's built-in fonts know Latin-1: other characters become '?'."""
    return text.encode("latin-1", errors="replace").decode("latin-1")
