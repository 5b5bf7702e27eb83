"""Statements on an open connection, without locking or events: the Store runs them inside
its transactions (or under its lock), where the rules of db.py are kept."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping
from typing import Any

import aiosqlite

from gpuwarden.store import rows


class NotFoundError(KeyError):
    pass


_COLUMN_OK = frozenset("abcdefghijklmnopqrstuvwxyz_")


def _check_columns(names: Iterable[str]) -> None:
    for name in names:
        if not set(name) <= _COLUMN_OK:  # column names come from code, never from users
            raise ValueError(f"bad column name {name!r}")


async def fetch(
    conn: aiosqlite.Connection, sql: str, args: Iterable[Any] = ()
) -> list[sqlite3.Row]:
    async with conn.execute(sql, tuple(args)) as cur:
        return list(await cur.fetchall())


async def insert(
    conn: aiosqlite.Connection, table: str, cols: Mapping[str, Any], *, replace: bool = False
) -> None:
    """One row from column values already in their stored form (see rows.py)."""
    _check_columns(cols)
    verb = "INSERT OR REPLACE" if replace else "INSERT"
    await conn.execute(
        f"{verb} INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
        tuple(cols.values()),
    )


async def update(
    conn: aiosqlite.Connection, table: str, entity_id: str, fields: Mapping[str, Any]
) -> None:
    if not fields:
        return
    _check_columns(fields)
    assigns = ", ".join(f"{name} = ?" for name in fields)
    values = [rows.to_column(k, v) for k, v in fields.items()]
    cur = await conn.execute(
        f"UPDATE {table} SET {assigns} WHERE id = ?",  # noqa: S608
        (*values, entity_id),
    )
    if cur.rowcount == 0:
        raise NotFoundError(f"no {table[:-1]} {entity_id}")


# Termination records of spot instances (those whose row has extra["spot"]) since a time.
SPOT_TERMINATIONS = (
    "SELECT t.*, json_extract(i.extra, '$.spot') AS spot FROM terminations t"
    " JOIN instances i ON i.id = t.instance_id"
    " WHERE t.at >= ? AND json_extract(i.extra, '$.spot') IS NOT NULL ORDER BY t.at"
)
