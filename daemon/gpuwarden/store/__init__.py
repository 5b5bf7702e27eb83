"""The SQLite store: instances, jobs, the append-only event log and the termination record."""

from gpuwarden.store.db import IllegalTransition, NotFoundError, Store, StoreCorrupt

__all__ = ["IllegalTransition", "NotFoundError", "Store", "StoreCorrupt"]
