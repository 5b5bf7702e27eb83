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
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import aiosqlite

from gpuwarden.core.clock import Clock, format_ts
from gpuwarden.core.model import (
    JOB_TRANSITIONS,
    LIVE_INSTANCE_STATES,
    EntityKind,
    Event,
    Instance,
    InstanceState,
    Job,
    JobState,
    TerminationReason,
)
from gpuwarden.store import connect, errors, migrations, rows, sql, transitions
from gpuwarden.store.live import LiveInstances
from gpuwarden.store.reads import StoreReads
from gpuwarden.store.sql import IllegalTransition, NotFoundError
from gpuwarden.store.transitions import Transition

Listener = Callable[[Event], None]

BUSY_TIMEOUT_MS = 5000  # SQLite retries a locked database this long before it says so


_LIVE_QUERY = "SELECT * FROM instances WHERE state IN ({})".format(  # noqa: S608 - our own values
    ", ".join(f"'{s.value}'" for s in sorted(LIVE_INSTANCE_STATES))
)


class Store(StoreReads):
    """Use `await Store.open(path, clock)`; close with `await store.close()`."""

    def __init__(
        self, conn: aiosqlite.Connection, clock: Clock, reader: aiosqlite.Connection | None = None
    ) -> None:
        self._conn = conn
        self._reader = reader or conn
        self._clock = clock
        self._lock = asyncio.Lock()
        self._listeners: list[Listener] = []
        self._pending: list[Event] = []
        # The live instances in memory, and the rows a transaction changed (applied after
        # its COMMIT, dropped with a rollback).
        self.live = LiveInstances()
        self._staged: list[Instance] = []
        self._committed: list[Event] = []  # events of the last commit, for the listeners
        self._queued: list[Transition] = []  # state changes waiting for the writer
        # Moves after every committed write to the jobs table (readers cache the queue on it),
        # and to the flags table (reads.py caches the flags on it).
        self.jobs_version = self.flags_version = 0
        self._commits = 0  # transactions committed: whether a cancelled one was written
        self._read_cache: dict[tuple[str, object], tuple[int, Any]] = {}

    # --- lifecycle -------------------------------------------------------------------

    @classmethod
    async def open(
        cls, path: Path | str, clock: Clock, *, busy_timeout_ms: int | None = None
    ) -> Store:
        """`busy_timeout_ms` (BUSY_TIMEOUT_MS unless given): how long a statement waits for a
        lock another process holds before it fails (StoreBusy)."""
        busy_timeout_ms = BUSY_TIMEOUT_MS if busy_timeout_ms is None else busy_timeout_ms
        try:
            conn = await aiosqlite.connect(
                str(path), isolation_level=None, timeout=busy_timeout_ms / 1000
            )
        except sqlite3.Error as exc:  # a directory we may not write, a path that is a folder
            raise errors.open_failed(path, exc) from exc
        conn.row_factory = sqlite3.Row
        store = cls(conn, clock)
        try:
            await connect.configure(conn, busy_timeout_ms)
            await store.migrate()
            store._reader = await connect.reader(path, busy_timeout_ms) or conn
            store.live.load(
                rows.instance_from_row(r)
                for r in await sql.fetch(conn, _LIVE_QUERY + " ORDER BY created_at, rowid")
            )
        except sqlite3.DatabaseError as exc:
            # A truncated or overwritten file fails here ("file is not a database"), before
            # the integrity check could say so: the same clear refusal, not a traceback. A
            # lock another process holds, or a full disk, fails here too: not corruption.
            await conn.close()
            raise errors.open_failed(path, exc) from exc
        except BaseException:
            await store.close()
            raise
        return store

    async def migrate(self) -> int:
        """Apply pending migrations; returns the schema version. Re-running is a no-op."""
        async with self._lock:
            return await migrations.apply(self._conn)

    async def close(self) -> None:
        if self._reader is not self._conn:
            await self._reader.close()
        await self._conn.close()

    async def writes_done(self) -> None:
        """Return once every write queued before this call has committed, and every read
        queued on the read-only connection has answered (its thread runs them in order).
        Tests that step a fake clock wait on this: a read still in flight when the clock
        stepped on made a loop see the time jump past a deadline it was polling for."""
        async with self._lock:
            pass
        if self._reader is not self._conn:
            await self._reader.execute("SELECT 1")

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call `listener(event)` after each commit, once per event written. Returns unsubscribe."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    # --- transactions ----------------------------------------------------------------

    @asynccontextmanager
    async def transaction(
        self, *, jobs: bool = False, flags: bool = False
    ) -> AsyncIterator[aiosqlite.Connection]:
        """BEGIN IMMEDIATE under the writer lock. Pass values in; never await the network here.
        `jobs`, `flags`: it writes that table, so the reads kept from it are stale once it
        commits (the versions move before any listener hears, even if the caller's task
        was cancelled while the commit finished)."""
        before = self._commits
        try:
            async with self._lock, self._begin() as conn:
                yield conn
        finally:
            if self._commits != before:
                self.jobs_version += jobs
                self.flags_version += flags
            self._notify()

    @asynccontextmanager
    async def _jobs_transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self.transaction(jobs=True) as conn:
            yield conn

    @asynccontextmanager
    async def _begin(self) -> AsyncIterator[aiosqlite.Connection]:
        """One transaction; the caller holds the lock and calls `_notify` after releasing it."""
        self._pending = []
        self._staged = []
        try:
            await self._conn.execute("BEGIN IMMEDIATE")
            yield self._conn
            cancelled = await connect.finish(self._conn.execute("COMMIT"))
        except BaseException as exc:
            # SQLite may have rolled back already (SQLITE_FULL does); a failed COMMIT must
            # not leave the connection inside a transaction that no later BEGIN can start.
            if self._conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    await self._conn.execute("ROLLBACK")
            self._pending = []
            self._staged = []
            if isinstance(exc, sqlite3.OperationalError):
                raise errors.write_failed(exc) from exc
            raise
        self._committed += self._pending
        self._pending = []
        for inst in self._staged:
            self.live.apply(inst)
        self._staged = []
        self._commits += 1
        if cancelled:  # written, and the memory view says so: now the caller's cancellation
            raise asyncio.CancelledError

    def _notify(self) -> None:
        written, self._committed = self._committed, []
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
        jobs = kind is not EntityKind.INSTANCE and bool(updates)
        async with self.transaction(jobs=jobs) as conn:
            if updates:
                table = "instances" if kind is EntityKind.INSTANCE else "jobs"
                await sql.update(conn, table, entity_id, updates)
                if kind is EntityKind.INSTANCE:
                    self._staged.append(await sql.instance(conn, entity_id))
            event = await self._event(conn, kind, entity_id, name, reason=reason, details=details)
        return event

    # --- instances -------------------------------------------------------------------

    async def insert_instance(
        self, inst: Instance, details: Mapping[str, Any] | None = None
    ) -> None:
        """The intent row: committed before the provider is called."""
        cols = rows.columns(inst)
        async with self.transaction() as conn:
            await sql.insert(conn, "instances", cols)
            self._staged.append(await sql.instance(conn, inst.id))
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
        policy.termination_of figures them: the store records money, it does not compute it).

        Group commit: the changes asked for while the writer is busy are written together
        in its next transaction, each in a savepoint of its own (an illegal one writes
        nothing and raises for its caller alone), so a burst of 1,000 deadlines costs a few
        fsyncs instead of 1,000. Each call still returns only after its change committed."""
        req = Transition(
            instance_id,
            to,
            reason,
            details,
            fields,
            self._clock.now(),
            asyncio.get_running_loop().create_future(),
        )
        self._queued.append(req)
        try:
            await self._lock.acquire()
        except asyncio.CancelledError:
            if req in self._queued:  # not written: nobody took it into a batch yet
                self._queued.remove(req)
            raise
        try:
            if not req.done.done():  # else an earlier holder wrote it with its own batch
                await self._write_batch(req)
        finally:
            self._lock.release()
            self._notify()  # what committed is heard, even when the caller was cancelled
        return req.done.result()

    async def _write_batch(self, req: Transition) -> None:
        batch, self._queued = self._queued, []
        before = self._commits
        try:
            async with self._begin() as conn:
                for one in batch:
                    await self._transition_one(conn, one, alone=len(batch) == 1)
        except BaseException:
            if self._commits != before:
                raise  # committed, then cancelled: every change of the batch is written
            # Rolled back (the disk, a cancellation): the others' changes were not written
            # either, so they go back in the queue and their callers write them themselves.
            loop = asyncio.get_running_loop()
            for one in batch:
                if one is not req:
                    one.done = loop.create_future()
                    self._queued.append(one)
            raise

    async def _transition_one(
        self, conn: aiosqlite.Connection, req: Transition, *, alone: bool
    ) -> None:
        """One change of a batch; its result (or its own error) goes to its caller."""
        if alone:
            req.done.set_result(await self._transition(conn, req))
            return
        events, staged = len(self._pending), len(self._staged)
        await conn.execute("SAVEPOINT one")
        try:
            after = await self._transition(conn, req)
        except (IllegalTransition, NotFoundError) as exc:
            await conn.execute("ROLLBACK TO one")
            await conn.execute("RELEASE one")
            del self._pending[events:], self._staged[staged:]
            req.done.set_exception(exc)
            return
        await conn.execute("RELEASE one")
        req.done.set_result(after)

    async def _transition(self, conn: aiosqlite.Connection, req: Transition) -> Instance:
        current, after, body = await transitions.write(conn, req)
        self._staged.append(after)
        await self._event(
            conn,
            EntityKind.INSTANCE,
            req.instance_id,
            "state",
            from_state=current.state.value,
            to_state=req.to.value,
            reason=after.reason.value if after.reason else None,
            details=body,
            at=req.now,
        )
        return after

    async def update_instance(self, instance_id: str, **fields: Any) -> Instance:
        """Change fields that are not the state (probe results, SSH endpoint). No event:
        callers that want one use `record(..., updates=...)`."""
        return (await self.update_instances({instance_id: fields}))[0]

    async def update_instances(self, changes: Mapping[str, Mapping[str, Any]]) -> list[Instance]:
        """`update_instance` for many in one transaction (one fsync, however many rows: the
        watchdog's routine probe times)."""
        if any("state" in fields for fields in changes.values()):
            raise IllegalTransition("use transition_instance to change the state")
        async with self.transaction() as conn:
            for instance_id, fields in changes.items():
                await sql.update(conn, "instances", instance_id, fields)
                self._staged.append(await sql.instance(conn, instance_id))
            return self._staged[-len(changes) :] if changes else []

    # --- jobs ------------------------------------------------------------------------

    async def insert_job(self, job: Job, details: Mapping[str, Any] | None = None) -> None:
        cols = rows.columns(job)
        async with self._jobs_transaction() as conn:
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
        async with self._jobs_transaction() as conn:
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
        async with self._jobs_transaction() as conn:
            await sql.update(conn, "jobs", job_id, {"updated_at": self._clock.now(), **fields})
            return await self._job(conn, job_id)

    async def get_job(self, job_id: str) -> Job:
        return await self._job(self._reader, job_id)

    async def _job(self, conn: aiosqlite.Connection, job_id: str) -> Job:
        got = await sql.fetch(conn, "SELECT * FROM jobs WHERE id = ?", (job_id,))
        if not got:
            raise NotFoundError(f"no job {job_id}")
        return rows.job_from_row(got[0])

    # --- events and flags ------------------------------------------------------------

    async def set_flag(
        self,
        key: str,
        value: Any,
        *,
        reason: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        """Daemon-wide state (queue paused, ...), with an event so it is on record."""
        async with self.transaction(flags=True) as conn:
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
