"""A full state disk must not keep a GPU billing: when the termination intent cannot be
written, the guard destroys anyway, keeps the ending in memory, and writes it (with the times
it really happened) as soon as the disk allows. The full disk is staged at the store's
connection: every INSERT, UPDATE, DELETE or REPLACE fails with SQLite's own "database or disk
is full" error, as a write to a full state disk does."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from guard_support import running_guard, settings
from tests.conftest import MakeApp

from gpuwarden.core.clock import FakeClock
from gpuwarden.core.model import InstanceState, TerminationReason
from gpuwarden.fleet import budget, launcher
from gpuwarden.fleet.app import App
from gpuwarden.providers.fake import FakeProvider
from gpuwarden.store import StoreWriteFailed


class FullDisk:
    """Makes the store's connection fail every write the way SQLite does on a full disk."""

    def __init__(self, app: App, monkeypatch: pytest.MonkeyPatch) -> None:
        self.full = False
        conn = app.store._conn  # the test reaches in: no product API should fill a disk
        real = conn.execute

        def execute(sql: str, *args: Any, **kw: Any) -> Any:
            # aiosqlite's execute() is awaited or entered (`async with`): fail at the call.
            if self.full and sql.lstrip().split(None, 1)[0].upper() in _WRITES:
                raise sqlite3.OperationalError("database or disk is full")
            return real(sql, *args, **kw)

        monkeypatch.setattr(conn, "execute", execute)


_WRITES = frozenset({"INSERT", "UPDATE", "DELETE", "REPLACE"})


async def test_a_full_disk_does_not_stop_the_destroy_and_the_record_follows(
    tmp_path: Path, make_app: MakeApp, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeProvider(clock, "fake")
    app = await make_app(settings(tmp_path, idle_timeout="1m"), clock, [fake])
    disk = FullDisk(app, monkeypatch)
    async with running_guard(app) as run:
        inst = await launcher.launch(app, fake.offers[0], hours=1)
        await run.step(clock, 1)
        disk.full = True
        with pytest.raises(StoreWriteFailed):  # the premise: nothing can be written now
            await app.store.update_instance(inst.id, extra={"x": 1})

        await run.step(clock, 59)  # the idle deadline
        assert len(fake.calls_to("destroy")) == 1  # ended on time, from memory
        row = await app.store.get_instance(inst.id)
        assert row.state is inst.state  # the record could not follow yet
        assert app.terminator.unwritten == 1

        await run.step(clock, 30)  # still full: the guard keeps going, nothing repeated
        assert len(fake.calls_to("destroy")) == 1

        disk.full = False
        await run.step(clock, 1)  # the next pass, a second later, writes what it kept
        done = await app.store.get_instance(inst.id)
        assert done.state is InstanceState.TERMINATED
        assert done.reason is TerminationReason.IDLE
        assert done.terminating_at is not None and done.terminated_at is not None
        # the times are when it happened, not when the disk allowed the write
        assert (done.terminating_at - inst.created_at).total_seconds() == pytest.approx(60, abs=1)
        assert (done.terminated_at - inst.created_at).total_seconds() == pytest.approx(60, abs=1)
        late = [
            e for e in await app.store.events(entity_id=inst.id) if e.details.get("written_late")
        ]
        assert [e.to_state for e in late] == ["terminating", "terminated"]
        assert app.terminator.unwritten == 0


async def test_a_credit_stop_on_a_full_disk_still_ends_everything(
    tmp_path: Path, make_app: MakeApp, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The queue cannot be marked paused on a full disk: the instances are ended anyway."""
    fake = FakeProvider(clock, "fake")
    app = await make_app(settings(tmp_path), clock, [fake])
    disk = FullDisk(app, monkeypatch)
    inst = await launcher.launch(app, fake.offers[0], hours=1)
    disk.full = True
    await budget.credit_stop(app, provider="fake", why="balance below zero")
    assert len(fake.calls_to("destroy")) == 1
    assert app.terminator.unwritten == 1
    assert (await app.store.get_instance(inst.id)).state is inst.state  # not on record yet
