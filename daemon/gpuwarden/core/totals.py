"""Sums over the live fleet at any `now` without walking it: what every live instance billed
so far, what it will bill to its earliest deadline (`est_total`), and what it can bill
without a further extension (the budget's committed cost).

At 10,000 instances, computing those figures instance by instance costs tens of milliseconds
on every `status` call and every budget check. But each instance's figure, as a function of
`now`, is piecewise simple:

- a constant until some time (an acknowledged instance's estimate before its deadline), or
- a billing ramp, price * ceil((now - start) / grain) * grain (its cost so far; the estimate of
  a busy instance, whose idle deadline moves with `now`; anything past its deadline), or
- for an instance the provider has not acknowledged (it bills from `now`, whenever that is),
  a value recomputed at every sum: there are only as many as launches in flight.

A `Channel` keeps each instance's current piece and the time it stops holding. A sum is the
constants' sum (a C-level sum of floats) plus the ramps' sum, which for one grain G is exact
from a few numbers and a sorted list: with now = qN*G + rN and start = q*G + r (0 <= r < G),
ceil((now - start) / G) = qN - q + (1 if rN > r else 0); so the sum of price * ceil(...) is
qN * sum(price) - sum(price * q) + sum(price for r < rN), the last a prefix sum found by
bisection. A piece is recomputed only when its instance changes (the store's live view says
so), its observations change (busy or not), it expires, or the limits change; a sum asked
at an earlier `now` than the last one is computed instance by instance and changes nothing
kept. Pure: no I/O, `now` is always given.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from itertools import accumulate

from gpuwarden.core import policy
from gpuwarden.core.model import Billing, Instance

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
_SECOND_US = 1_000_000


@dataclass(frozen=True, slots=True)
class Const:
    value: float
    until: datetime | None  # recompute at this time; None: it holds for ever


@dataclass(frozen=True, slots=True)
class Ramp:
    """price * ceil((now - start) / grain) grains, in USD; holds while start <= now < until."""

    price: float
    start_us: int
    grain_us: int
    until: datetime | None


@dataclass(frozen=True, slots=True)
class Direct:
    """Recomputed at every sum."""

    value: float


Piece = Const | Ramp | Direct


def _us(t: datetime) -> int:
    return (t - _EPOCH) // _US


def _grain_us(billing: Billing) -> int:
    return 60 * _SECOND_US if billing is Billing.PER_MINUTE else _SECOND_US


def _ramp(inst: Instance, start: datetime, until: datetime | None = None) -> Ramp:
    return Ramp(inst.price_per_hour, _us(start), _grain_us(inst.billing), until)


def _capped(piece: Piece, until: datetime) -> Piece:
    """The piece, recomputed at `until` at the latest."""
    if isinstance(piece, Direct):
        return piece
    return replace(piece, until=until if piece.until is None else min(piece.until, until))


def _to_end(inst: Instance, start: datetime, end: datetime, now: datetime) -> Piece:
    """cost(price, start, max(end, now, start)) for a fixed `end`: constant until the end,
    then the ramp of the cost so far."""
    stop = max(end, start)
    if now < stop:
        return Const(policy.cost(inst.price_per_hour, start, stop, inst.billing), stop)
    return _ramp(inst, start)


def cost_piece(inst: Instance, now: datetime) -> Piece:
    """policy.cost_so_far of a live instance, from `now` on."""
    start = policy.billing_start(inst)
    if start is None:
        return Const(0.0, None)  # acknowledging it changes the row, which recomputes this
    if inst.terminated_at is not None:
        return Const(policy.cost_so_far(inst, now), None)
    if now < start:
        return Const(0.0, start)
    return _ramp(inst, start)


def committed_piece(inst: Instance, limits: policy.Limits, now: datetime) -> Piece:
    """policy.committed_cost of a live instance, from `now` on."""
    start = policy.billing_start(inst)
    if start is None:
        return Direct(policy.committed_cost(inst, limits, now))
    end = min(inst.lease_until, policy.hard_deadline(inst, limits))
    return _to_end(inst, start, end, now)


def est_piece(inst: Instance, busy: bool, limits: policy.Limits, now: datetime) -> Piece:
    """policy.est_total of a live instance (busy: a job runs on it), from `now` on."""
    start = policy.billing_start(inst)
    if start is None:
        return Direct(policy.est_total(inst, policy.Observations(busy=busy), limits, now))
    cap = min(inst.lease_until, policy.hard_deadline(inst, limits))
    idle = limits.idle_timeout
    last = inst.last_activity
    if not busy or now < last:
        # The idle deadline is fixed (for a busy instance, until `now` passes its last activity).
        piece = _to_end(inst, start, min(cap, last + idle), now)
        return _capped(piece, last) if busy else piece
    if now + idle >= cap:
        return _to_end(inst, start, cap, now)
    # Busy: the idle deadline is now + idle, before the cap, until now reaches cap - idle.
    if now + idle < start:
        return Const(0.0, min(start, cap) - idle)
    return _ramp(inst, start - idle, cap - idle)


@dataclass(frozen=True, slots=True)
class _RampSum:
    """The sum of the ramps of one grain at any `now` (see the module docstring)."""

    grain_us: int
    base: int  # the smallest start quotient: keeps the float sums small
    price: float  # sum of prices
    weighted: float  # sum of price * (q - base)
    remainders: list[int]  # sorted start remainders r
    prefix: list[float]  # prefix[k]: sum of the prices of the first k remainders

    @classmethod
    def of(cls, grain_us: int, ramps: list[tuple[int, float]]) -> _RampSum:
        parts = sorted((start % grain_us, start // grain_us, price) for start, price in ramps)
        base = min(q for _, q, _ in parts)
        return cls(
            grain_us,
            base,
            sum(p for _, _, p in parts),
            sum(p * (q - base) for _, q, p in parts),
            [r for r, _, _ in parts],  # sorted by remainder, for the bisection
            [0.0, *accumulate(p for _, _, p in parts)],
        )

    def at(self, now_us: int) -> float:
        q, r = divmod(now_us, self.grain_us)
        grains = (q - self.base) * self.price - self.weighted
        grains += self.prefix[bisect_left(self.remainders, r)]
        return grains * (self.grain_us / _SECOND_US) / 3600.0


def _value(p: Piece, now: datetime) -> float:
    """One piece's figure at `now`."""
    if isinstance(p, Ramp):
        grains = -((p.start_us - _us(now)) // p.grain_us)  # ceil((now - start) / grain)
        return p.price * grains * (p.grain_us / _SECOND_US) / 3600.0
    return p.value


class Channel:
    """One sum over the live instances, kept piece by piece."""

    def __init__(self) -> None:
        self._pieces: dict[str, Piece] = {}
        self._consts: dict[str, float] = {}
        self._direct: dict[str, float] = {}
        self._ramps: dict[str, Ramp] = {}
        self._sums: list[_RampSum] | None = None
        self._dirty: set[str] = set()
        self._until: dict[str, datetime] = {}
        self._expiry: list[tuple[datetime, str]] = []
        self._last: datetime | None = None

    def touch(self, ids: Iterable[str]) -> None:
        """These instances changed (or appeared, or ended): recompute them at the next sum.
        Before a first sum there is nothing to mark (it recomputes every instance), so a
        channel nobody sums does not collect every id the fleet ever had."""
        if self._last is not None:
            self._dirty.update(ids)

    def reset(self) -> None:
        """Forget every piece: the next sum recomputes each instance."""
        self.__init__()  # type: ignore[misc]

    def total(
        self,
        rows: Mapping[str, Instance],
        piece: Callable[[Instance, datetime], Piece],
        now: datetime,
    ) -> float:
        """The sum at `now` over `rows` (the live instances by id), `piece` giving each one's
        piece from `now` on."""
        if self._last is not None and now < self._last:
            # An earlier time than the last sum's (a caller that read the clock before an
            # await): answered instance by instance, the kept pieces left for later times.
            return sum(_value(piece(inst, now), now) for inst in rows.values())
        if self._last is None:
            self._dirty = set(rows)
        self._last = now
        while self._expiry and self._expiry[0][0] <= now:
            when, iid = heapq.heappop(self._expiry)
            if self._until.get(iid) == when:
                self._dirty.add(iid)
        todo, self._dirty = self._dirty | self._direct.keys(), set()
        for iid in todo:
            inst = rows.get(iid)
            self._put(iid, None if inst is None else piece(inst, now))
        if self._sums is None:
            self._sums = self._build()
        now_us = _us(now)
        ramps = sum(s.at(now_us) for s in self._sums)
        return sum(self._consts.values()) + sum(self._direct.values()) + ramps

    def _put(self, iid: str, new: Piece | None) -> None:
        old = self._pieces.get(iid)
        if new == old:
            return
        if isinstance(old, Ramp):
            del self._ramps[iid]
            self._sums = None
        self._consts.pop(iid, None)
        self._direct.pop(iid, None)
        if new is None:
            del self._pieces[iid]
            self._until.pop(iid, None)
            return
        self._pieces[iid] = new
        if isinstance(new, Const):
            self._consts[iid] = new.value
        elif isinstance(new, Direct):
            self._direct[iid] = new.value
        else:
            self._ramps[iid] = new
            self._sums = None
        until = None if isinstance(new, Direct) else new.until
        if until is None:
            self._until.pop(iid, None)
        elif self._until.get(iid) != until:
            self._until[iid] = until
            heapq.heappush(self._expiry, (until, iid))
            if len(self._expiry) > 2 * len(self._until) + 1024:  # drop the stale entries
                self._expiry = [(t, i) for i, t in self._until.items()]
                heapq.heapify(self._expiry)

    def _build(self) -> list[_RampSum]:
        by_grain: dict[int, list[tuple[int, float]]] = {}
        for r in self._ramps.values():
            by_grain.setdefault(r.grain_us, []).append((r.start_us, r.price))
        return [_RampSum.of(g, ramps) for g, ramps in by_grain.items()]


class FleetTotals:
    """The three sums `status` and the budget need, over the store's live instances."""

    def __init__(self) -> None:
        self._cost = Channel()
        self._committed = Channel()
        self._est = Channel()
        self._limits: dict[str, policy.Limits] = {}
        self._busy: frozenset[str] = frozenset()

    def touch(self, iid: str) -> None:
        for channel in (self._cost, self._committed, self._est):
            channel.touch((iid,))

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]

    def cost_now(self, rows: Mapping[str, Instance], now: datetime) -> float:
        return self._cost.total(rows, cost_piece, now)

    def committed(
        self, rows: Mapping[str, Instance], limits: policy.Limits, now: datetime
    ) -> float:
        self._check_limits("committed", self._committed, limits)
        return self._committed.total(rows, lambda i, t: committed_piece(i, limits, t), now)

    def est_total(
        self,
        rows: Mapping[str, Instance],
        busy: frozenset[str],
        limits: policy.Limits,
        now: datetime,
    ) -> float:
        self._check_limits("est", self._est, limits)
        self._est.touch(busy ^ self._busy)
        self._busy = busy
        return self._est.total(rows, lambda i, t: est_piece(i, i.id in busy, limits, t), now)

    def _check_limits(self, name: str, channel: Channel, limits: policy.Limits) -> None:
        if self._limits.get(name, limits) != limits:
            channel.reset()  # a config reload: every piece may differ
        self._limits[name] = limits
