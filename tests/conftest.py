"""Shared fixtures. Tests that touch libvirt are marked ``integration`` and name every object
they create with the ``lbtest-`` prefix, removing it even when they fail.

Bringing up the guide's three nodes is the dearest thing the suite does under emulation, so
test_bringup.py and test_install_e2e.py share one lab (``guide_lab``). Those two modules run
last, one after the other, so the lab is up only while they run."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

# The property tests share a loaded 2-core host with emulated guests (the other pytest-xdist
# worker): an example's time says nothing there. Tests that assert a time say so themselves.
settings.register_profile("labbuilder", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("labbuilder")

REPO = Path(__file__).resolve().parent.parent
TEST_PREFIX = "lbtest-"
GUIDE_LAB = "lbtest-guide"
GUIDE_POOL = "lbtest-guide-pool"  # its own: other modules remove lbtest-pool as they end
GUIDE_HEARTBEAT = 3  # seconds between progress heartbeats of its `up`
# The modules that use guide_lab, in the order they run (after every other module).
GUIDE_LAB_MODULES = ("test_bringup.py", "test_install_e2e.py")
# The modules with tests marked integration (libvirtd, guests, namespaces, firewall rules):
# they run one after the other in one worker (pytest_xdist_make_scheduler).
HOST_MODULES = (
    "test_bringup.py", "test_class_access.py", "test_cli.py", "test_failure_reports.py",
    "test_firewall.py", "test_guest_ssh.py", "test_hostfacts.py", "test_imagebuild.py",
    "test_install_e2e.py", "test_install_full.py", "test_isolated.py", "test_ownership.py",
    "test_probe.py", "test_relay.py", "test_rolebake.py", "test_run_command.py",
    "test_snapshots.py", "test_teardown.py", "test_templates.py",
)  # fmt: skip
HOST_GROUP = "host"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def order(item: pytest.Item) -> int:
        name = item.path.name
        return GUIDE_LAB_MODULES.index(name) + 1 if name in GUIDE_LAB_MODULES else 0

    items.sort(key=order)  # stable: every module keeps its own order
    unlisted = sorted(
        {item.path.name for item in items if item.get_closest_marker("integration")}
        - set(HOST_MODULES)
    )
    if unlisted:
        raise pytest.UsageError(
            f"tests/conftest.py: HOST_MODULES lacks {', '.join(unlisted)} (its tests are "
            "marked integration: they touch the host and must run in the host's worker)"
        )


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """The README's test command runs two pytest-xdist workers: one runs every module of
    ``HOST_MODULES``, in the order above and one test at a time, as a run without workers
    does (the host's labs, pools and rules are never made by two tests at once); the other
    runs the modules that only compute, while the first mostly waits on emulated guests."""
    from xdist.scheduler import LoadScopeScheduling

    class HostScheduling(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
            return HOST_GROUP if module in HOST_MODULES else nodeid

    return HostScheduling(config, log)


@pytest.fixture
def write_lab(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Write a lab file's text to ``lab.toml`` in a temporary folder and return its path."""

    def write(text: str, name: str = "lab.toml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


@pytest.fixture(scope="session")
def guide_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The guide's three nodes on free subnets, booted from recipe zed-debian-12's role images,
    with egress confined to the lab: ``env`` (the test environment), ``file``, ``state`` (the
    lab's state directory), ``record`` (its lab.json), ``key``, ``up_seconds`` and ``up_stderr`` (its `up`'s progress). Removed with
    its pool when the session ends, whatever state the tests left it in."""
    from lablib import lab_environment, remove_labs, run_labbuilder, three_node_lab

    from labbuilder.cli.progress import HEARTBEAT_ENV

    env = lab_environment(tmp_path_factory.mktemp("guide-state"), GUIDE_POOL)
    # Its `up` runs as in a CI log (output captured): heartbeats every few seconds while it waits
    # (test_bringup checks what reached its output).
    env[HEARTBEAT_ENV] = str(GUIDE_HEARTBEAT)
    lab_file = tmp_path_factory.mktemp("guide-lab") / "lab.toml"
    lab_file.write_text(three_node_lab(GUIDE_LAB, role_images=True))
    try:
        started = time.monotonic()
        result = run_labbuilder("up", str(lab_file), "--json", env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        info: dict[str, Any] = json.loads(result.stdout)
        state = Path(env["LABBUILDER_STATE_DIR"]) / "labs" / GUIDE_LAB
        info.update(
            env=env,
            file=str(lab_file),
            state=state,
            record=json.loads((state / "lab.json").read_text()),
            key=state / "id_ed25519",
            up_seconds=time.monotonic() - started,
            up_stderr=result.stderr,
        )
        yield info
    finally:
        run_labbuilder("down", str(lab_file), env=env)
        remove_labs([GUIDE_LAB], env)
