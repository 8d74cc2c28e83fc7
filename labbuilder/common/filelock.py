"""An exclusive ``flock(2)`` lock on a lock file, shared by processes and threads alike.

Each ``file_lock`` opens the file anew, so two threads of one process exclude each other just
as two processes do. The lock file may be deleted by whoever holds the lock (to tidy up):
a waiter that then acquires the lock on the deleted file notices and locks the new one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

_POLL = 0.1


@contextlib.contextmanager
def file_lock(path: Path, *, blocking: bool = True, timeout: float | None = None) -> Iterator[bool]:
    """Hold an exclusive lock on ``path`` (created if needed); yield whether it is held.

    With ``blocking=False`` it yields False at once if someone else holds the lock. With a
    ``timeout`` (seconds) it raises ``TimeoutError`` if the lock is not acquired in time.
    Raises ``OSError`` if the lock file cannot be created.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    fd = _acquire(path, blocking=blocking, deadline=deadline)
    if fd is None:
        yield False
        return
    try:
        yield True
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def is_locked(path: Path) -> bool:
    """Whether someone holds the lock on ``path`` now; a missing file is not locked.

    Never creates the file nor follows a symbolic link. Raises ``OSError`` when the file
    exists but cannot be opened (then nobody can tell, and callers must assume it is held).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also releases the lock we may have taken
    return False


def _acquire(path: Path, *, blocking: bool, deadline: float | None) -> int | None:
    """The descriptor of ``path``, locked; None if not blocking and someone else holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            locked = _flock(fd, path, blocking=blocking, deadline=deadline)
        except BaseException:
            os.close(fd)
            raise
        if not locked:
            os.close(fd)
            return None
        if _same_file(fd, path):
            return fd
        os.close(fd)  # the holder deleted the file we locked: lock the one there now


def _flock(fd: int, path: Path, *, blocking: bool, deadline: float | None) -> bool:
    if blocking and deadline is None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return True
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if not blocking:
                return False
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"timed out waiting for the lock {path}") from None
            time.sleep(_POLL)


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = path.stat()
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)
