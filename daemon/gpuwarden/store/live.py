"""The live instances in memory: the Store's view of every instance not yet ended.

Loaded once when the store opens, then changed only by the Store's own write paths, with the
row as the database holds it after each commit (a rolled-back transaction changes nothing),
so no caller can forget to update it and it equals the database at every await. Reads of the
live fleet (the guard, the watchdog, `status`, the budget) come from here instead of parsing
every row again on each pass; the records are frozen, and their `extra` dicts are shared:
callers build a new dict to change one (they already do: updates go through the Store).

Because every committed row passes through `apply`, this is also where the fleet's totals
(core/totals.py: cost so far, estimate, committed) learn which instances changed, and where
the creation order is kept, so that `status`'s first page and totals cost no walk of the
whole fleet.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterable
from datetime import datetime
from itertools import count, islice

from gpuwarden.core import policy
from gpuwarden.core.model import Instance, InstanceState
from gpuwarden.core.totals import FleetTotals


def _money(inst: Instance) -> tuple[object, ...]:
    """What the totals read of an instance: a probe's time or a strike changes none of it."""
    return (
        inst.provider_id,
        inst.provider_started_at,
        inst.created_at,
        inst.price_per_hour,
        inst.billing,
        inst.terminated_at,
        inst.lease_until,
        inst.last_activity,
    )


class LiveInstances:
    def __init__(self) -> None:
        self._rows: dict[str, Instance] = {}
        # (created_at, arrival, id), sorted: the database's ORDER BY created_at, ties in the
        # order the rows arrived (as the stable sort over the dict this replaces gave them).
        self._order: list[tuple[datetime, int, str]] = []
        self._keys: dict[str, tuple[datetime, int, str]] = {}
        self._arrivals = count()
        self._rates: dict[str, float] = {}
        self.totals = FleetTotals()
        self.ended = 0  # rows that left (or were written ended): the termination record moved

    def load(self, rows: Iterable[Instance]) -> None:
        self._rows, self._order, self._keys, self._rates = {}, [], {}, {}
        self.totals.reset()
        for inst in rows:
            self.apply(inst)

    def apply(self, inst: Instance) -> None:
        """The row as committed: kept while live, dropped once ended."""
        old = self._rows.get(inst.id)
        if not inst.state.live:
            self.ended += 1
            if old is not None:
                del self._rows[inst.id]
                self._rates.pop(inst.id, None)
                self._order.pop(bisect_left(self._order, self._keys.pop(inst.id)))
                self.totals.touch(inst.id)
            return
        self._rows[inst.id] = inst
        if old is None or old.created_at != inst.created_at:
            if old is not None:
                self._order.pop(bisect_left(self._order, self._keys[inst.id]))
            key = (inst.created_at, next(self._arrivals), inst.id)
            self._keys[inst.id] = key
            insort(self._order, key)
        if inst.provider_id is not None:
            self._rates[inst.id] = inst.price_per_hour
        else:
            self._rates.pop(inst.id, None)
        if old is None or _money(old) != _money(inst):
            self.totals.touch(inst.id)

    def get(self, instance_id: str) -> Instance | None:
        return self._rows.get(instance_id)

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, instance_id: object) -> bool:
        return instance_id in self._rows

    def select(self, states: Iterable[InstanceState] | None = None) -> list[Instance]:
        """In creation order, as the database's ORDER BY created_at gives them."""
        rows = self._rows
        if states is None:
            return [rows[iid] for _, _, iid in self._order]
        wanted = frozenset(states)
        return [i for i in (rows[iid] for _, _, iid in self._order) if i.state in wanted]

    def first(self, n: int) -> list[Instance]:
        """The first `n` in creation order, without a walk of the rest."""
        return [self._rows[iid] for _, _, iid in islice(self._order, n)]

    def cost_per_hour(self) -> float:
        """What the acknowledged live instances bill per hour together."""
        return sum(self._rates.values())

    def cost_now(self, now: datetime) -> float:
        """policy.cost_so_far summed over the live instances."""
        return self.totals.cost_now(self._rows, now)

    def committed(self, limits: policy.Limits, now: datetime) -> float:
        """policy.committed_cost summed over the live instances."""
        return self.totals.committed(self._rows, limits, now)

    def est_total(self, busy: frozenset[str], limits: policy.Limits, now: datetime) -> float:
        """policy.est_total summed over the live instances (`busy`: those with a job)."""
        return self.totals.est_total(self._rows, busy, limits, now)
