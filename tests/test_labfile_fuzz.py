"""Property-based tests: whatever a lab file holds, the result is a Lab or a LabFileError
with a message naming the file — never a traceback. Plans of the labs that parse are PlanErrors
or plans, never crashes."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from labbuilder.common.errors import LabFileError, PlanError
from labbuilder.lab.check import check_lab_recipe
from labbuilder.lab.files import (
    NETWORK_KEYS,
    NODE_KEYS,
    OPTION_KEYS,
    TOP_KEYS,
    lab_from_data,
    parse_lab,
)
from labbuilder.lab.planner import plan
from labbuilder.model.lab import HostFacts, HostRoute
from labbuilder.recipe.files import load_recipe, recipe_names

RECIPES = {name: load_recipe(name) for name in recipe_names()}

SOURCE = "fuzz.toml"

scalars = st.one_of(
    st.text(max_size=20),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.booleans(),
    st.floats(allow_nan=True),
    st.none(),
)
plausible = st.sampled_from(
    [
        "10.0.0.0/24", "10.0.0.5/24", "10.0.1.0/24", "203.0.113.0/24", "0.0.0.0/0", "10.0.0.0/31",
        "10.0.0.1", "10.0.0.11", "10.0.0.255", "300.1.1.1", "::1", "fe80::/64", "",
        "2 GB", "512 MB", "1 GiB", "0 GB", "1.5 GB", "10 TB", "-1 GB", "2", "lots",
        "neutron", "legacy", "nat", "isolated", "external", "management", "tunnel",
        "controller", "network", "compute", "block", "object", "allow", "none",
        "203.0.113.101-203.0.113.200", "10.0.0.2-10.0.0.100", "a-b", "-",
        "52:54:00:00:00:01", "01:00:00:00:00:00", "qemu:///system", "http://10.0.0.1:3142",
        "fe:00:00:00:00:01", "qemu+ext:///system?command=/bin/sh", "http://p\n;x", "/etc/shadow",
        "127.0.0.0/24", "224.0.0.0/24", "dashboard", "nope", "zed-debian-12", "a\u0000b",
    ]
)  # fmt: skip
values = st.recursive(
    st.one_of(scalars, plausible),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(plausible, st.text(max_size=8)), inner, max_size=4),
    ),
    max_leaves=12,
)


def mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Valid-looking values three times in four, so that the deep rules are reached too."""
    return st.integers(0, 3).flatmap(lambda pick: bad if pick == 0 else good)


field = mostly(plausible, values)


def table_of(keys: tuple[str, ...]) -> st.SearchStrategy[dict[str, Any]]:
    key = mostly(st.sampled_from(keys), st.text(max_size=6))
    return st.dictionaries(key, field, max_size=6)


lab_data = st.fixed_dictionaries(
    {"name": mostly(st.just("fuzz"), values)},
    optional={
        **{key: field for key in TOP_KEYS if key not in ("name", "networking")},
        "networking": mostly(st.sampled_from(["neutron", "legacy"]), values),
        "options": mostly(table_of(OPTION_KEYS), values),
        "networks": mostly(
            st.dictionaries(
                st.sampled_from(["management", "tunnel", "external", "other", "X"]),
                mostly(table_of(NETWORK_KEYS), values),
                max_size=4,
            ),
            values,
        ),
        "nodes": mostly(
            st.dictionaries(
                st.sampled_from(
                    ["controller", "network", "compute", "compute1", "compute2", "block1",
                     "object", "db", "Bad_Name"]
                ),
                mostly(table_of(NODE_KEYS), values),
                max_size=5,
            ),
            values,
        ),
    },
)  # fmt: skip

HOST = HostFacts(
    routes=(HostRoute("0.0.0.0/0", "eth0"), HostRoute("10.0.0.0/24", "eth1")),
    protected_addresses=(("the apt source", "203.0.113.80"),),
    cpus=2,
    memory_available=8 * 2**30,
    disk_free=40 * 2**30,
)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lab_data, st.booleans(), st.booleans())
def test_any_lab_data_is_a_lab_or_a_lab_file_error(
    data: dict[str, Any], force: bool, auto: bool
) -> None:
    try:
        lab = lab_from_data(data, source=SOURCE, force=force)
    except LabFileError as err:
        assert err.message.startswith(f"{SOURCE}: ")
        assert err.message.strip()
        return
    try:
        check_lab_recipe(lab, RECIPES[lab.recipe])
    except LabFileError as err:
        assert err.message.startswith(f"{SOURCE}: ") and err.hint
    try:
        plan(lab, HOST, auto_subnets=auto)
    except PlanError as err:
        assert err.message.strip()


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_any_text_is_a_lab_or_a_lab_file_error(text: str) -> None:
    try:
        parse_lab(text, source=SOURCE)
    except LabFileError as err:
        assert err.message.startswith(f"{SOURCE}: ")


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["guide-3node", "guide-2node-legacy", "guide-full"]), st.data())
def test_mutating_one_line_of_a_builtin_lab_never_crashes(name: str, data: st.DataObject) -> None:
    from labbuilder.common.resources import data_dir

    lines = (data_dir("labs") / f"{name}.toml").read_text().splitlines()
    index = data.draw(st.integers(0, len(lines) - 1))
    replacement = data.draw(st.one_of(st.text(max_size=30), plausible.map(lambda v: f'x = "{v}"')))
    lines[index] = replacement
    try:
        parse_lab("\n".join(lines), source=SOURCE)
    except LabFileError as err:
        assert err.message.startswith(f"{SOURCE}: ")
