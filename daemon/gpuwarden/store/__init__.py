"""The SQLite store: instances, jobs, the append-only event log and the termination record."""

from gpuwarden.store.db import Store
from gpuwarden.store.errors import StoreBusy, StoreCorrupt, StoreUnavailable, StoreWriteFailed
from gpuwarden.store.sql import IllegalTransition, NotFoundError

__all__ = [
    "IllegalTransition",
    "NotFoundError",
    "Store",
    "StoreBusy",
    "StoreCorrupt",
    "StoreUnavailable",
    "StoreWriteFailed",
]
