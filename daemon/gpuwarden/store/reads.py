"""The Store's reads that never wait on the writer: a second, read-only connection.

SQLite in WAL mode lets a reader see the last commit while the writer holds its transaction,
so `history`, `costs`, `jobs`, events and flags are answered without taking the writer's lock
(a burst of terminations no longer queues the control socket behind it). Each read is one
statement in autocommit, so it sees every write committed before it was asked.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import aiosqlite

from gpuwarden.core.clock import format_ts
from gpuwarden.core.model import (
    LIVE_INSTANCE_STATES,
    EntityKind,
    Event,
    Instance,
    InstanceState,
    Job,
    JobState,
    Termination,
)
from gpuwarden.store import rows, sql
from gpuwarden.store.live import LiveInstances


class StoreReads:
    """Reads on `_reader` (the Store opens it beside its writer connection)."""

    _reader: aiosqlite.Connection
    live: LiveInstances
    _ended_spend: tuple[tuple[datetime, datetime, int], tuple[float, float]] | None = None
    # Reads `status` makes on every call, kept until the table they read is written again:
    # (what, key) -> (the table's version before the read, the answer).
    _read_cache: dict[tuple[str, object], tuple[int, Any]]
    jobs_version: int
    flags_version: int

    async def get_instance(self, instance_id: str) -> Instance:
        """A live instance from memory; an ended one from the database."""
        found = self.live.get(instance_id)
        if found is not None:
            return found
        return await sql.instance(self._reader, instance_id)

    async def instances(self, states: Iterable[InstanceState] | None = None) -> list[Instance]:
        """In creation order. Live states only: from memory; else read from the database."""
        if states is not None:
            wanted = frozenset(states)
            if wanted <= LIVE_INSTANCE_STATES:
                return self.live.select(wanted)
        query, args = "SELECT * FROM instances", tuple[str, ...]()
        if states is not None:
            values = tuple(s.value for s in wanted)
            query += f" WHERE state IN ({', '.join('?' * len(values))})"
            args = values
        got = await sql.fetch(self._reader, query + " ORDER BY created_at", args)
        return [rows.instance_from_row(r) for r in got]

    async def has_instances(self) -> bool:
        """Whether any instance, live or ended, is on record."""
        return bool(await sql.fetch(self._reader, "SELECT 1 FROM instances LIMIT 1"))

    async def live_instances(self) -> list[Instance]:
        return self.live.select()

    async def find_instance(self, provider: str, provider_id: str) -> Instance | None:
        got = await sql.fetch(
            self._reader,
            "SELECT * FROM instances WHERE provider = ? AND provider_id = ?"
            " ORDER BY created_at DESC LIMIT 1",
            (provider, provider_id),
        )
        return rows.instance_from_row(got[0]) if got else None

    async def terminations(
        self, since: datetime, until: datetime | None = None
    ) -> list[Termination]:
        query = "SELECT * FROM terminations WHERE at >= ?"
        args: tuple[Any, ...] = (format_ts(since),)
        if until is not None:
            query += " AND at < ?"
            args += (format_ts(until),)
        got = await sql.fetch(self._reader, query + " ORDER BY at", args)
        return [rows.termination_from_row(r) for r in got]

    async def ended_spend(self, month: datetime, day: datetime) -> tuple[float, float]:
        """The cost in the termination records since `month` and since `day` (the budget's
        windows). Read again only when an instance has ended since, or a window moved: a
        month of records at 10,000 instances is hundreds of thousands of rows."""
        key = (month, day, self.live.ended)
        if self._ended_spend is None or self._ended_spend[0] != key:
            ended = await self.terminations(month)
            sums = (sum(t.cost for t in ended), sum(t.cost for t in ended if t.at >= day))
            self._ended_spend = (key, sums)
        return self._ended_spend[1]

    async def spot_terminations(self, since: datetime) -> list[tuple[Termination, dict[str, Any]]]:
        """Termination records of spot instances since `since`, each with its instance's
        spot details (extra["spot"]: bid, min_bid, on_demand_price)."""
        got = await sql.fetch(self._reader, sql.SPOT_TERMINATIONS, (format_ts(since),))
        return [rows.spot_termination_from_row(r) for r in got]

    async def jobs(
        self,
        states: Iterable[JobState] | None = None,
        limit: int = 1000,
        *,
        newest_first: bool = False,
    ) -> list[Job]:
        """In queue order (priority, then age), or the newest first (for people)."""
        query, args = "SELECT * FROM jobs", tuple[str, ...]()
        if states is not None:
            wanted = tuple(s.value for s in states)
            query += f" WHERE state IN ({', '.join('?' * len(wanted))})"
            args = wanted
        if newest_first:
            query += " ORDER BY created_at DESC, id DESC LIMIT ?"
        else:
            query += " ORDER BY priority DESC, created_at, id LIMIT ?"
        got = await sql.fetch(self._reader, query, (*args, limit))
        return [rows.job_from_row(r) for r in got]

    async def jobs_holding_instances(self, states: Iterable[JobState]) -> dict[str, str]:
        """Instance id -> the id of its job in one of `states`: every such job, not the first
        page (a fleet with more than a page of running jobs has that many busy instances),
        and only two columns (the guard asks on each pass)."""
        wanted = tuple(s.value for s in states)
        version, hit = self._read_cache.get(("holding", wanted), (-1, None))
        if hit is not None and version == self.jobs_version:
            return dict(hit)
        version = self.jobs_version  # before the read: a write during it makes this stale
        marks = ", ".join("?" * len(wanted))  # placeholders only: the values are bound
        query = "SELECT id, instance_id FROM jobs WHERE instance_id IS NOT NULL AND state IN "
        query += f"({marks})"
        got = await sql.fetch(self._reader, query, wanted)
        found = {str(r["instance_id"]): str(r["id"]) for r in got}
        self._read_cache[("holding", wanted)] = (version, found)
        return dict(found)

    async def jobs_with_id_prefix(self, prefix: str, limit: int = 10) -> list[Job]:
        """Jobs whose id starts with `prefix` (compared as text: no LIKE wildcards)."""
        query = "SELECT * FROM jobs WHERE substr(id, 1, ?) = ? ORDER BY id LIMIT ?"
        got = await sql.fetch(self._reader, query, (len(prefix), prefix, limit))
        return [rows.job_from_row(r) for r in got]

    async def events(
        self,
        *,
        since: datetime | None = None,
        kind: EntityKind | None = None,
        entity_id: str | None = None,
        after_id: int = 0,
        limit: int = 10_000,
        newest: bool = False,
        name: str | None = None,
    ) -> list[Event]:
        """Matching events, oldest first: the first `limit` of them, or with `newest` the
        last `limit` (the tail of a long log, without reading all of it)."""
        clauses, args = ["id > ?"], [after_id]
        if since is not None:
            clauses.append("at >= ?")
            args.append(format_ts(since))  # type: ignore[arg-type]
        if kind is not None:
            clauses.append("kind = ?")
            args.append(kind.value)  # type: ignore[arg-type]
        if entity_id is not None:
            clauses.append("entity_id = ?")
            args.append(entity_id)  # type: ignore[arg-type]
        if name is not None:
            clauses.append("name = ?")
            args.append(name)  # type: ignore[arg-type]
        order = "DESC" if newest else "ASC"
        query = f"SELECT * FROM events WHERE {' AND '.join(clauses)} ORDER BY id {order} LIMIT ?"  # noqa: S608
        got = await sql.fetch(self._reader, query, (*args, limit))
        found = [rows.event_from_row(r) for r in got]
        return found[::-1] if newest else found

    async def get_flag(self, key: str, default: Any = None) -> Any:
        version, raw = self._read_cache.get(("flag", key), (-1, None))
        if version != self.flags_version:
            version = self.flags_version  # before the read: a write during it makes this stale
            got = await sql.fetch(self._reader, "SELECT value FROM flags WHERE key = ?", (key,))
            raw = got[0]["value"] if got else None
            self._read_cache[("flag", key)] = (version, raw)
        return default if raw is None else json.loads(raw)
