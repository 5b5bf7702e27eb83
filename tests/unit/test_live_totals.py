"""The fleet totals the store's live view keeps (core/totals.py) equal the direct sums over
every live instance (policy.cost_so_far, committed_cost, est_total), after any sequence of
commits, busy sets, config reloads and times (forwards, and backwards as a test clock may),
and the live view keeps the creation order a sort would give."""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.conftest import T0

from gpuwarden.core import policy
from gpuwarden.core.model import Billing, Instance, InstanceState
from gpuwarden.core.totals import Channel, Const, Piece, Ramp, cost_piece, est_piece
from gpuwarden.store.live import LiveInstances

LIVE = (
    InstanceState.REQUESTED,
    InstanceState.PROVISIONING,
    InstanceState.RUNNING,
    InstanceState.TERMINATING,
)


def _us(rng: random.Random, most_s: float) -> timedelta:
    """A random span up to `most_s` seconds, to the microsecond (remainders of every kind)."""
    return timedelta(microseconds=rng.randrange(int(most_s * 1_000_000) + 1))


def _new(rng: random.Random, n: int, now: timedelta) -> Instance:
    created = T0 + now - _us(rng, 120) + timedelta(seconds=rng.choice([0, 0, 5, -5]))
    acked = rng.random() < 0.8
    return Instance(
        id=f"i{n:04d}",
        provider="fake",
        label=f"gpuwarden-main-i{n:04d}",
        state=rng.choice(LIVE),
        created_at=created,
        lease_until=created + _us(rng, 8 * 3600),
        last_activity=created + _us(rng, 3600),
        price_per_hour=round(rng.uniform(0.05, 4.0), rng.choice([2, 3, 6])),
        provider_id=f"p{n}" if acked else None,
        provider_started_at=(created + _us(rng, 300)) if acked and rng.random() < 0.7 else None,
        billing=rng.choice(list(Billing)),
    )


def _changed(rng: random.Random, inst: Instance, now: timedelta) -> Instance:
    at = T0 + now
    kind = rng.randrange(8)
    if kind == 0:
        return replace(inst, provider_id=f"p-{inst.id}", provider_started_at=at - _us(rng, 60))
    if kind == 1:
        return replace(inst, lease_until=inst.lease_until + _us(rng, 4 * 3600))
    if kind == 2:
        return replace(inst, last_activity=at + _us(rng, 600) - _us(rng, 600))
    if kind == 3:
        return replace(inst, price_per_hour=round(rng.uniform(0.05, 4.0), 3))
    if kind == 4:
        return replace(inst, last_probe_at=at, strikes=rng.randrange(3))  # no money moves
    if kind == 5:
        return replace(inst, state=InstanceState.TERMINATING, terminated_at=at)
    if kind == 6:
        return replace(inst, billing=rng.choice(list(Billing)))
    return replace(inst, state=rng.choice([InstanceState.TERMINATED, InstanceState.LAUNCH_FAILED]))


def _limits(rng: random.Random) -> policy.Limits:
    return policy.Limits(
        idle_timeout=_us(rng, 3600) + timedelta(minutes=1),
        hard_cap=_us(rng, 10 * 3600) + timedelta(hours=1),
    )


def _close(got: float, want: float) -> bool:
    return abs(got - want) <= 1e-6 * max(1.0, abs(want))


def _check(
    live: LiveInstances,
    rows: dict[str, Instance],
    busy: frozenset[str],
    limits: policy.Limits,
    now: timedelta,
) -> None:
    at = T0 + now
    fleet = list(rows.values())
    want_cost = sum(policy.cost_so_far(i, at) for i in fleet)
    want_committed = sum(policy.committed_cost(i, limits, at) for i in fleet)
    want_est = sum(
        policy.est_total(i, policy.Observations(busy=i.id in busy), limits, at) for i in fleet
    )
    assert _close(live.cost_now(at), want_cost), (live.cost_now(at), want_cost)
    assert _close(live.committed(limits, at), want_committed)
    assert _close(live.est_total(busy, limits, at), want_est)
    want_rate = sum(i.price_per_hour for i in fleet if i.provider_id)
    assert _close(live.cost_per_hour(), want_rate)
    assert len(live) == len(fleet)


@settings(max_examples=30, deadline=None)
@given(st.integers(min_value=0, max_value=2**32))
def test_kept_totals_equal_the_direct_sums_after_any_run(seed: int) -> None:
    rng = random.Random(seed)
    live, rows = LiveInstances(), dict[str, Instance]()
    arrivals: list[str] = []
    now = timedelta(0)
    busy: frozenset[str] = frozenset()
    limits = _limits(rng)
    for n in range(150):
        step = rng.randrange(10)
        if step < 3 or not rows:
            inst = _new(rng, n, now)
            arrivals.append(inst.id)
        elif step < 6:
            inst = _changed(rng, rng.choice(list(rows.values())), now)
        elif step == 6:
            now += _us(rng, rng.choice([2, 120, 3 * 3600]))
            inst = None
        elif step == 7:
            now -= _us(rng, 30) if rng.random() < 0.3 else timedelta(0)
            busy = frozenset(i for i in rows if rng.random() < 0.5)
            inst = None
        else:
            if rng.random() < 0.2:
                limits = _limits(rng)
            inst = None
        if inst is not None:
            live.apply(inst)
            if inst.state.live:
                rows[inst.id] = inst
            else:
                rows.pop(inst.id, None)
        if rng.random() < 0.5:
            _check(live, rows, busy, limits, now)
    _check(live, rows, busy, limits, now)
    # Creation order, ties in the order the rows first arrived (as a stable sort gives).
    ordered = sorted(rows.values(), key=lambda i: (i.created_at, arrivals.index(i.id)))
    assert live.select() == ordered
    assert live.first(3) == ordered[:3]


def _running(price: float) -> Instance:
    """Running since T0 with a 2-hour lease, acknowledged by the provider at creation."""
    return Instance(
        id="i1",
        provider="fake",
        label="l",
        state=InstanceState.RUNNING,
        created_at=T0,
        lease_until=T0 + timedelta(hours=2),
        last_activity=T0,
        price_per_hour=price,
        provider_id="p1",
    )


def test_a_running_instance_is_one_ramp_and_its_estimate_a_constant_to_its_deadline() -> None:
    inst = _running(1.2)
    limits = policy.Limits(idle_timeout=timedelta(minutes=30))
    at = T0 + timedelta(minutes=10)
    assert isinstance(cost_piece(inst, at), Ramp)
    idle = est_piece(inst, False, limits, at)
    assert isinstance(idle, Const) and idle.value == pytest.approx(0.6)  # to the idle deadline
    assert idle.until == T0 + timedelta(minutes=30)
    # Busy: the idle deadline moves with `now`, so the estimate ramps until the lease end
    # is nearer than the idle timeout, then stays at the lease end's cost.
    busy = est_piece(inst, True, limits, at)
    assert isinstance(busy, Ramp) and busy.until == T0 + timedelta(minutes=90)
    late = est_piece(inst, True, limits, T0 + timedelta(minutes=100))
    assert isinstance(late, Const) and late.value == pytest.approx(2.4)
    assert late.until == T0 + timedelta(hours=2)


def test_a_piece_past_its_time_is_recomputed() -> None:
    live = LiveInstances()
    inst = _running(3.6)
    live.apply(inst)
    limits = policy.Limits(idle_timeout=timedelta(minutes=30))
    assert live.est_total(frozenset(), limits, T0) == pytest.approx(1.8)  # to the idle end
    # Past the idle deadline (the guard has not ended it yet) it bills on: cost so far.
    assert live.est_total(frozenset(), limits, T0 + timedelta(hours=1)) == pytest.approx(3.6)
    assert live.cost_now(T0 + timedelta(seconds=1, microseconds=1)) == pytest.approx(0.002)


def test_an_earlier_time_is_answered_directly_and_keeps_the_pieces() -> None:
    """A caller that read the clock before an await asks about a time before the last sum:
    the right figure, and the pieces kept for later times are not computed again."""
    rng = random.Random(7)
    rows = {i.id: i for i in (_new(rng, n, timedelta(0)) for n in range(40))}
    channel = Channel()
    asked: list[str] = []

    def counted(inst: Instance, now: datetime) -> Piece:
        asked.append(inst.id)
        return cost_piece(inst, now)

    late, early = T0 + timedelta(hours=2), T0 + timedelta(hours=1)
    channel.total(rows, counted, late)
    direct = sum(policy.cost_so_far(i, early) for i in rows.values())
    assert channel.total(rows, counted, early) == pytest.approx(direct)
    assert channel._last == late  # what is kept still describes the later time: not reset
    asked.clear()
    again = channel.total(rows, counted, late)
    assert asked == []  # nothing was computed again for the later time
    assert again == pytest.approx(sum(policy.cost_so_far(i, late) for i in rows.values()))
