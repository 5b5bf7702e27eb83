"""The writer's set-up, the read-only connection, and a COMMIT that a cancellation cannot
cut short: the connection-level pieces of the Store (db.py)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import aiosqlite

from gpuwarden.store.errors import StoreCorrupt


async def configure(conn: aiosqlite.Connection, busy_timeout_ms: int) -> None:
    """The writer's pragmas, then a quick check of the file (a damaged one: StoreCorrupt)."""
    for pragma in (
        "PRAGMA journal_mode=WAL",
        "PRAGMA synchronous=FULL",
        "PRAGMA foreign_keys=ON",
        f"PRAGMA busy_timeout={int(busy_timeout_ms)}",
    ):
        await conn.execute(pragma)
    async with conn.execute("PRAGMA quick_check") as cur:
        result = [r[0] for r in await cur.fetchall()]
    if result != ["ok"]:
        raise StoreCorrupt("database integrity check failed: " + "; ".join(result[:5]))


async def reader(path: Path | str, busy_timeout_ms: int) -> aiosqlite.Connection | None:
    """The read-only connection of reads.py, or None for a database in memory (a second
    connection would not see it: the writer's serves both)."""
    if str(path) == ":memory:" or str(path).startswith("file:"):
        return None
    conn = await aiosqlite.connect(str(path), isolation_level=None)
    conn.row_factory = sqlite3.Row
    try:
        await conn.execute("PRAGMA query_only=ON")
        await conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
    except BaseException:
        await conn.close()
        raise
    return conn


async def finish(commit: Awaitable[Any]) -> bool:
    """Await a COMMIT to its end; True if the caller's task was cancelled meanwhile.
    aiosqlite runs a queued statement whether or not anyone still waits for it, so a
    cancelled wait would leave a committed row that the memory view and the listeners
    never hear of."""
    task = asyncio.ensure_future(commit)
    cancelled = False
    while True:
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled():
                raise
            # The caller was cancelled. The COMMIT may have ended in the same turn of the
            # loop (then the next await returns its result or raises its error at once):
            # it is awaited to its end all the same, as a COMMIT still running is.
            cancelled = True
        except BaseException as exc:
            if cancelled:  # the COMMIT failed too: rolled back, and the cancellation goes on
                raise asyncio.CancelledError from exc
            raise
        else:
            return cancelled
