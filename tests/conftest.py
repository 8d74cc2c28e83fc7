"""Shared fixtures. Tests that touch libvirt are marked ``integration`` and name every object
they create with the ``lbtest-`` prefix, removing it even when they fail."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TEST_PREFIX = "lbtest-"


@pytest.fixture
def write_lab(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Write a lab file's text to ``lab.toml`` in a temporary folder and return its path."""

    def write(text: str, name: str = "lab.toml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write
