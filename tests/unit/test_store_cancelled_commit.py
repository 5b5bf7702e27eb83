"""A caller cancelled while its COMMIT runs: aiosqlite runs a queued statement whether or not
anyone still waits for it, so the row is written. The memory view, the listeners and the
other changes of a group commit must then agree with the database, and the cancellation
still reaches the caller."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from store_support import in_database, new_instance
from tests.conftest import T0

from gpuwarden.core.clock import FakeClock
from gpuwarden.core.model import Event, InstanceState, TerminationReason
from gpuwarden.store import Store, connect


def _cancel_at_commit(store: Store, victim: list[asyncio.Task[Any]]) -> None:
    """Cancel `victim[0]` right after its COMMIT is handed to the database thread."""
    real = store._conn.execute

    def execute(statement: str, *args: Any, **kwargs: Any) -> Any:
        result = real(statement, *args, **kwargs)
        if statement == "COMMIT" and victim:
            victim.pop().cancel()
        return result

    store._conn.execute = execute  # type: ignore[method-assign]


@pytest.fixture
def clock() -> Iterator[FakeClock]:
    yield FakeClock(T0)


@pytest.fixture
async def store(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Store]:
    opened = await Store.open(tmp_path / "g.db", clock)
    try:
        yield opened
    finally:  # also when an assertion failed: an open connection's thread holds the exit
        await opened.close()


async def test_a_cancelled_insert_that_committed_is_in_memory_and_heard(
    store: Store, clock: FakeClock
) -> None:
    heard: list[Event] = []
    store.subscribe(heard.append)
    victim: list[asyncio.Task[Any]] = []
    _cancel_at_commit(store, victim)
    task = asyncio.create_task(store.insert_instance(new_instance("i1", clock)))
    victim.append(task)
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [i.id for i in await in_database(store)] == ["i1"]  # written
    assert store.live.get("i1") is not None  # and the memory view says so
    assert [e.entity_id for e in heard] == ["i1"]


async def test_a_cancelled_group_commit_leaves_the_others_written_once(
    store: Store, clock: FakeClock
) -> None:
    for iid in ("i1", "i2"):
        await store.insert_instance(new_instance(iid, clock))
    victim: list[asyncio.Task[Any]] = []
    _cancel_at_commit(store, victim)
    end = TerminationReason.LEASE_EXPIRED
    async with store._lock:  # both queue behind the writer, then share one transaction
        first = asyncio.create_task(
            store.transition_instance("i1", InstanceState.TERMINATING, reason=end)
        )
        second = asyncio.create_task(
            store.transition_instance("i2", InstanceState.TERMINATING, reason=end)
        )
        await asyncio.sleep(0)  # both queued on the lock (a yield, not a wait for time)
        victim.append(first)
        commits = store._commits
    with pytest.raises(asyncio.CancelledError):
        await first
    after = await asyncio.wait_for(second, 5)
    assert after.state is InstanceState.TERMINATING
    assert store._commits == commits + 1  # its change went in the same commit
    states = {i.id: i.state for i in await in_database(store)}
    assert states == {"i1": InstanceState.TERMINATING, "i2": InstanceState.TERMINATING}
    assert {i.id: i.state for i in store.live.select()} == states


async def test_a_cancelled_commit_that_fails_is_rolled_back_and_still_a_cancellation(
    store: Store, clock: FakeClock
) -> None:
    victim: list[asyncio.Task[Any]] = []
    real = store._conn.execute

    def execute(statement: str, *args: Any, **kwargs: Any) -> Any:
        if statement != "COMMIT":
            return real(statement, *args, **kwargs)
        victim.pop().cancel()

        async def fails() -> None:
            await asyncio.sleep(0)  # the cancellation lands while the COMMIT is out
            raise sqlite3.OperationalError("disk I/O error")

        return fails()

    store._conn.execute = execute  # type: ignore[method-assign]
    task = asyncio.create_task(store.insert_instance(new_instance("i1", clock)))
    victim.append(task)
    with pytest.raises(asyncio.CancelledError):  # the caller's cancellation, not the disk's
        await task
    store._conn.execute = real  # type: ignore[method-assign]
    assert await in_database(store) == []  # rolled back
    assert store.live.get("i1") is None


async def test_a_commit_that_ends_as_its_caller_is_cancelled_counts_as_written() -> None:
    """The COMMIT ends and the caller is cancelled in the same turn of the loop: written,
    so `finish` says the caller was cancelled (the store then applies the records before the
    cancellation goes on) instead of raising as if nothing had been written."""
    loop = asyncio.get_running_loop()
    commit: asyncio.Future[None] = loop.create_future()
    task = asyncio.create_task(connect.finish(commit))
    await asyncio.sleep(0)  # a yield: finish now waits on the COMMIT
    commit.set_result(None)
    task.cancel()
    assert await task is True
    # The same turn with a COMMIT that failed: rolled back, and still the cancellation.
    failed: asyncio.Future[None] = loop.create_future()
    task = asyncio.create_task(connect.finish(failed))
    await asyncio.sleep(0)
    failed.set_exception(sqlite3.OperationalError("disk I/O error"))
    task.cancel()
    with pytest.raises(asyncio.CancelledError) as raised:
        await task
    assert isinstance(raised.value.__cause__, sqlite3.OperationalError)
