"""What a lab file refers to outside itself: the file it is read from, its image and its
recipe. These are the places where a lab file could make labbuilder read a host file or run
code, so each has one rule here (README: "What a lab file can and cannot make labbuilder do").

* The lab file: a regular file of at most ``MAX_LAB_FILE`` bytes of UTF-8, looked at with
  ``stat`` before it is opened (a FIFO never blocks, a device is never read).
* ``image``: a catalog image's name, an http(s) URL of a file on another host, or a qcow2
  file that stands alone (no backing or data file) inside the lab file's folder.
* ``recipe``: a built-in recipe's name; a recipe folder only from the command line.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from labbuilder.catalog.files import file_kind, load_catalog, local_image_problem
from labbuilder.common.errors import LabFileError
from labbuilder.common.tomlread import Where, has_control, parse_str
from labbuilder.model.values import ValueProblem, check_image_url
from labbuilder.recipe.files import recipe_names

MAX_LAB_FILE = 1024 * 1024  # bytes


def read_lab_text(path: Path) -> str:
    """The text of a lab file. Special files are refused before they are opened for reading
    (a FIFO would block, /dev/zero never ends), and so is a file larger than MAX_LAB_FILE."""
    hint = "name a lab file (TOML), e.g. labs/guide-3node.toml"
    try:
        info = path.stat()
    except (OSError, ValueError) as err:
        reason = getattr(err, "strerror", None) or str(err)
        raise LabFileError(f"{path}: cannot read the lab file: {reason}", hint) from None
    if not stat.S_ISREG(info.st_mode):
        raise LabFileError(
            f"{path}: the lab file is {file_kind(info.st_mode)}, not a regular file", hint
        )
    too_big = LabFileError(
        f"{path}: the lab file is larger than {MAX_LAB_FILE // 1024} KiB",
        "a lab file is a few hundred lines of TOML at most",
    )
    if info.st_size > MAX_LAB_FILE:
        raise too_big
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as err:
        raise LabFileError(f"{path}: cannot read the lab file: {err.strerror}", hint) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # replaced since the first look
            raise LabFileError(f"{path}: the lab file is not a regular file", hint)
        data = b""
        while len(data) <= MAX_LAB_FILE and (chunk := os.read(fd, 65536)):
            data += chunk
    except OSError as err:
        raise LabFileError(f"{path}: cannot read the lab file: {err.strerror}", hint) from None
    finally:
        os.close(fd)
    if len(data) > MAX_LAB_FILE:
        raise too_big
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise LabFileError(
            f"{path}: the lab file is not UTF-8 text (byte {err.start})",
            "save it as UTF-8; a lab file is TOML text",
        ) from None


def parse_recipe_name(value: object, where: Where) -> str:
    """A built-in recipe's name. A recipe folder is code (jinja templates, shell steps): only
    the user names one, on the command line (``install --recipe DIR``), never a lab file."""
    name = parse_str(value, where)
    known = recipe_names()
    if name not in known:
        raise where.error(
            name,
            "is not a built-in recipe",
            f"built-in recipes: {', '.join(known)}; a recipe folder of your own is given on "
            "the command line: labbuilder install --recipe DIR",
        )
    return name


def parse_image(value: object, where: Where, folder: Path | None) -> str:
    """A catalog image's name, an http(s) URL, or a local qcow2 file in the lab file's folder.

    A local image is returned as its absolute path, so the lab finds it from any directory.
    """
    text = parse_str(value, where)
    if text in load_catalog():
        return text
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    if scheme in ("http", "https"):
        try:
            return check_image_url(text)
        except ValueProblem as problem:
            raise where.error(text, problem.rule, problem.hint) from None
    if scheme == "file":
        raise where.error(
            text,
            "is a file:// URL; a lab file names a local image by its path",
            'e.g. image = "./images/custom.qcow2" (in the lab file\'s folder)',
        )
    if scheme or "/" not in text and not text.endswith((".qcow2", ".img")):
        names = ", ".join(sorted(load_catalog()))
        raise where.error(
            text,
            "is not an image of the catalog, an http(s) URL or a path to a qcow2 file",
            f"catalog images: {names}; or a path such as ./images/custom.qcow2",
        )
    return local_image(text, where, folder)


def local_image(text: str, where: Where, folder: Path | None) -> str:
    """The rule for a local image named by a lab file: a regular qcow2 file (no backing or data
    file) inside the lab file's folder or below it, also after following symlinks."""
    hint = (
        "a lab file may name a local image only inside its own folder: copy the image next "
        "to the lab file (a symlink out of the folder does not count), or publish it over http(s)"
    )
    if folder is None or has_control(text):
        raise where.error(
            text, "is a local image, which only a lab file in a folder may name", hint
        )
    base = folder.resolve()
    try:
        path = (base / Path(text).expanduser()).resolve()
    except (OSError, RuntimeError, ValueError):
        raise where.error(text, "is not a path that can be resolved", hint) from None
    if not path.is_relative_to(base):
        raise where.error(text, f"is outside the lab file's folder ({base})", hint)
    problem = local_image_problem(path, qcow2_only=True)
    if problem is not None:
        raise where.error(text, problem[0], problem[1])
    return str(path)
