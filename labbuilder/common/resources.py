"""Where the data folders (``images/``, ``networks/``, ``cloud-init/``, ``labs/``,
``recipes/``) are.

In a wheel they are package data under ``labbuilder/_data/``; in a source checkout (editable
install, or running from the tree) they are the top-level folders of the repository.
"""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

DATA_FOLDERS = ("images", "networks", "cloud-init", "labs", "recipes")


def data_dir(name: str) -> Traversable:
    """Return the data folder ``name`` (one of ``DATA_FOLDERS``)."""
    if name not in DATA_FOLDERS:
        raise ValueError(f"unknown data folder {name!r}; expected one of {DATA_FOLDERS}")
    packaged = resources.files("labbuilder") / "_data" / name
    if packaged.is_dir():
        return packaged
    checkout = Path(__file__).resolve().parents[2] / name
    if checkout.is_dir():
        return checkout
    raise FileNotFoundError(
        f"labbuilder's data folder {name!r} is missing from {packaged} and {checkout}; "
        "reinstall labbuilder"
    )
