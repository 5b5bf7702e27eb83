"""The store: migrations are idempotent, every legal transition writes exactly one event, an
illegal one writes nothing, and the event log refuses UPDATE and DELETE."""

from __future__ import annotations

import itertools
import sqlite3
from collections import deque
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import pytest

from gpuwarden.core.clock import FakeClock
from gpuwarden.core.model import (
    INSTANCE_TRANSITIONS,
    JOB_TRANSITIONS,
    EntityKind,
    Instance,
    InstanceState,
    Job,
    JobSpec,
    JobState,
    TerminationReason,
)
from gpuwarden.store import IllegalTransition, Store, StoreCorrupt
from gpuwarden.store.migrations import MIGRATIONS

START = datetime(2026, 1, 1, tzinfo=UTC)
S = TypeVar("S", InstanceState, JobState)
_ids = itertools.count(1)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await Store.open(tmp_path / "gpuwarden.db", FakeClock(START))
    yield s
    await s.close()


def path_to(graph: dict[S, frozenset[S]], start: S, goal: S) -> list[S]:
    """The shortest chain of legal states from start to goal (start excluded)."""
    prev: dict[S, S | None] = {start: None}
    todo = deque([start])
    while todo:
        node = todo.popleft()
        for nxt in sorted(graph[node]):
            if nxt not in prev:
                prev[nxt] = node
                todo.append(nxt)
    assert goal in prev, f"{goal} is unreachable from {start}"
    chain: list[S] = []
    at: S | None = goal
    while at is not None and at != start:
        chain.append(at)
        at = prev[at]
    return chain[::-1]


def instance(iid: str) -> Instance:
    return Instance(
        id=iid,
        provider="sim-vast",
        label=f"gpuwarden-main-{iid}",
        state=InstanceState.REQUESTED,
        created_at=START,
        lease_until=START + timedelta(hours=4),
        last_activity=START,
        price_per_hour=0.5,
        provider_id="p-1",
    )


def job(jid: str) -> Job:
    return Job(
        id=jid, state=JobState.QUEUED, spec=JobSpec(prompt="a cat"), created_at=START,
        updated_at=START,
    )  # fmt: skip


async def instance_in(store: Store, state: InstanceState) -> str:
    iid = f"i{next(_ids)}"
    await store.insert_instance(instance(iid))
    for step in path_to(INSTANCE_TRANSITIONS, InstanceState.REQUESTED, state):
        reason = TerminationReason.MANUAL if step is InstanceState.TERMINATING else None
        await store.transition_instance(iid, step, reason=reason)
    return iid


async def job_in(store: Store, state: JobState) -> str:
    jid = f"j{next(_ids)}"
    await store.insert_job(job(jid))
    for step in path_to(JOB_TRANSITIONS, JobState.QUEUED, state):
        await store.transition_job(jid, step)
    return jid


async def count(store: Store, table: str) -> int:
    conn = store._conn
    async with conn.execute(f"SELECT COUNT(*) FROM {table}") as cur:
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def schema(store: Store) -> list[tuple[str, str]]:
    async with store._conn.execute("SELECT name, sql FROM sqlite_master ORDER BY name") as cur:
        return [(r[0], r[1]) for r in await cur.fetchall()]


# --- migrations ------------------------------------------------------------------------------


async def test_migrations_from_empty_and_rerun_are_noops(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    store = await Store.open(db, FakeClock(START))
    async with store._conn.execute("PRAGMA user_version") as cur:
        row = await cur.fetchone()
    assert row is not None and row[0] == len(MIGRATIONS)
    tables = {name for name, _ in await schema(store)}
    assert {"instances", "jobs", "events", "terminations", "flags"} <= tables
    before = await schema(store)
    assert await store.migrate() == len(MIGRATIONS)  # again, in place
    assert await schema(store) == before
    await store.insert_instance(instance("keep"))
    await store.close()
    again = await Store.open(db, FakeClock(START))  # and on reopening
    assert await schema(again) == before
    assert [i.id for i in await again.instances()] == ["keep"]
    await again.close()


async def test_pragmas(store: Store) -> None:
    for pragma, want in (("journal_mode", "wal"), ("synchronous", 2), ("foreign_keys", 1)):
        async with store._conn.execute(f"PRAGMA {pragma}") as cur:
            row = await cur.fetchone()
        assert row is not None and row[0] == want, pragma


# --- transitions -----------------------------------------------------------------------------

LEGAL_INSTANCE = [(a, b) for a, tos in INSTANCE_TRANSITIONS.items() for b in sorted(tos)]
ILLEGAL_INSTANCE = [
    (a, b) for a in InstanceState for b in InstanceState if b not in INSTANCE_TRANSITIONS[a]
]
LEGAL_JOB = [(a, b) for a, tos in JOB_TRANSITIONS.items() for b in sorted(tos)]
ILLEGAL_JOB = [(a, b) for a in JobState for b in JobState if b not in JOB_TRANSITIONS[a]]


def _id(pair: tuple[object, object]) -> str:
    return f"{pair[0]}->{pair[1]}"


@pytest.mark.parametrize("pair", LEGAL_INSTANCE, ids=_id)
async def test_legal_instance_transition_writes_one_event(
    store: Store, pair: tuple[InstanceState, InstanceState]
) -> None:
    src, dst = pair
    iid = await instance_in(store, src)
    events_before = await store.events(entity_id=iid)
    terms_before = await count(store, "terminations")
    after = await store.transition_instance(iid, dst, reason=TerminationReason.IDLE)
    events = await store.events(entity_id=iid)
    assert len(events) == len(events_before) + 1
    last = events[-1]
    assert (last.kind, last.name, last.from_state, last.to_state) == (
        EntityKind.INSTANCE, "state", src.value, dst.value,
    )  # fmt: skip
    assert after.state is dst and (await store.get_instance(iid)).state is dst
    wrote_termination = await count(store, "terminations") - terms_before
    assert wrote_termination == (1 if dst is InstanceState.TERMINATED else 0)


@pytest.mark.parametrize("pair", ILLEGAL_INSTANCE, ids=_id)
async def test_illegal_instance_transition_writes_nothing(
    store: Store, pair: tuple[InstanceState, InstanceState]
) -> None:
    src, dst = pair
    iid = await instance_in(store, src)
    row_before = await store.get_instance(iid)
    events_before = await count(store, "events")
    with pytest.raises(IllegalTransition):
        await store.transition_instance(iid, dst, reason=TerminationReason.MANUAL, gpu="X")
    assert await store.get_instance(iid) == row_before
    assert await count(store, "events") == events_before


@pytest.mark.parametrize("pair", LEGAL_JOB, ids=_id)
async def test_legal_job_transition_writes_one_event(
    store: Store, pair: tuple[JobState, JobState]
) -> None:
    src, dst = pair
    jid = await job_in(store, src)
    before = len(await store.events(entity_id=jid))
    after = await store.transition_job(jid, dst, reason="test")
    events = await store.events(entity_id=jid)
    assert len(events) == before + 1
    assert (events[-1].from_state, events[-1].to_state) == (src.value, dst.value)
    assert after.state is dst
    assert (after.finished_at is not None) == dst.terminal


@pytest.mark.parametrize("pair", ILLEGAL_JOB, ids=_id)
async def test_illegal_job_transition_writes_nothing(
    store: Store, pair: tuple[JobState, JobState]
) -> None:
    src, dst = pair
    jid = await job_in(store, src)
    row_before = await store.get_job(jid)
    events_before = await count(store, "events")
    with pytest.raises(IllegalTransition):
        await store.transition_job(jid, dst, error="nope")
    assert await store.get_job(jid) == row_before
    assert await count(store, "events") == events_before


async def test_events_newest_reads_the_tail_of_the_log_oldest_first(store: Store) -> None:
    for n in range(5):
        await store.record(EntityKind.DAEMON, "d", "tick", {"n": n})
    tail = await store.events(entity_id="d", limit=2, newest=True)
    assert [e.details["n"] for e in tail] == [3, 4]
    head = await store.events(entity_id="d", limit=2)
    assert [e.details["n"] for e in head] == [0, 1]


def test_every_state_is_covered() -> None:
    assert {a for a, _ in LEGAL_INSTANCE + ILLEGAL_INSTANCE} == set(InstanceState)
    assert len(LEGAL_INSTANCE) + len(ILLEGAL_INSTANCE) == len(InstanceState) ** 2
    assert len(LEGAL_JOB) + len(ILLEGAL_JOB) == len(JobState) ** 2


# --- the event log ---------------------------------------------------------------------------


async def test_event_log_refuses_update_and_delete(tmp_path: Path) -> None:
    db = tmp_path / "log.db"
    store = await Store.open(db, FakeClock(START))
    await instance_in(store, InstanceState.RUNNING)
    n = await count(store, "events")
    assert n >= 2
    await store.close()
    raw = sqlite3.connect(db)
    try:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            raw.execute("UPDATE events SET reason = 'forged'")
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            raw.execute("DELETE FROM events")
        assert raw.execute("SELECT COUNT(*) FROM events").fetchone()[0] == n
        assert raw.execute("SELECT COUNT(*) FROM events WHERE reason = 'forged'").fetchone()[0] == 0
    finally:
        raw.close()


@pytest.mark.parametrize(
    "content",
    [b"SQLite format 3\x00", bytes(range(256)) * 12, b"\x00" * 100],
    ids=["a truncated header", "random bytes", "zeros"],
)
async def test_a_file_that_is_not_a_database_is_refused_as_corrupt(
    tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "gpuwarden.db"
    path.write_bytes(content)
    with pytest.raises(StoreCorrupt, match=r"gpuwarden\.db"):
        await Store.open(path, FakeClock())
