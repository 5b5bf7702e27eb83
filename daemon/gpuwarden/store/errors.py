"""What a SQLite error means for the daemon, and the store's own exceptions.

SQLite answers "database is locked" (SQLITE_BUSY) when another process holds the write lock
past `busy_timeout`: nothing is wrong with the disk or the file, and acting as on a full disk
or a corrupt file (an operator might move the database aside) would be wrong. A file that is
not a database or is damaged (SQLITE_NOTADB, SQLITE_CORRUPT) is corrupt. Anything else (a
full disk, an I/O error, a path that cannot be opened) leaves the file as it was. The kind is
read from the error's SQLite code, or from SQLite's own message when the error carries none.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Literal

Kind = Literal["busy", "corrupt", "other"]

_BUSY = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})
_CORRUPT = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})


class StoreWriteFailed(Exception):
    """A write could not be committed (the disk is full, an I/O error): nothing of it was
    written. Callers that must act anyway (ending a GPU) act and write it later."""


class StoreBusy(StoreWriteFailed):
    """Another process holds the database's write lock (an `sqlite3` shell, a backup tool):
    nothing was written, the file is fine, and a later try may pass."""


class StoreCorrupt(Exception):
    """The file is not a database, or a damaged one."""


class StoreUnavailable(Exception):
    """The database cannot be opened or used now (a full disk, an I/O error, a path that
    cannot be opened); nothing says its contents are damaged."""


def kind(exc: sqlite3.Error) -> Kind:
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        primary = code & 0xFF  # the extended codes keep the primary one in the low byte
        return "busy" if primary in _BUSY else "corrupt" if primary in _CORRUPT else "other"
    text = str(exc).lower()
    if "is locked" in text or "is busy" in text:
        return "busy"
    if "not a database" in text or "malformed" in text:
        return "corrupt"
    return "other"


def busy_message(exc: sqlite3.Error) -> str:
    return (
        f"another process holds the database's write lock ({exc}); the daemon holds the state"
        " directory's lock, so it is not a daemon: an sqlite3 shell or a backup tool?"
    )


def write_failed(exc: sqlite3.OperationalError) -> StoreWriteFailed:
    """What a failed write raises: StoreBusy for a lock another process holds."""
    return StoreBusy(busy_message(exc)) if kind(exc) == "busy" else StoreWriteFailed(str(exc))


def open_failed(path: Path | str, exc: sqlite3.Error) -> Exception:
    """What a failure to open (or check, or migrate) the database at `path` raises."""
    found = kind(exc)
    if found == "busy":
        return StoreBusy(f"{path}: {busy_message(exc)}")
    if found == "corrupt":
        return StoreCorrupt(f"{path}: {exc}")
    return StoreUnavailable(f"{path}: {exc}")
