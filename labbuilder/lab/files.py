"""Lab files (TOML) and built-in labs → ``Lab``. Parse at the edge, then trust the types.

Every problem raises ``LabFileError`` naming the file, the key path, the value and the rule,
for example ``lab.toml: nodes.compute1.memory = "1 GiB" is below the guide's minimum of 2 GB
for a compute node``. Nothing downstream sees raw TOML.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from labbuilder.common.errors import LabFileError
from labbuilder.common.resources import data_dir
from labbuilder.common.sizes import format_size
from labbuilder.common.tomlread import (
    Where,
    check_keys,
    expect,
    parse_bool,
    parse_enum,
    parse_int,
    parse_line,
    parse_name,
    parse_range,
    parse_size_value,
    parse_str,
    parse_str_list,
    parse_table,
)
from labbuilder.lab.check import check_lab
from labbuilder.lab.refs import MAX_LAB_FILE, parse_image, parse_recipe_name, read_lab_text
from labbuilder.model import guide
from labbuilder.model.lab import (
    DiskSpec,
    Egress,
    GiB,
    Lab,
    MiB,
    Networking,
    NetworkKind,
    NetworkSpec,
    NicRole,
    NodeSpec,
    Options,
    Role,
)

TOP_KEYS = ("name", "description", "networking", "image", "recipe", "libvirt_uri")
TABLE_KEYS = ("options", "networks", "nodes")
OPTION_KEYS = (
    "ntp_servers",
    "apt_proxy",
    "apt_mirror",
    "internet",
    "egress",
    "egress_allow",
    "role_images",
    "stages",
    "isolated",
)
NETWORK_KEYS = ("role", "kind", "cidr", "gateway", "dhcp_range", "floating_range")
NODE_KEYS = ("role", "count", "vcpus", "memory", "disk", "extra_disks", "nics", "addresses", "macs")
DISK_KEYS = ("size", "purpose")

# Limits: what libvirt, the kernel or this program would refuse or choke on is refused first.
MAX_NODES = 64  # per lab, and per group (`count`)
MAX_VCPUS = 64
MIN_MEMORY, MAX_MEMORY = 128 * MiB, 256 * GiB  # the minimum holds even with --allow-small
MIN_DISK, MAX_DISK = 1 * GiB, 4096 * GiB  # the root disk; extra disks have the same maximum
MIN_EXTRA_DISK = 1 * MiB
MAX_EXTRA_DISKS = 8  # vdb..vdi; the seed takes the next letter
MAX_LIST = 32  # ntp_servers, egress_allow, stages
MAX_DESCRIPTION = 500
# Names labbuilder gives its own temporary libvirt objects: a lab may not be named into them.
RESERVED_LAB_PREFIXES = ("lbbake", "lbprobe")
_NODE_NAME_HINT = (
    "use lower-case letters and digits, starting with a letter, at most {n} characters; no '-': "
    "libvirt names are <lab>-<name>, so a '-' would let two labs plan the same name"
)


# --- entry points ---------------------------------------------------------------------------


def load_lab_file(path: Path, *, force: bool = False) -> Lab:
    """Read and validate a lab file: a regular file of at most 1 MiB of UTF-8 TOML."""
    return parse_lab(read_lab_text(path), source=str(path), force=force, folder=path.parent)


def builtin_lab_names() -> list[str]:
    return sorted(
        entry.name.removesuffix(".toml")
        for entry in data_dir("labs").iterdir()
        if entry.name.endswith(".toml")
    )


def load_builtin_lab(name: str, *, force: bool = False) -> Lab:
    names = builtin_lab_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean {close[0]!r}?" if close else "`labbuilder labs` lists them"
        raise LabFileError(
            f"there is no built-in lab {name!r}; built-in labs: {', '.join(names)}", hint
        )
    entry = data_dir("labs") / f"{name}.toml"
    return parse_lab(entry.read_text(encoding="utf-8"), source=f"built-in lab {name}", force=force)


def parse_lab(text: str, *, source: str, force: bool = False, folder: Path | None = None) -> Lab:
    """Parse a lab file's text. ``force`` turns sizes below the guide's minimums into warnings;
    ``folder`` is the lab file's folder, the only place its local images may be (None: a lab
    without a file names no local image)."""
    if len(text) > MAX_LAB_FILE:
        raise LabFileError(f"{source}: the lab file is larger than {MAX_LAB_FILE // 1024} KiB")
    return lab_from_data(parse_toml(text, source), source=source, force=force, folder=folder)


def parse_toml(text: str, source: str) -> dict[str, Any]:
    """A lab's or class's file as TOML; ``LabFileError`` naming the line if it is not."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise LabFileError(
            f"{source}: not valid TOML: {one_line(str(err))}",
            "fix the TOML syntax at that line and column (https://toml.io)",
        ) from None
    except RecursionError:
        raise LabFileError(
            f"{source}: not valid TOML: arrays or tables nested too deeply",
            "a lab file nests tables and lists a few levels deep at most",
        ) from None


def one_line(text: str) -> str:
    return " ".join(text.split())


DEFAULT_HINT = "the README's lab file reference gives each key's rule"


def lab_from_data(
    data: dict[str, Any], *, source: str, force: bool = False, folder: Path | None = None
) -> Lab:
    """Build a Lab from a lab file's parsed TOML (a dict as ``tomllib`` returns it)."""
    try:
        return _lab_from_data(data, source, force, folder)
    except LabFileError as err:
        err.hint = err.hint or DEFAULT_HINT
        raise


def _lab_from_data(data: dict[str, Any], source: str, force: bool, folder: Path | None) -> Lab:
    where = Where(source)
    check_keys(data, TOP_KEYS + TABLE_KEYS, where)

    name = parse_name(data.get("name"), where.key("name"), max_length=40)
    if name.startswith(RESERVED_LAB_PREFIXES):
        raise where.key("name").error(
            name,
            f"starts with {next(p for p in RESERVED_LAB_PREFIXES if name.startswith(p))!r}, "
            "which labbuilder keeps for its own temporary machines",
            "choose another name",
        )
    networking = parse_enum(data.get("networking", "neutron"), Networking, where.key("networking"))
    networks = parse_networks(data.get("networks", {}), networking, where.key("networks"))
    warnings: list[str] = []
    nodes = parse_nodes(data.get("nodes", {}), networking, where.key("nodes"), force, warnings)
    libvirt_uri = parse_str(
        data.get("libvirt_uri", guide.DEFAULT_LIBVIRT_URI), where.key("libvirt_uri")
    )
    lab = Lab(
        name=name,
        description=parse_line(
            data.get("description", ""), where.key("description"), max_length=MAX_DESCRIPTION
        ),
        source=source,
        networking=networking,
        image=parse_image(data.get("image", guide.DEFAULT_IMAGE), where.key("image"), folder),
        recipe=parse_recipe_name(data.get("recipe", guide.DEFAULT_RECIPE), where.key("recipe")),
        libvirt_uri=libvirt_uri,
        networks=networks,
        nodes=nodes,
        options=parse_options(
            data.get("options", {}), where.key("options"), isolated=isolated_by_default(libvirt_uri)
        ),
    )
    check_lab(lab)
    return replace(lab, warnings=tuple(warnings))


# --- sections -------------------------------------------------------------------------------


def isolated_by_default(libvirt_uri: str) -> bool:
    """Whether a lab on ``libvirt_uri`` is isolated unless its file says otherwise: a lab on this
    host's system libvirt (``qemu:///system``) is; a lab on another host, or in a user's session
    libvirt (no network namespaces without root), keeps its gateways on its host."""
    try:
        parts = urlsplit(libvirt_uri)
    except ValueError:  # not a URI: the lab checks refuse it with its key
        return False
    return parts.scheme == "qemu" and not parts.netloc and parts.path == "/system"


def parse_options(value: object, where: Where, *, isolated: bool = False) -> Options:
    table = parse_table(value, where)
    check_keys(table, OPTION_KEYS, where)
    proxy = table.get("apt_proxy")
    mirror = table.get("apt_mirror")
    return Options(
        ntp_servers=parse_str_list(
            table.get("ntp_servers", []), where.key("ntp_servers"), max_items=MAX_LIST
        ),
        apt_proxy=parse_str(proxy, where.key("apt_proxy")) if proxy is not None else None,
        apt_mirror=parse_str(mirror, where.key("apt_mirror")) if mirror is not None else None,
        internet=parse_bool(table.get("internet", False), where.key("internet")),
        egress=parse_enum(table.get("egress", "nat"), Egress, where.key("egress")),
        egress_allow=parse_str_list(
            table.get("egress_allow", []), where.key("egress_allow"), max_items=MAX_LIST
        ),
        role_images=parse_bool(table.get("role_images", True), where.key("role_images")),
        isolated=parse_bool(table.get("isolated", isolated), where.key("isolated")),
        optional_stages=parse_stage_names(table.get("stages", []), where.key("stages")),
    )


def parse_stage_names(value: object, where: Where) -> tuple[str, ...]:
    """``options.stages``: names of the recipe's optional stages the lab runs."""
    names = parse_str_list(value, where, max_items=MAX_LIST)
    for i, name in enumerate(names):
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", name):
            raise where.item(i).error(name, "is not a stage name (lower case, digits and '-')")
    return names


def parse_networks(value: object, networking: Networking, where: Where) -> tuple[NetworkSpec, ...]:
    """The guide's networks for ``networking``, with the lab file's tables laid over them."""
    tables = parse_table(value, where)
    if len(tables) > len(NicRole):
        raise where.problem(
            f"networks has {len(tables)} tables; a lab has one network per role "
            f"({', '.join(role.value for role in NicRole)})"
        )
    defaults = {default.role.value: default for default in guide.NETWORKS[networking]}
    networks: list[NetworkSpec] = []
    for name in [*defaults, *(key for key in tables if key not in defaults)]:
        place = where.key(name)
        table = parse_table(tables.get(name, {}), place)
        check_keys(table, NETWORK_KEYS, place)
        default = defaults.get(name)
        named_role = name if name in {role.value for role in NicRole} else None
        role_value = table.get("role", named_role)
        if role_value is None:
            raise LabFileError(
                f"{place.source}: {place.path} needs a role",
                f"role = one of {', '.join(role.value for role in NicRole)}",
            )
        role = parse_enum(role_value, NicRole, place.key("role"))
        if default is None:
            default = next(d for d in guide.NETWORKS[Networking.NEUTRON] if d.role == role)
        gateway = table.get("gateway", default.gateway)
        dhcp = table.get("dhcp_range")
        floating = table.get("floating_range")
        networks.append(
            NetworkSpec(
                name=parse_plain_name(name, place),
                role=role,
                kind=parse_enum(
                    table.get("kind", default.kind.value), NetworkKind, place.key("kind")
                ),
                cidr=parse_str(table.get("cidr", default.cidr), place.key("cidr")),
                gateway=parse_str(gateway, place.key("gateway")) if gateway else None,
                dhcp_range=parse_range(dhcp, place.key("dhcp_range")) if dhcp is not None else None,
                floating_range=(
                    parse_range(floating, place.key("floating_range"))
                    if floating is not None
                    else default.floating_range
                ),
            )
        )
    return tuple(networks)


def parse_nodes(
    value: object, networking: Networking, where: Where, force: bool, warnings: list[str]
) -> tuple[NodeSpec, ...]:
    """The guide's nodes for ``networking``, with the lab file's tables laid over them.

    A table named like a default node changes it (``[nodes.compute1]``); a new name adds a
    node (``[nodes.block1]``); a table with ``count`` is a group that replaces the nodes of the
    same name and numbers its own (``[nodes.compute] count = 2`` → compute1, compute2), and
    ``count = 0`` removes them.
    """
    tables = parse_table(value, where)
    # name -> (its table, where it was defined; None for a node of the built-in topology)
    entries: dict[str, tuple[dict[str, Any], Where | None]] = {}
    for group, role, count in guide.NODES[networking]:
        for name in node_names(group, role, count):
            entries[name] = ({}, None)

    def define(name: str, table: dict[str, Any], place: Where) -> None:
        if name not in entries and len(entries) >= MAX_NODES:
            raise place.problem(
                f"{place.path} makes the lab larger than {MAX_NODES} nodes, the most "
                "labbuilder allows",
                "a lab on one host has a few nodes; split a bigger class into several labs",
            )
        earlier = entries.get(name, ({}, None))[1]
        if earlier is not None:
            raise LabFileError(
                f"{place.source}: node {name!r} is defined twice, by {earlier.path} "
                f"and by {place.path}"
            )
        entries[name] = (table, place)

    for key, raw in tables.items():
        place = where.key(key)
        table = parse_table(raw, place)
        check_keys(table, NODE_KEYS, place)
        if "count" not in table:
            define(key, table, place)
            continue
        count = parse_int(
            table["count"],
            place.key("count"),
            minimum=0,
            maximum=MAX_NODES,
            hint=f"a group has 0 to {MAX_NODES} nodes",
        )
        if strip_number(key) != key:
            raise place.key("count").error(
                count, f"needs a group name without a number, such as {strip_number(key)!r}"
            )
        for name in [n for n, (_, origin) in entries.items() if origin is None]:
            if strip_number(name) == key:
                del entries[name]
        for index in range(1, count + 1):
            define(f"{key}{index}", table, place)

    names = tuple(entries)
    return tuple(
        parse_node(name, table, origin or where.key(name), networking, names, force, warnings)
        for name, (table, origin) in entries.items()
    )


def node_names(group: str, role: Role, count: int) -> list[str]:
    if role in guide.NUMBERED_ROLES or count > 1:
        return [f"{group}{index}" for index in range(1, count + 1)]
    return [group] if count else []


def strip_number(name: str) -> str:
    return name.rstrip("0123456789")


def parse_node(
    name: str,
    table: dict[str, Any],
    where: Where,
    networking: Networking,
    all_names: tuple[str, ...],
    force: bool,
    warnings: list[str],
) -> NodeSpec:
    parse_plain_name(name, where)
    role_value = table.get("role", guide.ROLE_BY_NAME.get(strip_number(name)))
    if role_value is None:
        raise LabFileError(
            f"{where.source}: {where.path} needs a role (its name does not say which)",
            f"role = one of {', '.join(role.value for role in Role)}",
        )
    role = parse_enum(role_value, Role, where.key("role"))
    digits = name[len(strip_number(name)) :]
    if digits:
        index = int(digits)
    else:
        same_role = [n for n in all_names if guide.ROLE_BY_NAME.get(strip_number(n)) == role]
        index = same_role.index(name) + 1 if name in same_role else 1
    size = guide.DEFAULT_SIZE[role]
    nics_default = guide.NICS[networking].get(role)
    if nics_default is None:
        raise LabFileError(
            f"{where.source}: {where.path} is a {role} node, but the lab uses {networking} "
            "networking, which has no such node",
            "neutron and legacy networking cannot be mixed: remove the node or set "
            'networking = "neutron"',
        )
    nics = parse_nics(table["nics"], where.key("nics")) if "nics" in table else nics_default
    vcpus = parse_int(
        table.get("vcpus", size.vcpus),
        where.key("vcpus"),
        minimum=1,
        maximum=MAX_VCPUS,
        hint=f"1 to {MAX_VCPUS} vCPUs",
    )
    memory = parse_bounded_size(
        table.get("memory", format_size(size.memory)), where.key("memory"), MIN_MEMORY, MAX_MEMORY
    )
    disk = parse_bounded_size(
        table.get("disk", format_size(size.disk)), where.key("disk"), MIN_DISK, MAX_DISK
    )
    minimum = guide.MINIMUM.get(role)
    if minimum is not None:
        for key, got, least in (
            ("vcpus", vcpus, minimum.vcpus),
            ("memory", memory, minimum.memory),
            ("disk", disk, minimum.disk),
        ):
            if got >= least:
                continue
            shown = least if key == "vcpus" else format_size(least)
            problem = where.key(key).error(
                table[key], f"is below the guide's minimum of {shown} for a {role} node"
            )
            if not force:
                problem.hint = "give it at least the guide's minimum, or pass --allow-small"
                raise problem
            warnings.append(problem.message)
    return NodeSpec(
        name=name,
        role=role,
        index=index,
        defined_by=where.path,
        vcpus=vcpus,
        memory=memory,
        disk=disk,
        nics=nics,
        addresses=parse_nic_map(table.get("addresses", {}), where.key("addresses")),
        macs=parse_nic_map(table.get("macs", {}), where.key("macs")),
        extra_disks=parse_extra_disks(table, role, where),
        sized=tuple(key for key in ("vcpus", "memory", "disk") if key in table),
    )


def parse_plain_name(name: str, where: Where) -> str:
    """A node's or a network's name: a hostname label without '-' (see _NODE_NAME_HINT)."""
    if not re.fullmatch(r"[a-z][a-z0-9]{0,39}", name):
        raise where.error(name, "is not a valid name", _NODE_NAME_HINT.format(n=40))
    return name


def parse_bounded_size(value: object, where: Where, least: int, most: int) -> int:
    size = parse_size_value(value, where)
    hint = f"between {format_size(least)} and {format_size(most)}"
    if size < least:
        raise where.error(value, f"is below {format_size(least)}, the least a guest can have", hint)
    if size > most:
        raise where.error(value, f"is above {format_size(most)}, the most labbuilder allows", hint)
    return size


def parse_nics(value: object, where: Where) -> tuple[NicRole, ...]:
    items = expect(value, list, "a list of network roles", where)
    if len(items) > len(NicRole):
        raise where.error(items, f"has more than {len(NicRole)} NICs, one per network")
    return tuple(parse_enum(item, NicRole, where.item(i)) for i, item in enumerate(items))


def parse_nic_map(value: object, where: Where) -> tuple[tuple[NicRole, str], ...]:
    table = parse_table(value, where)
    if len(table) > len(NicRole):
        raise where.problem(f"{where.path} has more than {len(NicRole)} entries, one per NIC")
    return tuple(
        (parse_enum(key, NicRole, where.key(key)), parse_str(item, where.key(key)))
        for key, item in table.items()
    )


def parse_extra_disks(table: Mapping[str, Any], role: Role, where: Where) -> tuple[DiskSpec, ...]:
    if "extra_disks" not in table:
        return tuple(DiskSpec(size, purpose) for size, purpose in guide.EXTRA_DISKS.get(role, ()))
    place = where.key("extra_disks")
    disks: list[DiskSpec] = []
    items = expect(table["extra_disks"], list, "a list of disks", place)
    if len(items) > MAX_EXTRA_DISKS:
        raise place.problem(
            f"{place.path} has {len(items)} disks; a node has at most {MAX_EXTRA_DISKS} "
            "extra disks (vdb to vdi)"
        )
    for i, item in enumerate(items):
        item_where = place.item(i)
        if isinstance(item, str):
            size = parse_bounded_size(item, item_where, MIN_EXTRA_DISK, MAX_DISK)
            disks.append(DiskSpec(size, default_purpose(role, i)))
            continue
        disk = parse_table(item, item_where)
        check_keys(disk, DISK_KEYS, item_where)
        if "size" not in disk:
            raise LabFileError(
                f"{item_where.source}: {item_where.path} needs a size", 'size = "10 GB"'
            )
        purpose = parse_str(
            disk.get("purpose", default_purpose(role, i)), item_where.key("purpose")
        )
        if not re.fullmatch(r"[a-z][a-z0-9-]{0,31}", purpose) or purpose == "root":
            raise item_where.key("purpose").error(
                purpose,
                "is not a disk purpose",
                'lower-case letters, digits and "-", such as "cinder-volumes" or "swift" '
                '("root" is the root disk\'s)',
            )
        size = parse_bounded_size(disk["size"], item_where.key("size"), MIN_EXTRA_DISK, MAX_DISK)
        disks.append(DiskSpec(size, purpose))
    return tuple(disks)


def default_purpose(role: Role, index: int) -> str:
    defaults = guide.EXTRA_DISKS.get(role, ())
    return defaults[index][1] if index < len(defaults) else f"data{index + 1}"
