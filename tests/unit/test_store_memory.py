"""The store's in-memory view of the live instances equals the database, whatever happens.

Hypothesis draws a sequence of operations on a real Store (SQLite on disk): inserts in any
live state, legal and illegal transitions, field updates with and without an event, a
transaction that fails halfway, and a reopen (the view rebuilt from the file). After every
step the view must equal what `SELECT ... WHERE state IN (live)` parses to, row for row, and
the store's reads of live instances must come back in the database's order.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from store_support import in_database, new_instance
from tests.conftest import T0

from gpuwarden.core.clock import FakeClock
from gpuwarden.core.model import (
    LIVE_INSTANCE_STATES,
    EntityKind,
    Instance,
    InstanceState,
    TerminationReason,
)
from gpuwarden.store import IllegalTransition, NotFoundError, Store, sql

IDS = [f"i{n}" for n in range(6)]
LIVE = sorted(LIVE_INSTANCE_STATES)

op = st.one_of(
    st.tuples(st.just("insert"), st.sampled_from(IDS), st.sampled_from(LIVE)),
    st.tuples(st.just("move"), st.sampled_from(IDS), st.sampled_from(list(InstanceState))),
    st.tuples(st.just("update"), st.sampled_from(IDS), st.integers(0, 5)),
    st.tuples(st.just("record"), st.sampled_from(IDS), st.integers(0, 5)),
    st.tuples(st.just("fail"), st.sampled_from(IDS), st.integers(0, 5)),
    st.tuples(st.just("tick"), st.sampled_from(IDS), st.integers(1, 90)),
    st.tuples(st.just("reopen"), st.sampled_from(IDS), st.just(0)),
    st.tuples(st.just("burst"), st.sampled_from(IDS), st.sampled_from(list(InstanceState))),
)


class _Boom(Exception):
    pass


async def _step(store: Store, clock: FakeClock, name: str, iid: str, arg: Any) -> None:
    if name == "insert":
        with contextlib.suppress(Exception):  # the id may exist: a failed insert
            await store.insert_instance(new_instance(iid, clock, arg))
    elif name == "move":
        reason = TerminationReason.MANUAL if arg is InstanceState.TERMINATING else None
        with contextlib.suppress(IllegalTransition, NotFoundError):
            await store.transition_instance(iid, arg, reason=reason, provider_id=f"p-{iid}")
    elif name == "update":
        with contextlib.suppress(NotFoundError):
            await store.update_instance(iid, strikes=arg, last_probe_at=clock.now())
    elif name == "record":
        with contextlib.suppress(NotFoundError):
            await store.record(
                EntityKind.INSTANCE, iid, "strike", {"n": arg}, updates={"extra": {"n": arg}}
            )
    elif name == "fail":
        with contextlib.suppress(_Boom, NotFoundError):
            async with store.transaction() as conn:
                await sql.update(conn, "instances", iid, {"strikes": 100 + arg})
                raise _Boom  # rolled back: the view must not keep the change
    elif name == "burst":  # concurrent changes: written in one batch, each on its own
        results = await asyncio.gather(
            *(
                store.transition_instance(
                    other, arg, reason=TerminationReason.MANUAL, provider_id=f"p-{other}"
                )
                for other in IDS
            ),
            return_exceptions=True,
        )
        for got in results:
            assert isinstance(got, Instance | IllegalTransition | NotFoundError), got
    elif name == "tick":
        await clock.advance(arg)


async def _run(ops: list[tuple[str, str, Any]], db: Path) -> None:
    clock = FakeClock(T0)
    store = await Store.open(db, clock)
    try:
        for name, iid, arg in ops:
            if name == "reopen":
                await store.close()
                store = await Store.open(db, clock)
            else:
                await _step(store, clock, name, iid, arg)
            want = await in_database(store, LIVE)
            assert await store.live_instances() == want
            assert {i.id: i for i in want} == {i.id: store.live.get(i.id) for i in want}
            assert len(store.live) == len(want)
            for inst in want:
                assert await store.get_instance(inst.id) == inst
            running = [i for i in want if i.state is InstanceState.RUNNING]
            assert await store.instances([InstanceState.RUNNING]) == running
    finally:
        await store.close()


# About 5 s of hypothesis: in `make test`, kept out of `make fast`.
@pytest.mark.slow
@hsettings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=st.lists(op, min_size=1, max_size=30))
def test_the_memory_view_equals_the_database(tmp_path: Path, ops: list[Any]) -> None:
    where = Path(tempfile.mkdtemp(dir=tmp_path))
    try:
        asyncio.run(_run(ops, where / "gpuwarden.db"))
    finally:
        shutil.rmtree(where, ignore_errors=True)
