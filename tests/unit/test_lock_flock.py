"""The state-dir lock: one holder; a refused attempt names the holder's pid and changes
nothing; release lets the next one in; the descriptor is not inherited by children."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from gpuwarden.system.lock import EX_TEMPFAIL, LockHeld, StateLock, holder_pid


def test_second_lock_is_refused_with_the_holders_pid(tmp_path: Path) -> None:
    path = tmp_path / "gpuwarden.lock"
    with StateLock(path) as first:
        assert first.held
        assert path.read_text() == f"{os.getpid()}\n"
        stat_before = path.stat()
        with pytest.raises(LockHeld) as exc:
            StateLock(path).acquire()
        assert exc.value.pid == os.getpid()
        assert f"pid {os.getpid()}" in str(exc.value) and str(path) in str(exc.value)
        after = path.stat()
        assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
            stat_before.st_ino, stat_before.st_size, stat_before.st_mtime_ns,
        )  # fmt: skip
        assert holder_pid(path) == os.getpid()
    assert not first.held
    assert path.exists()  # never deleted (see lock.py)
    assert holder_pid(path) is None  # emptied on release
    with StateLock(path):  # free again
        pass


def test_acquire_twice_in_one_object_is_a_bug(tmp_path: Path) -> None:
    lock = StateLock(tmp_path / "l")
    lock.acquire()
    try:
        with pytest.raises(RuntimeError):
            lock.acquire()
    finally:
        lock.release()
    lock.release()  # idempotent


def test_pid_not_yet_written_is_reported_as_unknown(tmp_path: Path) -> None:
    path = tmp_path / "gpuwarden.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a holder that has not written its pid yet
    try:
        with pytest.raises(LockHeld) as exc:
            StateLock(path).acquire()
        assert exc.value.pid is None
        assert "not yet written" in str(exc.value)
    finally:
        os.close(fd)


def test_the_lock_descriptor_is_close_on_exec(tmp_path: Path) -> None:
    lock = StateLock(tmp_path / "l")
    lock.acquire()
    try:
        assert lock._fd is not None
        assert fcntl.fcntl(lock._fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    finally:
        lock.release()


def test_exit_code_is_tempfail() -> None:
    assert EX_TEMPFAIL == 75
