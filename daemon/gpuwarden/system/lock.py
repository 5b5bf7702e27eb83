"""One daemon per state directory: an flock on `<state_dir>/gpuwarden.lock`.

The lock is taken before the database is opened or any socket is bound. Without it a second
daemon would open the same database and, worse, asyncio's start_unix_server would silently
delete the first daemon's control socket and take it over.

The holder writes its pid into the file (after locking), so the refusal can say who holds it.
The file is never deleted: unlinking a lock file lets a third process lock a fresh inode
while the second still holds the old one. The descriptor is close-on-exec, so processes the
daemon spawns do not keep the lock alive after it exits. The kernel drops the lock when the
process dies, however it dies, so there is no stale lock to clean up.

A daemon that finds the lock held exits with EX_TEMPFAIL (75): the condition is temporary
(the other daemon may be stopping), and the exit is distinct from a config error (78).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from types import TracebackType

EX_TEMPFAIL = 75


class LockHeld(Exception):
    """Another process holds the lock. `pid` is what it wrote into the file, if readable."""

    def __init__(self, path: Path, pid: int | None) -> None:
        self.path = path
        self.pid = pid
        who = f"pid {pid}" if pid else "another process (pid not yet written)"
        super().__init__(
            f"another gpuwarden daemon ({who}) is already running on this state directory:"
            f" {path} is locked; not starting"
        )


class StateLock:
    """`with StateLock(path):` or acquire()/release(). Not reentrant."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Lock or raise LockHeld at once (never waits). Creates the file if absent; a refused
        attempt changes nothing in it."""
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already locked by this process")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise LockHeld(self.path, pid) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)  # closing drops the lock
            raise
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # still ours: no daemon runs here any more
        os.close(fd)

    def __enter__(self) -> StateLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def holder_pid(path: Path) -> int | None:
    """The pid written in a lock file (for messages and tools), or None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return _read_pid(fd)
    finally:
        os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
