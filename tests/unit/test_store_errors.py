"""What the store makes of SQLite's errors: a lock another process holds (a real second
connection here) is StoreBusy, at start-up and on a write, never "corrupt" and never taken
for a full disk; a file that is not a database is StoreCorrupt; a full disk or an I/O error
is StoreUnavailable at start-up and StoreWriteFailed on a write."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from gpuwarden.config import settings as config
from gpuwarden.core.clock import FakeClock
from gpuwarden.lifecycle import supervisor
from gpuwarden.store import (
    Store,
    StoreBusy,
    StoreCorrupt,
    StoreUnavailable,
    StoreWriteFailed,
    errors,
)
from gpuwarden.store import db as store_db

QUICK_MS = 50  # how long SQLite waits for the lock here, not the daemon's 5 s


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    """A second connection to tmp_path/gpuwarden.db, as an sqlite3 shell would be; the test
    takes the write lock with it."""
    conn = sqlite3.connect(tmp_path / "gpuwarden.db", isolation_level=None)
    try:
        yield conn
    finally:
        conn.close()


async def test_a_write_while_another_process_holds_the_lock_is_busy_not_a_full_disk(
    tmp_path: Path, holder: sqlite3.Connection
) -> None:
    store = await Store.open(tmp_path / "gpuwarden.db", FakeClock(), busy_timeout_ms=QUICK_MS)
    try:
        holder.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreBusy, match="another process holds the database's write lock"):
            await store.set_flag("x", 1, reason="test")
        assert await store.get_flag("x") is None  # nothing of it was written
        holder.execute("ROLLBACK")
        await store.set_flag("x", 1, reason="test")  # the lock gone, the next try passes
        assert await store.get_flag("x") == 1
    finally:
        await store.close()
    assert issubclass(StoreBusy, StoreWriteFailed)  # who must act anyway (a destroy) still does


async def test_opening_while_another_process_holds_the_lock_is_busy_not_corrupt(
    tmp_path: Path, holder: sqlite3.Connection
) -> None:
    holder.execute("BEGIN EXCLUSIVE")  # a new file in rollback mode: WAL cannot be set now
    holder.execute("CREATE TABLE t (x)")
    with pytest.raises(StoreBusy, match=r"gpuwarden\.db: another process holds"):
        await Store.open(tmp_path / "gpuwarden.db", FakeClock(), busy_timeout_ms=QUICK_MS)
    holder.execute("ROLLBACK")
    store = await Store.open(tmp_path / "gpuwarden.db", FakeClock(), busy_timeout_ms=QUICK_MS)
    await store.close()


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (sqlite3.OperationalError("database is locked"), "busy"),
        (sqlite3.OperationalError("database table is locked"), "busy"),
        (sqlite3.OperationalError("database or disk is full"), "other"),
        (sqlite3.OperationalError("disk I/O error"), "other"),
        (sqlite3.OperationalError("unable to open database file"), "other"),
        (sqlite3.DatabaseError("file is not a database"), "corrupt"),
        (sqlite3.DatabaseError("database disk image is malformed"), "corrupt"),
    ],
)
def test_an_error_without_its_code_is_read_by_its_message(error: sqlite3.Error, kind: str) -> None:
    assert errors.kind(error) == kind


def test_open_failures_map_to_what_they_mean() -> None:
    assert isinstance(
        errors.open_failed("g.db", sqlite3.OperationalError("database or disk is full")),
        StoreUnavailable,
    )
    assert isinstance(
        errors.open_failed("g.db", sqlite3.DatabaseError("file is not a database")), StoreCorrupt
    )
    full = errors.write_failed(sqlite3.OperationalError("database or disk is full"))
    assert type(full) is StoreWriteFailed  # the full-disk path, as before


async def test_the_daemon_refuses_to_start_on_a_locked_database_with_exit_75(
    tmp_path: Path, holder: sqlite3.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not store_corrupt (exit 1), which could send an operator to move the database aside:
    store_busy, EX_TEMPFAIL, the error saying another process holds it."""
    monkeypatch.setattr(store_db, "BUSY_TIMEOUT_MS", QUICK_MS)
    for name in ("GPUWARDEN_DAEMON__STATE_DIR", "GPUWARDEN_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "c.toml"
    path.write_text(f'[daemon]\nstate_dir = "{tmp_path}"\n[providers.sim]\nenabled = false\n')
    settings = config.load(path)
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("CREATE TABLE t (x)")
    sup = supervisor.Supervisor(settings, path, build_services=lambda app: [])
    with structlog.testing.capture_logs() as logs:
        assert await sup.run() == 75
    [line] = [e for e in logs if e["event"] == "store_busy"]
    assert "another process holds the database's write lock" in line["error"]
    assert not [e for e in logs if e["event"] == "store_corrupt"]
