"""A lab's log files: what a command did in detail, where the terminal shows only its phases.

While a command runs, ``lab_log(path, title)`` sends every record of labbuilder's loggers (the
``labbuilder`` hierarchy, DEBUG and up) to ``path``: external tools' output (logger
``labbuilder.tools``: mmdebstrap, apt, qemu-img, firewall commands), the commands labbuilder
runs on the host, and the progress lines (``labbuilder.cli.progress``). The file is appended to,
each command beginning with a ``====`` line; it is 0600, never written through a link, made
only when the first record comes (a command refused as bad input leaves none), and moved to
``<name>.1`` once it grows beyond ``MAX_BYTES``. ``tail(path)`` gives its last lines for an
error message.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from io import TextIOWrapper
from pathlib import Path

from labbuilder.adapters import processes
from labbuilder.lifecycle.state import check_private_dir, ensure_private_dir, refuse_special

TOOLS_LOGGER = processes.TOOLS_LOGGER  # external tools' commands and output, DEBUG
MAX_BYTES = 8 * 2**20
TAIL_LINES = 20
TAIL_WIDTH = 400  # characters of a line shown in an error message


class LabLogHandler(logging.FileHandler):
    """A ``FileHandler`` for a lab's log: opened at the first record, appending, mode 0600,
    never through a link; the first record is preceded by the command's ``title`` line."""

    def __init__(self, path: Path, title: str) -> None:
        self.title = title
        self.failed = False
        super().__init__(path, mode="a", encoding="utf-8", delay=True, errors="replace")
        self.setLevel(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))

    def _open(self) -> TextIOWrapper:
        path = Path(self.baseFilename)
        ensure_private_dir(path.parent)
        refuse_link(path)
        with contextlib.suppress(OSError):
            if path.stat().st_size > MAX_BYTES:
                path.replace(path.with_name(path.name + ".1"))
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        stream = os.fdopen(
            os.open(path, flags, 0o600), "a", encoding="utf-8", errors="replace", buffering=1
        )
        stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        stream.write(f"==== {stamp} {self.title}\n")
        return stream

    def handleError(self, record: logging.LogRecord) -> None:
        """A log that cannot be written is given up quietly: the terminal is no place for
        logging's tracebacks (``lab_log`` checked the path before the command ran)."""
        del record
        self.failed = True


def refuse_link(path: Path) -> None:
    """Refuse (exit 2) a log path that is a link or not a regular file."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    refuse_special(path, info, "logs")


@contextlib.contextmanager
def lab_log(path: Path, title: str) -> Iterator[Path]:
    """Send labbuilder's log records to ``path`` (see the module's doc) until the block ends;
    the ``labbuilder`` logger's level and handlers are as they were afterwards."""
    refuse_link(path)
    if path.parent.exists():
        check_private_dir(path.parent, what="log folder")
    handler = LabLogHandler(path, title)
    logger = logging.getLogger("labbuilder")
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield path
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()


def tail(path: Path, count: int = TAIL_LINES) -> list[str]:
    """The last ``count`` lines of the log ``path`` (none if it is missing or unreadable),
    each cut to ``TAIL_WIDTH`` characters and without control characters."""
    try:
        with path.open("rb") as log:
            log.seek(0, os.SEEK_END)
            size = log.tell()
            log.seek(max(0, size - 256 * count * 4))
            data = log.read()
    except OSError:
        return []
    lines = data.decode("utf-8", errors="replace").splitlines()[-count:]
    return ["".join(c if c.isprintable() else " " for c in line)[:TAIL_WIDTH] for line in lines]
