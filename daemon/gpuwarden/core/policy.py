"""Pure decisions: deadlines, verdicts, lease math, cost math, watchdog strikes, spend
windows and their sums. No I/O, no clock reads: every function takes `now` (or the times it
needs) as an argument.

One argument order throughout: the subject (an instance, a termination, a count), then the
observations or other inputs, then `limits`, then `now` last.

An instance has up to three time deadlines and three stop signals:

- idle:   last activity + idle_timeout. Activity is a running job, `gpuwarden activity ID`,
          an extension, or activity seen by the watchdog's probe; the callers move
          `Instance.last_activity`, and a running job counts as activity at `now`.
- lease:  `lease_until` (default 4 h from creation, extended in hours up to lease_max).
- hard:   min(created_at, provider_started_at) + hard_cap. Nothing moves it.
- stops:  insufficient credit, budget, watchdog failures (observations, not times).

Precedence when several apply at the same `now` (the reason recorded is the first that
holds): hard_timeout, lease_expired, idle, then insufficient_credit, budget, watchdog. The
time deadlines come first because an instance past one of them was due to end anyway; among
them the hard cap wins because it is the one promise nothing overrides, then the lease (the
owner's explicit limit), then idle.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

from gpuwarden.core import errors
from gpuwarden.core.model import Billing, Instance, InstanceState, Termination, TerminationReason

HOUR = timedelta(hours=1)
_ENDED = frozenset({InstanceState.TERMINATED, InstanceState.LAUNCH_FAILED})


# --- cost --------------------------------------------------------------------------------


def billed_seconds(start: datetime, end: datetime, billing: Billing) -> float:
    """Time a provider bills between start and end, at its granularity."""
    secs = max(0.0, (end - start).total_seconds())
    if billing is Billing.PER_MINUTE:
        return math.ceil(secs / 60.0) * 60.0
    return math.ceil(secs)


def cost(price_per_hour: float, start: datetime, end: datetime, billing: Billing) -> float:
    """USD billed for a machine at `price_per_hour` from start to end."""
    return price_per_hour * billed_seconds(start, end, billing) / 3600.0


def estimate(price_per_hour: float, duration: timedelta, billing: Billing) -> float:
    """USD billed for `duration` of a machine at `price_per_hour` (rounded as billed)."""
    start = datetime(2000, 1, 1)  # noqa: DTZ001 - only the difference matters
    return cost(price_per_hour, start, start + max(duration, timedelta(0)), billing)


def billing_start(inst: Instance) -> datetime | None:
    """When the provider started billing: None when it never acknowledged the instance."""
    if inst.provider_id is None:
        return None
    return inst.provider_started_at or inst.created_at


def cost_so_far(inst: Instance, now: datetime) -> float:
    """USD billed so far (to `terminated_at` for an ended instance)."""
    start = billing_start(inst)
    if start is None:
        return 0.0
    end = inst.terminated_at or now
    return cost(inst.price_per_hour, start, max(start, end), inst.billing)


def cost_until(inst: Instance, end: datetime, now: datetime) -> float:
    """USD the instance will have billed at `end` (never less than what it billed by now).
    An instance not yet acknowledged counts from `now` (it may start at any moment)."""
    if inst.state in _ENDED:
        return cost_so_far(inst, now)
    start = billing_start(inst) or now
    return cost(inst.price_per_hour, start, max(end, now, start), inst.billing)


def termination_of(inst: Instance, now: datetime) -> Termination:
    """The termination record of an instance ended at `now` (or at its `terminated_at`):
    uptime and cost from when the provider started billing. An instance the provider never
    acknowledged ran and cost nothing."""
    end = inst.terminated_at or now
    start = billing_start(inst) or now
    return Termination(
        at=end,
        instance_id=inst.id,
        provider=inst.provider,
        provider_id=inst.provider_id,
        reason=inst.reason or TerminationReason.VANISHED,
        uptime_s=max(0.0, (end - start).total_seconds()),
        gpu=inst.gpu,
        region=inst.region,
        price_per_hour=inst.price_per_hour,
        cost=round(cost_so_far(inst, now), 6),
    )


# --- limits and observations -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Limits:
    """The policy and budget settings the decisions need, in one value."""

    idle_timeout: timedelta = timedelta(minutes=30)
    lease_default: timedelta = timedelta(hours=4)
    lease_min: timedelta = timedelta(hours=1)
    lease_max: timedelta = timedelta(hours=8)
    hard_cap: timedelta = timedelta(hours=8)
    watchdog_failures: int = 2
    poll_interval: timedelta = timedelta(seconds=30)
    vanish_grace: timedelta = timedelta(seconds=60)
    deadman_timeout: timedelta = timedelta(minutes=20)
    deadman_margin: timedelta = timedelta(minutes=10)
    max_hourly_price: float | None = None
    daily_limit: float | None = None
    monthly_limit: float | None = None
    credit_floor: float = 0.0


@dataclass(frozen=True, slots=True)
class Observations:
    """What the loops know about an instance beyond its row."""

    busy: bool = False  # a job is running on it: activity at `now`
    credit_stop: bool = False  # the account cannot pay
    budget_stop: bool = False  # recorded spend passed a limit
    watchdog_failures: int | None = None  # None: use Instance.strikes


@dataclass(frozen=True, slots=True)
class Verdict:
    terminate: TerminationReason | None  # None: keep it
    next_check: datetime  # when this instance must be looked at again
    deadline: datetime  # the earliest time deadline
    why: str  # one line for logs and `status`


# --- deadlines and the verdict -----------------------------------------------------------


def hard_deadline(inst: Instance, limits: Limits) -> datetime:
    """Creation (or the provider's start, whichever is earlier) + hard_cap."""
    start = inst.created_at
    if inst.provider_started_at is not None and inst.provider_started_at < start:
        start = inst.provider_started_at
    return start + limits.hard_cap


def idle_deadline(inst: Instance, seen: Observations, limits: Limits, now: datetime) -> datetime:
    last = max(inst.last_activity, now) if seen.busy else inst.last_activity
    return last + limits.idle_timeout


def deadlines(
    inst: Instance, seen: Observations, limits: Limits, now: datetime
) -> list[tuple[datetime, TerminationReason]]:
    """The three time deadlines in precedence order (hard, lease, idle)."""
    return [
        (hard_deadline(inst, limits), TerminationReason.HARD_TIMEOUT),
        (inst.lease_until, TerminationReason.LEASE_EXPIRED),
        (idle_deadline(inst, seen, limits, now), TerminationReason.IDLE),
    ]


def earliest_deadline(
    inst: Instance, seen: Observations, limits: Limits, now: datetime
) -> tuple[datetime, TerminationReason]:
    """The earliest time deadline and its reason; ties go to the higher precedence."""
    return _earliest(deadlines(inst, seen, limits, now))


def _earliest(
    found: list[tuple[datetime, TerminationReason]],
) -> tuple[datetime, TerminationReason]:
    # min() keeps the first of equal keys, and `found` is in precedence order.
    return min(found, key=lambda deadline: deadline[0])


def decide(inst: Instance, seen: Observations, limits: Limits, now: datetime) -> Verdict:
    """Keep the instance until `next_check`, or end it now with a reason.

    A deadline is due when `now >= deadline` (exactly at the deadline counts). Instances in
    REQUESTED and PROVISIONING are judged like running ones: their deadlines count from
    creation. TERMINATING and ended instances are never ended again (terminate is None).
    """
    found = deadlines(inst, seen, limits, now)  # computed once: the guard's hot path
    when, first = _earliest(found)
    if inst.state is InstanceState.TERMINATING or inst.state in _ENDED:
        return Verdict(None, when, when, f"already {inst.state.value}")
    for deadline, reason in found:
        if now >= deadline:
            return Verdict(reason, now, when, _why(reason, deadline))
    failures = inst.strikes if seen.watchdog_failures is None else seen.watchdog_failures
    stops = (
        (seen.credit_stop, TerminationReason.INSUFFICIENT_CREDIT, "the account cannot pay"),
        (seen.budget_stop, TerminationReason.BUDGET, "spend passed a budget limit"),
        (
            struck_out(failures, limits),
            TerminationReason.WATCHDOG,
            f"{failures} failed health probes",
        ),
    )
    for holds, reason, text in stops:
        if holds:
            return Verdict(reason, now, when, text)
    return Verdict(None, when, when, f"{first.value} at {when.isoformat()}")


def _why(reason: TerminationReason, deadline: datetime) -> str:
    what = {
        TerminationReason.HARD_TIMEOUT: "hard cap reached",
        TerminationReason.LEASE_EXPIRED: "lease ended",
        TerminationReason.IDLE: "idle timeout reached",
    }[reason]
    return f"{what} at {deadline.isoformat()}"


# --- watchdog strikes ----------------------------------------------------------------------


def strikes_after(inst: Instance, probe_ok: bool) -> int:
    """The instance's consecutive failed probes after one more probe: a failure adds a
    strike, a good probe clears them all."""
    return 0 if probe_ok else inst.strikes + 1


def struck_out(strikes: int, limits: Limits) -> bool:
    """Whether `strikes` consecutive failed probes end the instance (reason watchdog):
    exactly limits.watchdog_failures of them do."""
    return strikes >= limits.watchdog_failures


# --- an instance the provider ended --------------------------------------------------------


def last_contact(inst: Instance) -> datetime:
    """The last time the daemon knew the instance's dead-man switch was fed: the last good
    probe (each one refreshes the heartbeat), else when it came up, else its creation."""
    if inst.last_probe_ok and inst.last_probe_at is not None:
        return inst.last_probe_at
    return inst.running_at or inst.created_at


def vanish_reason(
    inst: Instance, limits: Limits, first_missed: datetime, *, switch: bool = True
) -> TerminationReason:
    """Why an instance the provider no longer runs ended, as far as we can tell.

    `first_missed` is when the reconciler first found it gone (after a daemon restart, the
    first pass). The dead-man switch on the instance (remote/assets/deadman.sh) ends it
    when its heartbeat is deadman_timeout old, or when it is hard_cap + deadman_margin old;
    so when either had passed by `first_missed` the switch is the likely cause: `deadman`.
    Otherwise (or when the instance had no switch able to end it: `switch` False) the
    provider or someone else ended it: `vanished`. Exactly at a limit counts as passed.
    """
    if switch:
        silent = first_missed - last_contact(inst)
        too_old = first_missed >= hard_deadline(inst, limits) + limits.deadman_margin
        if silent >= limits.deadman_timeout or too_old:
            return TerminationReason.DEADMAN
    return TerminationReason.VANISHED


# --- lease math --------------------------------------------------------------------------


def initial_lease(hours: float | None, limits: Limits) -> timedelta:
    """The lease a new instance gets: `hours` or lease_default, within [lease_min, lease_max]."""
    if hours is None:
        return limits.lease_default
    lease = timedelta(hours=hours)
    if lease < limits.lease_min:
        raise errors.LeaseRefused(
            f"a lease is at least {_hours(limits.lease_min)}; asked for {_hours(lease)}",
            min_hours=limits.lease_min / HOUR,
        )
    if lease > limits.lease_max:
        raise errors.LeaseMaxExceeded(
            f"a lease is at most {_hours(limits.lease_max)}; asked for {_hours(lease)}",
            allowed_hours=limits.lease_max / HOUR,
        )
    return lease


def lease_room(inst: Instance, limits: Limits) -> timedelta:
    """How much more lease the instance may still get (the total from creation stays
    within lease_max, and never past the hard cap)."""
    ceiling = min(inst.created_at + limits.lease_max, hard_deadline(inst, limits))
    return max(timedelta(0), ceiling - inst.lease_until)


def extend(inst: Instance, hours: float, limits: Limits, now: datetime) -> datetime:
    """The new `lease_until` after extending by `hours`, or a refusal that says why and how
    much is still allowed. Refused after expiry (any deadline passed) or during termination."""
    if hours <= 0:
        raise errors.LeaseRefused(f"extend by a positive number of hours, not {hours:g}")
    if inst.state is InstanceState.TERMINATING or inst.state in _ENDED:
        raise errors.LeaseRefused(
            f"instance {inst.id} is {inst.state.value}; it can no longer be extended",
            state=inst.state.value,
        )
    verdict = decide(inst, Observations(), limits, now)
    if verdict.terminate is not None:
        raise errors.LeaseRefused(
            f"instance {inst.id} is past its deadline ({verdict.why}); it is being ended",
            reason=verdict.terminate.value,
        )
    room = lease_room(inst, limits)
    wanted = timedelta(hours=hours)
    if wanted > room:
        raise errors.LeaseMaxExceeded(
            f"extending by {_hours(wanted)} would pass the {_hours(limits.lease_max)} maximum"
            f" from creation; at most {_hours(room)} more is allowed",
            allowed_hours=room / HOUR,
            lease_max_hours=limits.lease_max / HOUR,
        )
    return inst.lease_until + wanted


def _hours(d: timedelta) -> str:
    h = d / HOUR
    if h >= 1 and float(h).is_integer():
        return f"{int(h)} h"
    secs = int(d.total_seconds())
    hh, rest = divmod(secs, 3600)
    mm, ss = divmod(rest, 60)
    return f"{hh} h {mm:02d} min {ss:02d} s" if ss else f"{hh} h {mm:02d} min"


# --- estimates ---------------------------------------------------------------------------


def est_total(inst: Instance, seen: Observations, limits: Limits, now: datetime) -> float:
    """The cost of the instance to its earliest deadline (what it bills if nobody acts)."""
    if inst.state in _ENDED:
        return cost_so_far(inst, now)
    when, _ = earliest_deadline(inst, seen, limits, now)
    return cost_until(inst, when, now)


def committed_cost(inst: Instance, limits: Limits, now: datetime) -> float:
    """The most the instance can bill without a further extension: to the earlier of its
    lease end and hard cap (activity may push the idle deadline up to there). Used by the
    budget, which must not be passed however busy the instance stays."""
    if inst.state in _ENDED:
        return cost_so_far(inst, now)
    end = min(inst.lease_until, hard_deadline(inst, limits))
    return cost_until(inst, end, now)


# --- spend windows and sums --------------------------------------------------------------


def day_start(now: datetime) -> datetime:
    """Midnight UTC opening `now`'s UTC day: the daily budget's window."""
    n = now.astimezone(UTC)
    return datetime(n.year, n.month, n.day, tzinfo=UTC)


def month_start(now: datetime) -> datetime:
    """Midnight UTC opening `now`'s UTC month: the monthly budget's window."""
    n = now.astimezone(UTC)
    return datetime(n.year, n.month, 1, tzinfo=UTC)


def days_start(days: int, now: datetime) -> datetime:
    """Where the last `days` UTC days open (today is the last of them)."""
    return day_start(now) - timedelta(days=days - 1)


def idle_tail(t: Termination, limits: Limits) -> float:
    """What an instance ended for idle spent idling before the end: its idle_timeout tail."""
    if t.reason is not TerminationReason.IDLE:
        return 0.0
    tail = min(limits.idle_timeout, timedelta(seconds=t.uptime_s))
    return min(t.cost, t.price_per_hour * tail.total_seconds() / 3600.0)


@dataclass(frozen=True, slots=True)
class DaySpend:
    total: float  # everything counted on the UTC day
    idle: float  # of which the idle tails of instances ended for idle


@dataclass(frozen=True, slots=True)
class Spend:
    """Spend summed from termination records and what live instances billed so far."""

    days: dict[date, DaySpend] = field(default_factory=dict)  # in the order first counted
    by_provider: dict[str, float] = field(default_factory=dict)
    by_reason: dict[str, float] = field(default_factory=dict)  # live instances under "live"
    live: float = 0.0

    @property
    def total(self) -> float:
        return sum(d.total for d in self.days.values())

    @property
    def idle(self) -> float:
        return sum(d.idle for d in self.days.values())


def spend(
    ended: Iterable[Termination], live: Iterable[Instance], limits: Limits, now: datetime
) -> Spend:
    """Spend by UTC day, provider and reason. An ended instance counts wholly on the day it
    ended; a live one counts today, with what it billed so far."""
    totals: dict[date, float] = defaultdict(float)
    idles: dict[date, float] = defaultdict(float)
    by_provider: dict[str, float] = defaultdict(float)
    by_reason: dict[str, float] = defaultdict(float)
    for t in ended:
        day = _utc_day(t.at)
        totals[day] += t.cost
        idles[day] += idle_tail(t, limits)
        by_provider[t.provider] += t.cost
        by_reason[t.reason.value] += t.cost
    live_cost = 0.0
    for inst in live:
        c = cost_so_far(inst, now)
        live_cost += c
        totals[_utc_day(now)] += c
        by_provider[inst.provider] += c
        by_reason["live"] += c
    return Spend(
        days={day: DaySpend(total, idles[day]) for day, total in totals.items()},
        by_provider=dict(by_provider),
        by_reason=dict(by_reason),
        live=live_cost,
    )


@dataclass(frozen=True, slots=True)
class WarmDay:
    """What keep-warm cost and bought on a UTC day."""

    idle_cost: float  # billed while instances stood warm between jobs
    wait_saved_s: float  # the cold starts the jobs that took a warm instance did not wait
    reuses: int  # jobs that took a warm instance


def warm_by_day(periods: Iterable[tuple[datetime, float, float, bool]]) -> dict[date, WarmDay]:
    """Sum warm periods (when it ended, its idle cost, the wait it saved, whether a job took
    the instance) by the UTC day they ended, oldest day first."""
    out: dict[date, WarmDay] = {}
    for at, cost, saved, reused in sorted(periods, key=lambda p: p[0]):
        day = _utc_day(at)
        was = out.get(day, WarmDay(0.0, 0.0, 0))
        out[day] = WarmDay(
            was.idle_cost + max(0.0, cost),
            was.wait_saved_s + max(0.0, saved),
            was.reuses + int(reused),
        )
    return out


def _utc_day(at: datetime) -> date:
    return at.astimezone(UTC).date()


STALE_PROBES = 3  # a last probe older than this many watchdog intervals is shown as stale


def probe_stale(inst: Instance, interval: timedelta, now: datetime) -> bool:
    """The last probe of a running instance is older than STALE_PROBES intervals: the
    watchdog is not getting through (or not running), so its last word is old news."""
    if inst.state is not InstanceState.RUNNING or inst.last_probe_at is None:
        return False
    return now - inst.last_probe_at > STALE_PROBES * max(interval, timedelta(seconds=1))
