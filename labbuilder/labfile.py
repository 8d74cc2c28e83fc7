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

from labbuilder import guide
from labbuilder.errors import LabFileError
from labbuilder.labcheck import check_lab
from labbuilder.model import (
    DiskSpec,
    Egress,
    Lab,
    Networking,
    NetworkKind,
    NetworkSpec,
    NicRole,
    NodeSpec,
    Options,
    Role,
)
from labbuilder.resources import data_dir
from labbuilder.sizes import format_size
from labbuilder.tomlread import (
    Where,
    check_keys,
    expect,
    parse_bool,
    parse_enum,
    parse_int,
    parse_name,
    parse_range,
    parse_size_value,
    parse_str,
    parse_str_list,
    parse_table,
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
)
NETWORK_KEYS = ("role", "kind", "cidr", "gateway", "dhcp_range", "floating_range")
NODE_KEYS = ("role", "count", "vcpus", "memory", "disk", "extra_disks", "nics", "addresses", "macs")
DISK_KEYS = ("size", "purpose")


# --- entry points ---------------------------------------------------------------------------


def load_lab_file(path: Path, *, force: bool = False) -> Lab:
    """Read and validate a lab file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise LabFileError(f"{path}: cannot read the lab file: {err}") from None
    return parse_lab(text, source=str(path), force=force)


def builtin_lab_names() -> list[str]:
    return sorted(
        entry.name.removesuffix(".toml")
        for entry in data_dir("labs").iterdir()
        if entry.name.endswith(".toml")
    )


def load_builtin_lab(name: str, *, force: bool = False) -> Lab:
    entry = data_dir("labs") / f"{name}.toml"
    if not entry.is_file():
        names = builtin_lab_names()
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean {close[0]!r}?" if close else "`labbuilder labs` lists them"
        raise LabFileError(
            f"there is no built-in lab {name!r}; built-in labs: {', '.join(names)}", hint
        )
    return parse_lab(entry.read_text(encoding="utf-8"), source=f"built-in lab {name}", force=force)


def parse_lab(text: str, *, source: str, force: bool = False) -> Lab:
    """Parse a lab file's text. ``force`` turns sizes below the guide's minimums into warnings."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise LabFileError(f"{source}: not valid TOML: {err}") from None
    return lab_from_data(data, source=source, force=force)


def lab_from_data(data: dict[str, Any], *, source: str, force: bool = False) -> Lab:
    """Build a Lab from a lab file's parsed TOML (a dict as ``tomllib`` returns it)."""
    where = Where(source)
    check_keys(data, TOP_KEYS + TABLE_KEYS, where)

    name = parse_name(data.get("name"), where.key("name"), max_length=40)
    networking = parse_enum(data.get("networking", "neutron"), Networking, where.key("networking"))
    networks = parse_networks(data.get("networks", {}), networking, where.key("networks"))
    warnings: list[str] = []
    nodes = parse_nodes(data.get("nodes", {}), networking, where.key("nodes"), force, warnings)
    lab = Lab(
        name=name,
        description=parse_str(data.get("description", ""), where.key("description")),
        source=source,
        networking=networking,
        image=parse_str(data.get("image", guide.DEFAULT_IMAGE), where.key("image")),
        recipe=parse_str(data.get("recipe", guide.DEFAULT_RECIPE), where.key("recipe")),
        libvirt_uri=parse_str(
            data.get("libvirt_uri", guide.DEFAULT_LIBVIRT_URI), where.key("libvirt_uri")
        ),
        networks=networks,
        nodes=nodes,
        options=parse_options(data.get("options", {}), where.key("options")),
    )
    check_lab(lab)
    return replace(lab, warnings=tuple(warnings))


# --- sections -------------------------------------------------------------------------------


def parse_options(value: object, where: Where) -> Options:
    table = parse_table(value, where)
    check_keys(table, OPTION_KEYS, where)
    proxy = table.get("apt_proxy")
    mirror = table.get("apt_mirror")
    return Options(
        ntp_servers=parse_str_list(table.get("ntp_servers", []), where.key("ntp_servers")),
        apt_proxy=parse_str(proxy, where.key("apt_proxy")) if proxy is not None else None,
        apt_mirror=parse_str(mirror, where.key("apt_mirror")) if mirror is not None else None,
        internet=parse_bool(table.get("internet", False), where.key("internet")),
        egress=parse_enum(table.get("egress", "nat"), Egress, where.key("egress")),
        egress_allow=parse_str_list(table.get("egress_allow", []), where.key("egress_allow")),
        role_images=parse_bool(table.get("role_images", True), where.key("role_images")),
        optional_stages=parse_stage_names(table.get("stages", []), where.key("stages")),
    )


def parse_stage_names(value: object, where: Where) -> tuple[str, ...]:
    """``options.stages``: names of the recipe's optional stages the lab runs."""
    names = parse_str_list(value, where)
    for i, name in enumerate(names):
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", name):
            raise where.item(i).error(name, "is not a stage name (lower case, digits and '-')")
    return names


def parse_networks(value: object, networking: Networking, where: Where) -> tuple[NetworkSpec, ...]:
    """The guide's networks for ``networking``, with the lab file's tables laid over them."""
    tables = parse_table(value, where)
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
                name=parse_name(name, place),
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
        count = parse_int(table["count"], place.key("count"), minimum=0)
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
    parse_name(name, where)
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
    vcpus = parse_int(table.get("vcpus", size.vcpus), where.key("vcpus"), minimum=1)
    memory = parse_size_value(table.get("memory", format_size(size.memory)), where.key("memory"))
    disk = parse_size_value(table.get("disk", format_size(size.disk)), where.key("disk"))
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
                problem.hint = "give it at least the guide's minimum, or pass --force"
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
    )


def parse_nics(value: object, where: Where) -> tuple[NicRole, ...]:
    items = expect(value, list, "a list of network roles", where)
    return tuple(parse_enum(item, NicRole, where.item(i)) for i, item in enumerate(items))


def parse_nic_map(value: object, where: Where) -> tuple[tuple[NicRole, str], ...]:
    table = parse_table(value, where)
    return tuple(
        (parse_enum(key, NicRole, where.key(key)), parse_str(item, where.key(key)))
        for key, item in table.items()
    )


def parse_extra_disks(table: Mapping[str, Any], role: Role, where: Where) -> tuple[DiskSpec, ...]:
    if "extra_disks" not in table:
        return tuple(DiskSpec(size, purpose) for size, purpose in guide.EXTRA_DISKS.get(role, ()))
    place = where.key("extra_disks")
    disks: list[DiskSpec] = []
    for i, item in enumerate(expect(table["extra_disks"], list, "a list of disks", place)):
        item_where = place.item(i)
        if isinstance(item, str):
            disks.append(DiskSpec(parse_size_value(item, item_where), default_purpose(role, i)))
            continue
        disk = parse_table(item, item_where)
        check_keys(disk, DISK_KEYS, item_where)
        if "size" not in disk:
            raise LabFileError(
                f"{item_where.source}: {item_where.path} needs a size", 'size = "10 GB"'
            )
        purpose = disk.get("purpose", default_purpose(role, i))
        disks.append(
            DiskSpec(
                parse_size_value(disk["size"], item_where.key("size")),
                parse_str(purpose, item_where.key("purpose")),
            )
        )
    return tuple(disks)


def default_purpose(role: Role, index: int) -> str:
    defaults = guide.EXTRA_DISKS.get(role, ())
    return defaults[index][1] if index < len(defaults) else f"data{index + 1}"
