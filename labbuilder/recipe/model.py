"""The install-recipe model: what a recipe folder says, and what rendering it for a lab gives.

A recipe is data (``recipes/<name>/``): ``recipe.toml`` (secrets, role images, settings) and one
TOML file per stage under ``stages/`` (a guide chapter: steps per node role, each with its files,
commands, guard and checks), plus jinja2 templates under ``templates/``. ``labbuilder.recipe.files``
reads it into a ``Recipe``; ``labbuilder.recipe.render`` renders it for one lab into
``RenderedStep``s; ``labbuilder.install.engine`` runs those. Frozen dataclasses, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

ALL_ROLES = "all"


class ApiPath(StrEnum):
    """How a stage's API objects (projects, users, endpoints, images) are made."""

    FAST = "fast"  # one in-guest process per group of API steps (openstacksdk)
    FAITHFUL = "faithful"  # the guide's own commands, one CLI call each


@dataclass(frozen=True)
class FileSpec:
    """A file a step writes before its commands run: a jinja2 template or inline text."""

    path: str  # absolute path in the guest
    template: str | None  # a file under the recipe's templates/ folder
    content: str | None  # inline jinja2 text (when no template)
    mode: str = "0644"
    owner: str = "root:root"


@dataclass(frozen=True)
class FetchSpec:
    """A file copied from another node before a step runs (swift's rings, say)."""

    path: str  # the same path on both nodes
    source_role: str  # taken from the first node of this role
    mode: str = "0644"
    owner: str = "root:root"


@dataclass(frozen=True)
class CheckSpec:
    """A verification after a step: a command whose output must match, retried until a timeout."""

    name: str
    run: str  # shell, rendered with jinja2
    expect: str | None = None  # a regex that must match the command's stdout; None: exit 0 only
    timeout: float = 0.0  # seconds to keep retrying; 0: a single try
    guide: str = ""
    fast_run: str | None = None  # what the fast path runs instead (for API checks)


@dataclass(frozen=True)
class StepSpec:
    """One guide step on the nodes of some roles: files, commands, guard, checks."""

    name: str
    title: str
    roles: tuple[str, ...]  # node roles, or ("all",)
    guide: str  # the guide section/lines it implements, e.g. "L1030-1045"
    run: str = ""  # shell (bash), rendered with jinja2; the faithful commands
    files: tuple[FileSpec, ...] = ()
    fetch: tuple[FetchSpec, ...] = ()  # files copied from another node first
    guard: str | None = None  # shell; exit 0 means "already done" and the step is skipped
    checks: tuple[CheckSpec, ...] = ()
    after: tuple[str, ...] = ()  # steps of the same stage that must be done on every node first
    internet: bool = False  # contacts the internet: skipped unless the lab enables it
    api: tuple[dict[str, Any], ...] = ()  # the same objects as data, for the fast path
    timeout: float = 1800.0
    retries: int = 2  # extra tries after a transient failure (apt lock, mirror 5xx)
    note: str = ""  # why the step deviates from the guide, if it does


@dataclass(frozen=True)
class StageSpec:
    """A guide chapter: an ordered list of steps."""

    name: str
    title: str
    guide: str
    steps: tuple[StepSpec, ...]
    source: str  # the stage file, for error messages
    networking: str | None = None  # "neutron" or "legacy": only for labs with that variant
    optional: bool = False  # run only when the lab selects it (or --only/--from names it)
    requires_roles: tuple[str, ...] = ()  # skipped unless the lab has nodes of these roles


@dataclass(frozen=True)
class StagePackages:
    """What an optional stage adds to a role's image, for labs that select the stage."""

    packages: tuple[str, ...] = ()
    masked_units: tuple[str, ...] = ()


@dataclass(frozen=True)
class RoleImage:
    """What a role's image carries pre-installed, and what is masked until configured.

    ``packages`` and ``masked_units`` are the role's own (the core path's); ``stages`` adds, per
    optional stage, what only that stage needs: a lab's image carries the stages it selects."""

    packages: tuple[str, ...] = ()
    masked_units: tuple[str, ...] = ()
    stages: tuple[tuple[str, StagePackages], ...] = ()
    # What a node of the role needs to run the recipe (None: the guide's minimum will do).
    min_vcpus: int | None = None
    min_memory: int | None = None  # bytes
    min_disk: int | None = None  # bytes, the root disk
    memory_note: str = ""
    # A shell script of the recipe's images/ folder, run in the image's tree at build time,
    # natively (work that does not depend on the lab: database schemas); (file name, text).
    build_script: tuple[str, str] | None = field(default=None, repr=False)
    # Another role whose nodes boot the same image (it then carries both roles' packages, each
    # role's services masked until its own steps configure them): one image build fewer.
    shares_image_with: str | None = None

    def stage_packages(self, stage: str) -> StagePackages:
        return dict(self.stages).get(stage, StagePackages())

    def with_stages(self, selected: Iterable[str]) -> RoleImage:
        """The role's image for a lab that selects the optional stages ``selected``: the role's
        own packages and masked units, then each selected stage's (in the recipe's order)."""
        wanted = set(selected)
        packages, masked = list(self.packages), list(self.masked_units)
        for name, extra in self.stages:
            if name in wanted:
                packages += [item for item in extra.packages if item not in packages]
                masked += [item for item in extra.masked_units if item not in masked]
        return replace(self, packages=tuple(packages), masked_units=tuple(masked), stages=())


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    guide: str  # which guide it follows
    directory: str
    secrets: tuple[tuple[str, str], ...]  # (name, what it is for), the guide's password table
    settings: tuple[tuple[str, Any], ...]  # defaults of recipe variables
    roles: tuple[tuple[str, RoleImage], ...]
    stages: tuple[StageSpec, ...]
    templates: tuple[tuple[str, str], ...] = field(repr=False, default=())  # (name, text)
    digest: str = ""  # sha256 of every file of the recipe

    def stage(self, name: str) -> StageSpec:
        return next(stage for stage in self.stages if stage.name == name)

    def role_image(self, role: str, stages: Iterable[str] = ()) -> RoleImage:
        """What the image of ``role`` carries in a lab that selects the optional ``stages``."""
        return dict(self.roles).get(role, RoleImage()).with_stages(stages)

    def image_roles(self, role: str) -> tuple[str, ...]:
        """The roles whose nodes boot the same image as ``role``'s, in the recipe's order: the
        role itself and those it shares its image with (``shares_image_with``, either way)."""
        roles = dict(self.roles)
        partner = roles.get(role, RoleImage()).shares_image_with
        return tuple(
            name
            for name, image in self.roles
            if name in (role, partner) or image.shares_image_with == role
        ) or (role,)

    def node_image(self, role: str, stages: Iterable[str] = ()) -> RoleImage:
        """The image a node of ``role`` boots in a lab that selects the optional ``stages``:
        its role's, or with roles that share an image, every sharing role's packages and
        masked units (each role's services stay masked until its own steps configure them)."""
        selected = tuple(stages)
        images = [self.role_image(name, selected) for name in self.image_roles(role)]
        packages: list[str] = []
        masked: list[str] = []
        for image in images:
            packages += [item for item in image.packages if item not in packages]
            masked += [item for item in image.masked_units if item not in masked]
        script = next((image.build_script for image in images if image.build_script), None)
        return replace(
            self.role_image(role, selected),
            packages=tuple(packages),
            masked_units=tuple(masked),
            build_script=script,
        )

    @property
    def secret_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.secrets)


# --- rendered for one lab ---------------------------------------------------------------------


@dataclass(frozen=True)
class RenderedCheck:
    name: str
    command: str
    expect: str | None
    timeout: float
    guide: str


@dataclass(frozen=True)
class RenderedStep:
    """One step for one node: the whole script it runs, and what identifies it."""

    stage: str
    step: str
    node: str
    title: str
    guide: str
    script: str  # bash, run as root; secrets already substituted
    checks: tuple[RenderedCheck, ...]
    after: tuple[str, ...]
    digest: str  # of the script and checks: the run-once marker's content
    timeout: float
    retries: int
    path: ApiPath | None = None  # set on API steps: which path this rendering is for
    skipped_reason: str | None = None  # e.g. "needs the internet" (the lab does not allow it)
    note: str = ""
    covers: tuple[str, ...] = ()  # the recipe steps it stands for, when merged (fast path)
    fetch: tuple[tuple[str, str, str, str], ...] = ()  # (source node, path, mode, owner)

    @property
    def key(self) -> str:
        return f"{self.stage}/{self.step}"

    @property
    def step_names(self) -> tuple[str, ...]:
        return self.covers or (self.step,)


@dataclass(frozen=True)
class RenderedStage:
    name: str
    title: str
    guide: str
    steps: tuple[RenderedStep, ...]  # in recipe order, all nodes

    def for_node(self, node: str) -> tuple[RenderedStep, ...]:
        return tuple(step for step in self.steps if step.node == node)

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(step.node for step in self.steps))
