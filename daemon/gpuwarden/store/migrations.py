"""Schema migrations, applied by PRAGMA user_version, each step in one transaction.

Append a step; never edit one that has shipped. A step runs only when user_version is
below its number, and sets user_version inside the same transaction, so a crash mid-step
leaves the old version and a re-run is a no-op.
"""

from __future__ import annotations

import sqlite3

import aiosqlite

MIGRATIONS: list[str] = [
    # 1: instances, jobs, the append-only event log, terminations, flags
    """
    CREATE TABLE instances (
        id                  TEXT PRIMARY KEY,
        provider            TEXT NOT NULL,
        provider_id         TEXT,
        label               TEXT NOT NULL UNIQUE,
        state               TEXT NOT NULL,
        reason              TEXT,
        offer_id            TEXT NOT NULL DEFAULT '',
        gpu                 TEXT NOT NULL DEFAULT '',
        num_gpus            INTEGER NOT NULL DEFAULT 1,
        region              TEXT NOT NULL DEFAULT '',
        price_per_hour      REAL NOT NULL,
        billing             TEXT NOT NULL,
        created_at          TEXT NOT NULL,
        lease_until         TEXT NOT NULL,
        last_activity       TEXT NOT NULL,
        provider_started_at TEXT,
        running_at          TEXT,
        terminating_at      TEXT,
        terminated_at       TEXT,
        ssh_host            TEXT,
        ssh_port            INTEGER,
        ssh_user            TEXT NOT NULL DEFAULT 'root',
        strikes             INTEGER NOT NULL DEFAULT 0,
        last_probe_at       TEXT,
        last_probe_ok       INTEGER,
        job_id              TEXT,
        extra               TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX instances_state ON instances(state);
    CREATE INDEX instances_provider_id ON instances(provider, provider_id);

    CREATE TABLE jobs (
        id             TEXT PRIMARY KEY,
        state          TEXT NOT NULL,
        spec           TEXT NOT NULL,
        priority       INTEGER NOT NULL DEFAULT 0,
        attempt        INTEGER NOT NULL DEFAULT 0,
        instance_id    TEXT REFERENCES instances(id),
        created_at     TEXT NOT NULL,
        updated_at     TEXT NOT NULL,
        started_at     TEXT,
        finished_at    TEXT,
        progress_step  INTEGER NOT NULL DEFAULT 0,
        progress_total INTEGER NOT NULL DEFAULT 0,
        error          TEXT,
        outputs        TEXT NOT NULL DEFAULT '[]',
        gpu_seconds    REAL NOT NULL DEFAULT 0,
        cost           REAL NOT NULL DEFAULT 0,
        extra          TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX jobs_queue ON jobs(state, priority DESC, created_at);

    CREATE TABLE events (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        at          TEXT NOT NULL,
        kind        TEXT NOT NULL,
        entity_id   TEXT NOT NULL,
        name        TEXT NOT NULL,
        from_state  TEXT,
        to_state    TEXT,
        reason      TEXT,
        details     TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX events_entity ON events(kind, entity_id, id);
    CREATE INDEX events_at ON events(at);
    CREATE TRIGGER events_no_update BEFORE UPDATE ON events
        BEGIN SELECT RAISE(ABORT, 'the event log is append-only'); END;
    CREATE TRIGGER events_no_delete BEFORE DELETE ON events
        BEGIN SELECT RAISE(ABORT, 'the event log is append-only'); END;

    CREATE TABLE terminations (
        instance_id    TEXT PRIMARY KEY REFERENCES instances(id),
        at             TEXT NOT NULL,
        provider       TEXT NOT NULL,
        provider_id    TEXT,
        reason         TEXT NOT NULL,
        uptime_s       REAL NOT NULL,
        gpu            TEXT NOT NULL,
        region         TEXT NOT NULL,
        price_per_hour REAL NOT NULL,
        cost           REAL NOT NULL
    );
    CREATE INDEX terminations_at ON terminations(at);

    CREATE TABLE flags (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    """,
    # 2: jobs_newest. `jobs.list` without a state lists the newest first; with 100,000 jobs
    # in the table, no index served that ORDER BY and every call sorted them all.
    """
    CREATE INDEX jobs_newest ON jobs(created_at DESC, id DESC);
    """,
]


async def apply(conn: aiosqlite.Connection) -> int:
    """Apply the pending steps; returns the schema version. Re-running is a no-op. The
    caller holds the connection alone (the Store's writer lock)."""
    for version, script in enumerate(MIGRATIONS, start=1):
        async with conn.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        current = int(row[0]) if row else 0
        if current >= version:
            continue
        # executescript would COMMIT first; run statements one by one in our txn.
        await conn.execute("BEGIN IMMEDIATE")
        try:
            for stmt in _statements(script):
                await conn.execute(stmt)
            await conn.execute(f"PRAGMA user_version = {version}")
            await conn.execute("COMMIT")
        except BaseException:
            await conn.execute("ROLLBACK")
            raise
    return len(MIGRATIONS)


def _statements(script: str) -> list[str]:
    """Split a migration script into statements (triggers hold ';' inside BEGIN ... END)."""
    out: list[str] = []
    buf = ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            if buf.strip():
                out.append(buf.strip())
            buf = ""
    if buf.strip():
        out.append(buf.strip())
    return out
