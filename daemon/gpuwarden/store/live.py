"""The live instances in memory: the Store's view of every instance not yet ended.

Loaded once when the store opens, then changed only by the Store's own write paths, with the
row as the database holds it after each commit (a rolled-back transaction changes nothing),
so no caller can forget to update it and it equals the database at every await. Reads of the
live fleet (the guard, the watchdog, `status`, the budget) come from here instead of parsing
every row again on each pass; the records are frozen, and their `extra` dicts are shared:
callers build a new dict to change one (they already do: updates go through the Store).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from gpuwarden.core.model import Instance, InstanceState


class LiveInstances:
    def __init__(self) -> None:
        self._rows: dict[str, Instance] = {}

    def load(self, rows: Iterable[Instance]) -> None:
        self._rows = {i.id: i for i in rows if i.state.live}

    def apply(self, inst: Instance) -> None:
        """The row as committed: kept while live, dropped once ended."""
        if inst.state.live:
            self._rows[inst.id] = inst
        else:
            self._rows.pop(inst.id, None)

    def get(self, instance_id: str) -> Instance | None:
        return self._rows.get(instance_id)

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, instance_id: object) -> bool:
        return instance_id in self._rows

    def select(self, states: Iterable[InstanceState] | None = None) -> list[Instance]:
        """In creation order, as the database's ORDER BY created_at gives them."""
        if states is None:
            found = list(self._rows.values())
        else:
            wanted = frozenset(states)
            found = [i for i in self._rows.values() if i.state in wanted]
        found.sort(key=_created)
        return found


def _created(inst: Instance) -> datetime:
    return inst.created_at
