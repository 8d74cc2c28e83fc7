"""Read an install recipe folder into a ``Recipe``, with errors naming the file and the key.

Layout of ``recipes/<name>/``::

    recipe.toml           name, description, guide, [secrets], [settings], [roles.<role>]
    images/*.sh           a role's build_script: run in its image's tree when it is built
    stages/NN-<name>.toml one guide chapter each, run in file-name order
    templates/*.j2        jinja2 templates the stages' files name

Helpers several recipes share (``recipes/helpers/*.j2``, e.g. ``lb-ini.py.j2``) are templates
of every recipe too, named ``helpers/<file>``: a recipe's own template extends or includes them
(or a stage names them), and the recipe's digest covers them.

A stage file::

    name = "identity"
    title = "Identity service (keystone)"
    guide = "Ch.3, L1008-1361"
    # networking = "neutron"      only for labs with that variant
    # optional = true             run only when selected
    # requires_roles = ["block"]  skipped unless the lab has such nodes

    [[steps]]
    name = "database"
    title = "Create the keystone database"
    roles = ["controller"]        # or ["all"]
    guide = "L1030-1045"
    guard = "mysql -e 'use keystone'"          # exit 0: already done, skip
    run = '''mysql -e "CREATE DATABASE keystone" '''
    files = [{ path = "/etc/keystone/keystone.conf", template = "keystone.conf.j2",
               mode = "0640", owner = "keystone:keystone" }]
    fetch = [{ path = "/etc/swift/account.ring.gz", from = "controller" }]  # copied first
    after = ["other-step"]        # wait until that step is done on every node
    internet = false              # true: skipped unless the lab sets internet = true
    api = [{ kind = "project", name = "demo" }]   # the same objects for the fast path

    [[steps.checks]]
    name = "keystone answers"
    run = "curl -s http://controller:5000/v3"
    expect = "stable"             # regex on stdout
    timeout = 120                 # keep retrying for this long
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from labbuilder.common.errors import RecipeError
from labbuilder.common.resources import data_dir
from labbuilder.common.tomlread import (
    Where,
    check_keys,
    expect,
    parse_bool,
    parse_int,
    parse_size_value,
    parse_str,
    parse_str_list,
    parse_table,
)
from labbuilder.recipe.model import (
    ALL_ROLES,
    CheckSpec,
    FetchSpec,
    FileSpec,
    Recipe,
    RoleImage,
    StagePackages,
    StageSpec,
    StepSpec,
)

RECIPE_KEYS = ("name", "description", "guide", "secrets", "settings", "roles")
ROLE_KEYS = (
    "packages",
    "masked_units",
    "min_vcpus",
    "min_memory",
    "min_disk",
    "memory_note",
    "stages",
    "build_script",
    "shares_image_with",
)
STAGE_PACKAGE_KEYS = ("packages", "masked_units")
HELPERS = "helpers"  # recipes/helpers/: templates the recipes share
_SCRIPT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\.sh")
STAGE_KEYS = ("name", "title", "guide", "networking", "optional", "requires_roles", "steps")
STEP_KEYS = (
    "name",
    "title",
    "roles",
    "guide",
    "run",
    "files",
    "fetch",
    "guard",
    "checks",
    "after",
    "internet",
    "api",
    "timeout",
    "retries",
    "note",
)
FILE_KEYS = ("path", "template", "content", "mode", "owner")
FETCH_KEYS = ("path", "from", "mode", "owner")
CHECK_KEYS = ("name", "run", "expect", "timeout", "guide", "fast_run")
ROLES = ("controller", "network", "compute", "block", "object")
API_KINDS = (
    "domain",
    "project",
    "user",
    "role",
    "role_assignment",
    "service",
    "endpoint",
    "image",
    "flavor",
    "network",
    "subnet",
    "router",
    "security_group_rule",
    "keypair",
    "server",
    "floating_ip",
    "volume",
    "volume_attachment",
    "object",
    "stack",
)
_STEP_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")
_STAGE_FILE = re.compile(r"^(\d+)-([a-z0-9][a-z0-9-]*)\.toml$")
_MODE = re.compile(r"^0[0-7]{3}$")


def recipe_names(base: Traversable | None = None) -> tuple[str, ...]:
    """The built-in recipes (folders with a recipe.toml)."""
    folder = base or data_dir("recipes")
    return tuple(
        sorted(
            entry.name
            for entry in folder.iterdir()
            if entry.is_dir() and (entry / "recipe.toml").is_file()
        )
    )


def load_recipe(name_or_path: str, *, base: Traversable | None = None) -> Recipe:
    """A built-in recipe by name, or a recipe folder by path."""
    path = Path(name_or_path)
    if "/" in name_or_path or path.is_dir():
        if not (path / "recipe.toml").is_file():
            raise RecipeError(
                f"{name_or_path} is not a recipe folder (it has no recipe.toml)",
                "give a built-in recipe's name or a folder with recipe.toml and stages/",
            )
        return read_recipe(path)
    folder = base or data_dir("recipes")
    entry = folder / name_or_path
    if not (entry / "recipe.toml").is_file():
        known = ", ".join(recipe_names(folder)) or "none"
        raise RecipeError(
            f"there is no recipe named {name_or_path!r}",
            f"built-in recipes: {known}; or give the path of a recipe folder",
        )
    return read_recipe(entry)


def shared_helpers() -> tuple[tuple[str, str], ...]:
    """(``helpers/<file>``, text) of the templates the built-in recipes share."""
    folder = data_dir("recipes") / HELPERS
    if not folder.is_dir():
        raise RecipeError(
            f"labbuilder's shared recipe helpers {folder} are missing", "reinstall labbuilder"
        )
    return tuple(
        (f"{HELPERS}/{entry.name}", entry.read_text())
        for entry in sorted(folder.iterdir(), key=lambda item: item.name)
        if entry.is_file() and entry.name.endswith(".j2")
    )


def read_recipe(folder: Traversable) -> Recipe:
    digest = hashlib.sha256()
    top_source = f"{folder}/recipe.toml"
    top_text = (folder / "recipe.toml").read_text()
    digest.update(b"recipe.toml\0" + top_text.encode())
    top = _parse_toml(top_text, top_source)
    where = Where(top_source, error_class=RecipeError)
    check_keys(top, RECIPE_KEYS, where)
    for key in ("name", "description", "guide"):
        if key not in top:
            raise where.problem(f"the key {key!r} is missing")

    templates: list[tuple[str, str]] = []
    template_dir = folder / "templates"
    if template_dir.is_dir():
        for entry in sorted(template_dir.iterdir(), key=lambda item: item.name):
            if entry.is_file():
                text = entry.read_text()
                templates.append((entry.name, text))
                digest.update(f"templates/{entry.name}\0".encode() + text.encode())

    for name, text in shared_helpers():
        templates.append((name, text))
        digest.update(f"{name}\0".encode() + text.encode())

    stages: list[StageSpec] = []
    stage_dir = folder / "stages"
    if not stage_dir.is_dir():
        raise RecipeError(f"{folder} has no stages/ folder", "add stages/NN-<name>.toml files")
    numbers: dict[int, str] = {}
    for entry in sorted(stage_dir.iterdir(), key=lambda item: item.name):
        if not entry.name.endswith(".toml"):
            continue
        match = _STAGE_FILE.match(entry.name)
        source = f"{stage_dir}/{entry.name}"
        if match is None:
            raise RecipeError(
                f"{source}: a stage file is named NN-<name>.toml",
                "rename it, e.g. 20-identity.toml",
            )
        number = int(match.group(1))
        if number in numbers:
            raise RecipeError(f"{source}: stage number {number} is also used by {numbers[number]}")
        numbers[number] = entry.name
        text = entry.read_text()
        digest.update(f"stages/{entry.name}\0".encode() + text.encode())
        stage = _parse_stage(_parse_toml(text, source), source, match.group(2))
        stages.append(stage)

    names = [stage.name for stage in stages]
    for name in names:
        if names.count(name) > 1:
            raise RecipeError(f"{folder}: two stages are named {name!r}")
    if not stages:
        raise RecipeError(f"{folder}/stages has no stage files")
    known_templates = {name for name, _ in templates}
    for stage in stages:
        for step in stage.steps:
            for spec in step.files:
                if spec.template is not None and spec.template not in known_templates:
                    raise RecipeError(
                        f"{stage.source}: step {step.name!r} names the template "
                        f"{spec.template!r}, which is not in {template_dir}"
                    )

    roles = _parse_roles(top.get("roles", {}), where.key("roles"), folder / "images")
    for _, image in roles:
        if image.build_script is not None:
            name, text = image.build_script
            digest.update(f"images/{name}\0".encode() + text.encode())
    _check_stage_packages(roles, stages, where.key("roles"))
    return Recipe(
        name=parse_str(top["name"], where.key("name")),
        description=parse_str(top["description"], where.key("description")),
        guide=parse_str(top["guide"], where.key("guide")),
        directory=str(folder),
        secrets=_parse_secrets(top.get("secrets", {}), where.key("secrets")),
        settings=tuple(sorted(parse_table(top.get("settings", {}), where.key("settings")).items())),
        roles=roles,
        stages=tuple(stages),
        templates=tuple(templates),
        digest=digest.hexdigest(),
    )


def _parse_toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise RecipeError(f"{source}: not valid TOML: {err}") from None


def _parse_secrets(value: object, where: Where) -> tuple[tuple[str, str], ...]:
    table = parse_table(value, where)
    secrets = []
    for name, text in table.items():
        if not re.fullmatch(r"[A-Z][A-Z0-9_]*", name):
            raise where.key(name).problem(
                f"secret {name!r} is not an upper-case name such as KEYSTONE_DBPASS"
            )
        secrets.append((name, parse_str(text, where.key(name))))
    return tuple(secrets)


def _parse_roles(
    value: object, where: Where, scripts: Traversable
) -> tuple[tuple[str, RoleImage], ...]:
    roles = []
    for role, raw in parse_table(value, where).items():
        at = where.key(role)
        if role not in ROLES:
            raise at.problem(f"unknown role {role!r}", f"roles: {', '.join(ROLES)}")
        table = parse_table(raw, at)
        check_keys(table, ROLE_KEYS, at)
        memory, disk, vcpus = (table.get(f"min_{key}") for key in ("memory", "disk", "vcpus"))
        packages, masked_units = _image_content(table, at)
        roles.append(
            (
                role,
                RoleImage(
                    packages=packages,
                    masked_units=masked_units,
                    min_vcpus=None
                    if vcpus is None
                    else parse_int(vcpus, at.key("min_vcpus"), minimum=1, maximum=64),
                    min_memory=None
                    if memory is None
                    else parse_size_value(memory, at.key("min_memory")),
                    min_disk=None if disk is None else parse_size_value(disk, at.key("min_disk")),
                    memory_note=parse_str(table.get("memory_note", ""), at.key("memory_note")),
                    stages=_parse_stage_packages(table.get("stages", {}), at.key("stages")),
                    build_script=None
                    if "build_script" not in table
                    else _build_script(table["build_script"], at.key("build_script"), scripts),
                    shares_image_with=None
                    if "shares_image_with" not in table
                    else parse_str(table["shares_image_with"], at.key("shares_image_with")),
                ),
            )
        )
    _check_shared_images(dict(roles), where)
    return tuple(roles)


def _check_shared_images(roles: dict[str, RoleImage], where: Where) -> None:
    """A role shares its image with another role of the recipe, which shares with no third
    one; of the two, at most one has a build script."""
    for role, image in roles.items():
        partner = image.shares_image_with
        if partner is None:
            continue
        at = where.key(role).key("shares_image_with")
        if partner == role or partner not in roles:
            others = ", ".join(name for name in roles if name != role)
            raise at.error(partner, f"is not another role of this recipe ({others})")
        if roles[partner].shares_image_with is not None:
            raise at.error(partner, "shares its own image already: name the role it shares with")
        taken = [name for name, other in roles.items() if other.shares_image_with == partner]
        if len(taken) > 1:
            raise at.error(partner, f"is shared by {' and '.join(taken)}: one role only")
        if image.build_script is not None and roles[partner].build_script is not None:
            raise at.error(partner, "has a build script too: a shared image runs one")


def _build_script(value: object, where: Where, scripts: Traversable) -> tuple[str, str]:
    """A role's ``build_script``: the name of a shell script in the recipe's ``images/``
    folder, and its text."""
    name = parse_str(value, where)
    if not _SCRIPT_NAME.fullmatch(name):
        raise where.error(name, "is not a file name such as controller.sh (in images/)")
    entry = scripts / name
    if not entry.is_file():
        raise where.error(name, f"is not a file in {scripts}")
    return name, entry.read_text()


def _parse_stage_packages(value: object, where: Where) -> tuple[tuple[str, StagePackages], ...]:
    stages = []
    for stage, raw in parse_table(value, where).items():
        at = where.key(stage)
        table = parse_table(raw, at)
        check_keys(table, STAGE_PACKAGE_KEYS, at)
        stages.append((stage, StagePackages(*_image_content(table, at))))
    return tuple(stages)


def _image_content(table: dict[str, Any], where: Where) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A role's (or an optional stage's) ``packages`` and ``masked_units``."""
    return (
        parse_str_list(table.get("packages", []), where.key("packages")),
        parse_str_list(table.get("masked_units", []), where.key("masked_units")),
    )


def _check_stage_packages(
    roles: tuple[tuple[str, RoleImage], ...], stages: list[StageSpec], where: Where
) -> None:
    """A role's ``[roles.<role>.stages.<stage>]`` names an optional stage of the recipe: the
    other stages always run, so their packages are the role's own."""
    optional = [stage.name for stage in stages if stage.optional]
    for role, image in roles:
        for name, _ in image.stages:
            if name not in optional:
                at = where.key(role).key("stages").key(name)
                raise at.problem(
                    f"{at.path}: {name!r} is not an optional stage of the recipe",
                    f"optional stages: {', '.join(optional) or 'none'}; packages every lab "
                    "needs go in the role's own packages",
                )


def _parse_stage(data: dict[str, Any], source: str, file_name: str) -> StageSpec:
    where = Where(source, error_class=RecipeError)
    check_keys(data, STAGE_KEYS, where)
    name = parse_str(data.get("name", file_name), where.key("name"))
    if name != file_name:
        raise where.key("name").error(name, f"differs from the file's name ({file_name})")
    networking = data.get("networking")
    if networking is not None and networking not in ("neutron", "legacy"):
        raise where.key("networking").error(networking, "is not neutron or legacy")
    raw_steps = expect(
        data.get("steps", []), list, "a list of [[steps]] tables", where.key("steps")
    )
    steps = tuple(_parse_step(raw, where.key("steps").item(i)) for i, raw in enumerate(raw_steps))
    seen: set[str] = set()
    for i, step in enumerate(steps):
        if step.name in seen:
            raise where.key("steps").item(i).problem(f"a second step is named {step.name!r}")
        for other in step.after:
            if other not in seen:
                raise (
                    where.key("steps")
                    .item(i)
                    .key("after")
                    .problem(
                        f"step {step.name!r} waits for {other!r}, which is not an earlier step "
                        "of this stage"
                    )
                )
        seen.add(step.name)
    requires = parse_str_list(data.get("requires_roles", []), where.key("requires_roles"))
    for role in requires:
        if role not in ROLES:
            raise where.key("requires_roles").error(role, f"is not one of {', '.join(ROLES)}")
    return StageSpec(
        name=name,
        title=parse_str(data.get("title", name), where.key("title")),
        guide=parse_str(data.get("guide", ""), where.key("guide")),
        steps=steps,
        source=source,
        networking=networking,
        optional=parse_bool(data.get("optional", False), where.key("optional")),
        requires_roles=requires,
    )


def _parse_step(raw: object, where: Where) -> StepSpec:
    data = parse_table(raw, where)
    check_keys(data, STEP_KEYS, where)
    if "name" not in data:
        raise where.problem("a step needs a name")
    name = parse_str(data["name"], where.key("name"))
    if not _STEP_NAME.match(name):
        raise where.key("name").error(name, "is not a step name (lower case, digits and '-')")
    roles = parse_str_list(data.get("roles", [ALL_ROLES]), where.key("roles"))
    for role in roles:
        if role != ALL_ROLES and role not in ROLES:
            raise where.key("roles").error(role, f"is not {ALL_ROLES} or one of {', '.join(ROLES)}")
    run = parse_str(data.get("run", ""), where.key("run"))
    files = tuple(
        _parse_file(item, where.key("files").item(i))
        for i, item in enumerate(expect(data.get("files", []), list, "a list", where.key("files")))
    )
    fetch = tuple(
        _parse_fetch(item, where.key("fetch").item(i))
        for i, item in enumerate(expect(data.get("fetch", []), list, "a list", where.key("fetch")))
    )
    api_items = expect(data.get("api", []), list, "a list of tables", where.key("api"))
    api = []
    for i, item in enumerate(api_items):
        table = parse_table(item, where.key("api").item(i))
        if table.get("kind") not in API_KINDS:
            raise (
                where.key("api")
                .item(i)
                .key("kind")
                .error(table.get("kind", ""), f"is not one of {', '.join(API_KINDS)}")
            )
        api.append(table)
    if not run and not files and not api:
        raise where.problem(f"step {name!r} has nothing to do (no run, files or api)")
    checks = tuple(
        _parse_check(item, where.key("checks").item(i))
        for i, item in enumerate(
            expect(data.get("checks", []), list, "a list", where.key("checks"))
        )
    )
    guard = data.get("guard")
    return StepSpec(
        name=name,
        title=parse_str(data.get("title", name), where.key("title")),
        roles=roles,
        guide=parse_str(data.get("guide", ""), where.key("guide")),
        run=run,
        files=files,
        fetch=fetch,
        guard=None if guard is None else parse_str(guard, where.key("guard")),
        checks=checks,
        after=parse_str_list(data.get("after", []), where.key("after")),
        internet=parse_bool(data.get("internet", False), where.key("internet")),
        api=tuple(api),
        timeout=float(parse_int(data.get("timeout", 1800), where.key("timeout"), minimum=1)),
        retries=parse_int(data.get("retries", 2), where.key("retries"), minimum=0),
        note=parse_str(data.get("note", ""), where.key("note")),
    )


def _parse_file(raw: object, where: Where) -> FileSpec:
    data = parse_table(raw, where)
    check_keys(data, FILE_KEYS, where)
    path = parse_str(data.get("path", ""), where.key("path"))
    if not path.startswith("/"):
        raise where.key("path").error(path, "is not an absolute path")
    template, content = data.get("template"), data.get("content")
    if (template is None) == (content is None):
        raise where.problem("a file needs either a template or content (not both)")
    mode = parse_str(data.get("mode", "0644"), where.key("mode"))
    if not _MODE.match(mode):
        raise where.key("mode").error(mode, 'is not an octal mode such as "0640"')
    owner = parse_str(data.get("owner", "root:root"), where.key("owner"))
    if not re.fullmatch(r"[a-z_][a-z0-9_-]*:[a-z_][a-z0-9_-]*", owner):
        raise where.key("owner").error(owner, 'is not "user:group"')
    return FileSpec(
        path=path,
        template=None if template is None else parse_str(template, where.key("template")),
        content=None if content is None else parse_str(content, where.key("content")),
        mode=mode,
        owner=owner,
    )


def _parse_fetch(raw: object, where: Where) -> FetchSpec:
    data = parse_table(raw, where)
    check_keys(data, FETCH_KEYS, where)
    path = parse_str(data.get("path", ""), where.key("path"))
    if not path.startswith("/"):
        raise where.key("path").error(path, "is not an absolute path")
    source = parse_str(data.get("from", ""), where.key("from"))
    if source not in ROLES:
        raise where.key("from").error(source, f"is not one of {', '.join(ROLES)}")
    mode = parse_str(data.get("mode", "0644"), where.key("mode"))
    if not _MODE.match(mode):
        raise where.key("mode").error(mode, 'is not an octal mode such as "0640"')
    owner = parse_str(data.get("owner", "root:root"), where.key("owner"))
    return FetchSpec(path=path, source_role=source, mode=mode, owner=owner)


def _parse_check(raw: object, where: Where) -> CheckSpec:
    data = parse_table(raw, where)
    check_keys(data, CHECK_KEYS, where)
    if "run" not in data:
        raise where.problem("a check needs a run command")
    expect_text = data.get("expect")
    if expect_text is not None:
        try:
            re.compile(parse_str(expect_text, where.key("expect")))
        except re.error as err:
            raise where.key("expect").error(
                expect_text, f"is not a regular expression: {err}"
            ) from None
    fast = data.get("fast_run")
    return CheckSpec(
        name=parse_str(data.get("name", data["run"]), where.key("name")),
        run=parse_str(data["run"], where.key("run")),
        expect=expect_text,
        timeout=float(parse_int(data.get("timeout", 0), where.key("timeout"), minimum=0)),
        guide=parse_str(data.get("guide", ""), where.key("guide")),
        fast_run=None if fast is None else parse_str(fast, where.key("fast_run")),
    )
