"""Store tests' common pieces: an instance row to insert, and what the database file holds
(read on the writer's connection, past the store's memory view)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta

from gpuwarden.core.clock import FakeClock
from gpuwarden.core.model import Instance, InstanceState
from gpuwarden.store import Store, rows, sql


def new_instance(
    iid: str, clock: FakeClock, state: InstanceState = InstanceState.RUNNING
) -> Instance:
    """An instance created now, leased for an hour (no provider id while only requested)."""
    now = clock.now()
    return Instance(
        id=iid,
        provider="fake",
        label=f"gpuwarden-main-{iid}",
        state=state,
        created_at=now,
        lease_until=now + timedelta(hours=1),
        last_activity=now,
        price_per_hour=0.5,
        provider_id=None if state is InstanceState.REQUESTED else f"p-{iid}",
        extra={"n": 0},
    )


async def in_database(
    store: Store, states: Iterable[InstanceState] | None = None
) -> list[Instance]:
    """The instances in the file (only those in `states` when given), in creation order."""
    where = ""
    if states is not None:
        where = " WHERE state IN ({})".format(", ".join(f"'{s.value}'" for s in states))
    query = f"SELECT * FROM instances{where} ORDER BY created_at, rowid"
    return [rows.instance_from_row(r) for r in await sql.fetch(store._conn, query)]
