"""Which installation label this daemon's instances carry (`gpuwarden-<installation>-<id>`).

Two daemons on one provider account with the same label would each take the other's
instances for orphans and end them, so the label is unique per state dir unless the config
sets `daemon.installation` on purpose: generated at the first start (8 hex digits) and kept
in the database's flags, so it survives restarts and is found by `reap`. A database that
already holds instances from before keeps "main", the label they were launched with.
"""

from __future__ import annotations

import json
import re
import secrets
import sqlite3
from pathlib import Path

import structlog

from gpuwarden.config.settings import Settings
from gpuwarden.core.model import INSTALLATION_FLAG, LEGACY_INSTALLATION
from gpuwarden.store import Store

log = structlog.get_logger(__name__)

_VALID = re.compile(r"[a-z0-9][a-z0-9-]{0,30}")


def set_on_purpose(settings: Settings) -> bool:
    """Whether the config (file or environment) names the installation."""
    return "installation" in settings.daemon.model_fields_set


async def resolve(store: Store, settings: Settings) -> str:
    """The label in force for this state dir; generated and stored on the first start."""
    if set_on_purpose(settings):
        return settings.daemon.installation
    kept = await store.get_flag(INSTALLATION_FLAG)
    if isinstance(kept, str) and _VALID.fullmatch(kept):
        return kept
    if await store.has_instances():  # one row, not the whole table
        label, why = LEGACY_INSTALLATION, "the database already has instances labelled with it"
    else:
        label, why = secrets.token_hex(4), "generated for this state dir"
    await store.set_flag(INSTALLATION_FLAG, label, reason=why)
    log.info("installation_label", installation=label, reason=why)
    return label


def pinned(settings: Settings, label: str) -> Settings:
    """`settings` with the installation in force, unless the config names one itself (a
    reload re-reads a file that does not, and must not move the label)."""
    if set_on_purpose(settings) or settings.daemon.installation == label:
        return settings
    daemon = settings.daemon.model_copy(update={"installation": label})
    return settings.model_copy(update={"daemon": daemon})


class LabelUnreadable(Exception):
    """A database is there, but the label in it cannot be read: a guess would make `reap`
    look for the wrong instances (and find none of the ones billing)."""


def stored(db_path: Path) -> str | None:
    """The label kept in a database, read without taking the lock (for `reap`, which may run
    beside a daemon); None when there is no database, or one from before labels were kept
    (no flags table, or no label in it: its instances carry "main"). LabelUnreadable when
    the database cannot be read (damaged, locked, unreadable) or holds no valid label."""
    if not db_path.is_file():
        return None
    try:
        conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
        try:
            row = conn.execute(
                "SELECT value FROM flags WHERE key = ?", (INSTALLATION_FLAG,)
            ).fetchone()
        finally:
            conn.close()
    except sqlite3.OperationalError as exc:
        if str(exc).startswith("no such table"):
            return None
        raise LabelUnreadable(f"{db_path}: {exc}") from exc
    except sqlite3.Error as exc:
        raise LabelUnreadable(f"{db_path}: {exc}") from exc
    if row is None:
        return None
    try:
        value = json.loads(row[0])
    except (TypeError, ValueError):
        value = None
    if not (isinstance(value, str) and _VALID.fullmatch(value)):
        raise LabelUnreadable(f"{db_path}: the installation flag holds {str(row[0])[:40]!r}")
    return value
