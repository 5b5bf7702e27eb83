"""The SQLite store: instances, jobs, the append-only event log and the termination record."""

from gpuwarden.store.db import IllegalTransition, Store, StoreCorrupt, StoreWriteFailed
from gpuwarden.store.sql import NotFoundError

__all__ = ["IllegalTransition", "NotFoundError", "Store", "StoreCorrupt", "StoreWriteFailed"]
