"""The SQLite store: one writer connection behind a lock, every state change with its event.

Rules this module keeps, so the rest of the daemon cannot break them:
- every state change goes through `transition_instance` / `transition_job`, which check the
  state machine of model.py and write the row and its event in one `BEGIN IMMEDIATE`
  transaction; an illegal transition raises and writes nothing;
- nothing awaits the network inside a transaction (callers only pass values in);
- the event log is append-only (triggers refuse UPDATE and DELETE).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import aiosqlite

from gpuwarden.core import policy
from gpuwarden.core.clock import Clock, format_ts
from gpuwarden.core.model import (
    INSTANCE_TRANSITIONS,
    JOB_TRANSITIONS,
    LIVE_INSTANCE_STATES,
    EntityKind,
    Event,
    Instance,
    InstanceState,
    Job,
    JobState,
    Termination,
    TerminationReason,
)
from gpuwarden.store import migrations, rows, sql
from gpuwarden.store.sql import NotFoundError


class IllegalTransition(Exception):
    """A state change the state machine does not allow. Nothing was written."""


class StoreWriteFailed(Exception):
    """A write could not be committed (the disk is full, an I/O error): nothing of it was
    written. Callers that must act anyway (ending a GPU) act and write it later."""


class StoreCorrupt(Exception):
    pass


Listener = Callable[[Event], None]


class Store:
    """Use `await Store.open(path, clock)`; close with `await store.close()`."""

    def __init__(self, conn: aiosqlite.Connection, clock: Clock) -> None:
        self._conn = conn
        self._clock = clock
        self._lock = asyncio.Lock()
        self._listeners: list[Listener] = []
        self._pending: list[Event] = []

    # --- lifecycle -------------------------------------------------------------------

    @classmethod
    async def open(cls, path: Path | str, clock: Clock) -> Store:
        try:
            conn = await aiosqlite.connect(str(path), isolation_level=None)
        except sqlite3.Error as exc:  # a directory we may not write, a path that is a folder
            raise StoreCorrupt(f"{path}: cannot open: {exc}") from exc
        conn.row_factory = sqlite3.Row
        store = cls(conn, clock)
        try:
            await store._configure()
            await store.migrate()
        except sqlite3.DatabaseError as exc:
            # A truncated or overwritten file fails here ("file is not a database"), before
            # the integrity check could say so: the same clear refusal, not a traceback.
            await conn.close()
            raise StoreCorrupt(f"{path}: {exc}") from exc
        except BaseException:
            await conn.close()
            raise
        return store

    async def _configure(self) -> None:
        for pragma in (
            "PRAGMA journal_mode=WAL",
            "PRAGMA synchronous=FULL",
            "PRAGMA foreign_keys=ON",
            "PRAGMA busy_timeout=5000",
        ):
            await self._conn.execute(pragma)
        async with self._conn.execute("PRAGMA quick_check") as cur:
            result = [r[0] for r in await cur.fetchall()]
        if result != ["ok"]:
            raise StoreCorrupt("database integrity check failed: " + "; ".join(result[:5]))

    async def migrate(self) -> int:
        """Apply pending migrations; returns the schema version. Re-running is a no-op."""
        async with self._lock:
            return await migrations.apply(self._conn)

    async def close(self) -> None:
        await self._conn.close()

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call `listener(event)` after each commit, once per event written. Returns unsubscribe."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    # --- transactions ----------------------------------------------------------------

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """BEGIN IMMEDIATE under the writer lock. Pass values in; never await the network here."""
        async with self._lock:
            self._pending = []
            try:
                await self._conn.execute("BEGIN IMMEDIATE")
                yield self._conn
                await self._conn.execute("COMMIT")
            except BaseException as exc:
                # SQLite may have rolled back already (SQLITE_FULL does); a failed COMMIT must
                # not leave the connection inside a transaction that no later BEGIN can start.
                if self._conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        await self._conn.execute("ROLLBACK")
                self._pending = []
                if isinstance(exc, sqlite3.OperationalError):
                    raise StoreWriteFailed(str(exc)) from exc
                raise
            written, self._pending = self._pending, []
        for event in written:
            for listener in list(self._listeners):
                listener(event)

    async def _event(
        self,
        conn: aiosqlite.Connection,
        kind: EntityKind,
        entity_id: str,
        name: str,
        *,
        from_state: str | None = None,
        to_state: str | None = None,
        reason: str | None = None,
        details: Mapping[str, Any] | None = None,
        at: datetime | None = None,
    ) -> Event:
        when = at or self._clock.now()
        body = dict(details or {})
        cur = await conn.execute(
            "INSERT INTO events (at, kind, entity_id, name, from_state, to_state, reason, details)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                format_ts(when),
                kind.value,
                entity_id,
                name,
                from_state,
                to_state,
                reason,
                json.dumps(body, sort_keys=True, default=str),
            ),
        )
        ev = Event(
            id=int(cur.lastrowid or 0),
            at=when,
            kind=kind,
            entity_id=entity_id,
            name=name,
            from_state=from_state,
            to_state=to_state,
            reason=reason,
            details=body,
        )
        self._pending.append(ev)
        return ev

    async def record(
        self,
        kind: EntityKind,
        entity_id: str,
        name: str,
        details: Mapping[str, Any] | None = None,
        *,
        reason: str | None = None,
        updates: Mapping[str, Any] | None = None,
    ) -> Event:
        """An event that is not a state change (an extension, a strike, progress), optionally
        with field updates to the entity in the same transaction."""
        async with self.transaction() as conn:
            if updates:
                table = "instances" if kind is EntityKind.INSTANCE else "jobs"
                await sql.update(conn, table, entity_id, updates)
            return await self._event(conn, kind, entity_id, name, reason=reason, details=details)

    # --- instances -------------------------------------------------------------------

    async def insert_instance(
        self, inst: Instance, details: Mapping[str, Any] | None = None
    ) -> None:
        """The intent row: committed before the provider is called."""
        cols = rows.columns(inst)
        async with self.transaction() as conn:
            await sql.insert(conn, "instances", cols)
            await self._event(
                conn,
                EntityKind.INSTANCE,
                inst.id,
                "state",
                to_state=inst.state.value,
                details={"provider": inst.provider, "label": inst.label, **(details or {})},
            )

    async def transition_instance(
        self,
        instance_id: str,
        to: InstanceState,
        *,
        reason: TerminationReason | None = None,
        details: Mapping[str, Any] | None = None,
        **fields: Any,
    ) -> Instance:
        """Check the transition, write the new state, its fields and one event, atomically.

        Going to TERMINATED also writes the termination record (uptime and cost to now, as
        policy.termination_of figures them: the store records money, it does not compute it)."""
        now = self._clock.now()
        async with self.transaction() as conn:
            current = await self._instance(conn, instance_id)
            if to not in INSTANCE_TRANSITIONS[current.state]:
                raise IllegalTransition(f"instance {instance_id}: {current.state} -> {to}")
            updates: dict[str, Any] = {"state": to.value, **fields}
            if reason is not None:
                updates["reason"] = reason.value
            stamp = {
                InstanceState.RUNNING: "running_at",
                InstanceState.TERMINATING: "terminating_at",
                InstanceState.TERMINATED: "terminated_at",
                InstanceState.LAUNCH_FAILED: "terminated_at",
            }.get(to)
            if stamp and stamp not in updates:
                updates[stamp] = now
            await sql.update(conn, "instances", instance_id, updates)
            after = await self._instance(conn, instance_id)
            body = dict(details or {})
            if to in (InstanceState.TERMINATED, InstanceState.LAUNCH_FAILED):
                term = policy.termination_of(after, now)
                body |= {
                    "provider_id": term.provider_id,
                    "uptime_s": term.uptime_s,
                    "gpu": term.gpu,
                    "region": term.region,
                    "price_per_hour": term.price_per_hour,
                    "cost": term.cost,
                }
                if to is InstanceState.TERMINATED:
                    await sql.insert(conn, "terminations", rows.columns(term), replace=True)
            await self._event(
                conn,
                EntityKind.INSTANCE,
                instance_id,
                "state",
                from_state=current.state.value,
                to_state=to.value,
                reason=after.reason.value if after.reason else None,
                details=body,
                at=now,
            )
            return after

    async def update_instance(self, instance_id: str, **fields: Any) -> Instance:
        """Change fields that are not the state (probe results, SSH endpoint). No event:
        callers that want one use `record(..., updates=...)`."""
        if "state" in fields:
            raise IllegalTransition("use transition_instance to change the state")
        async with self.transaction() as conn:
            await sql.update(conn, "instances", instance_id, fields)
            return await self._instance(conn, instance_id)

    async def get_instance(self, instance_id: str) -> Instance:
        async with self._lock:
            return await self._instance(self._conn, instance_id)

    async def find_instance(self, provider: str, provider_id: str) -> Instance | None:
        async with self._lock:
            got = await sql.fetch(
                self._conn,
                "SELECT * FROM instances WHERE provider = ? AND provider_id = ?"
                " ORDER BY created_at DESC LIMIT 1",
                (provider, provider_id),
            )
        return rows.instance_from_row(got[0]) if got else None

    async def instances(self, states: Iterable[InstanceState] | None = None) -> list[Instance]:
        query, args = "SELECT * FROM instances", tuple[str, ...]()
        if states is not None:
            wanted = tuple(s.value for s in states)
            query += f" WHERE state IN ({', '.join('?' * len(wanted))})"
            args = wanted
        async with self._lock:
            got = await sql.fetch(self._conn, query + " ORDER BY created_at", args)
        return [rows.instance_from_row(r) for r in got]

    async def live_instances(self) -> list[Instance]:
        return await self.instances(LIVE_INSTANCE_STATES)

    async def _instance(self, conn: aiosqlite.Connection, instance_id: str) -> Instance:
        got = await sql.fetch(conn, "SELECT * FROM instances WHERE id = ?", (instance_id,))
        if not got:
            raise NotFoundError(f"no instance {instance_id}")
        return rows.instance_from_row(got[0])

    async def terminations(
        self, since: datetime, until: datetime | None = None
    ) -> list[Termination]:
        query = "SELECT * FROM terminations WHERE at >= ?"
        args: tuple[Any, ...] = (format_ts(since),)
        if until is not None:
            query += " AND at < ?"
            args += (format_ts(until),)
        async with self._lock:
            got = await sql.fetch(self._conn, query + " ORDER BY at", args)
        return [rows.termination_from_row(r) for r in got]

    async def spot_terminations(self, since: datetime) -> list[tuple[Termination, dict[str, Any]]]:
        """Termination records of spot instances since `since`, each with its instance's
        spot details (extra["spot"]: bid, min_bid, on_demand_price)."""
        async with self._lock:
            got = await sql.fetch(self._conn, sql.SPOT_TERMINATIONS, (format_ts(since),))
        return [rows.spot_termination_from_row(r) for r in got]

    # --- jobs ------------------------------------------------------------------------

    async def insert_job(self, job: Job, details: Mapping[str, Any] | None = None) -> None:
        cols = rows.columns(job)
        async with self.transaction() as conn:
            await sql.insert(conn, "jobs", cols)
            await self._event(
                conn, EntityKind.JOB, job.id, "state", to_state=job.state.value, details=details
            )

    async def transition_job(
        self,
        job_id: str,
        to: JobState,
        *,
        reason: str | None = None,
        details: Mapping[str, Any] | None = None,
        **fields: Any,
    ) -> Job:
        now = self._clock.now()
        async with self.transaction() as conn:
            current = await self._job(conn, job_id)
            if to not in JOB_TRANSITIONS[current.state]:
                raise IllegalTransition(f"job {job_id}: {current.state} -> {to}")
            updates: dict[str, Any] = {"state": to.value, "updated_at": now, **fields}
            if to.terminal and "finished_at" not in updates:
                updates["finished_at"] = now
            await sql.update(conn, "jobs", job_id, updates)
            await self._event(
                conn,
                EntityKind.JOB,
                job_id,
                "state",
                from_state=current.state.value,
                to_state=to.value,
                reason=reason,
                details=details,
                at=now,
            )
            return await self._job(conn, job_id)

    async def update_job(self, job_id: str, **fields: Any) -> Job:
        if "state" in fields:
            raise IllegalTransition("use transition_job to change the state")
        async with self.transaction() as conn:
            await sql.update(conn, "jobs", job_id, {"updated_at": self._clock.now(), **fields})
            return await self._job(conn, job_id)

    async def get_job(self, job_id: str) -> Job:
        async with self._lock:
            return await self._job(self._conn, job_id)

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
        async with self._lock:
            got = await sql.fetch(self._conn, query, (*args, limit))
        return [rows.job_from_row(r) for r in got]

    async def jobs_with_id_prefix(self, prefix: str, limit: int = 10) -> list[Job]:
        """Jobs whose id starts with `prefix` (compared as text: no LIKE wildcards)."""
        query = "SELECT * FROM jobs WHERE substr(id, 1, ?) = ? ORDER BY id LIMIT ?"
        async with self._lock:
            got = await sql.fetch(self._conn, query, (len(prefix), prefix, limit))
        return [rows.job_from_row(r) for r in got]

    async def _job(self, conn: aiosqlite.Connection, job_id: str) -> Job:
        got = await sql.fetch(conn, "SELECT * FROM jobs WHERE id = ?", (job_id,))
        if not got:
            raise NotFoundError(f"no job {job_id}")
        return rows.job_from_row(got[0])

    # --- events and flags ------------------------------------------------------------

    async def events(
        self,
        *,
        since: datetime | None = None,
        kind: EntityKind | None = None,
        entity_id: str | None = None,
        after_id: int = 0,
        limit: int = 10_000,
        newest: bool = False,
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
        order = "DESC" if newest else "ASC"
        query = f"SELECT * FROM events WHERE {' AND '.join(clauses)} ORDER BY id {order} LIMIT ?"  # noqa: S608
        async with self._lock:
            got = await sql.fetch(self._conn, query, (*args, limit))
        found = [rows.event_from_row(r) for r in got]
        return found[::-1] if newest else found

    async def get_flag(self, key: str, default: Any = None) -> Any:
        async with self._lock:
            got = await sql.fetch(self._conn, "SELECT value FROM flags WHERE key = ?", (key,))
        return json.loads(got[0]["value"]) if got else default

    async def set_flag(
        self,
        key: str,
        value: Any,
        *,
        reason: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        """Daemon-wide state (queue paused, ...), with an event so it is on record."""
        async with self.transaction() as conn:
            await conn.execute(
                "INSERT INTO flags (key, value) VALUES (?, ?)"
                " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, json.dumps(value)),
            )
            await self._event(
                conn,
                EntityKind.DAEMON,
                key,
                "flag",
                reason=reason,
                details={**(details or {}), "value": value},
            )

    async def vacuum_into(self, target: Path) -> None:
        """A consistent copy of the database while the daemon runs."""
        async with self._lock:
            await self._conn.execute("VACUUM INTO ?", (str(target),))
