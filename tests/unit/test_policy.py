"""Table tests of the pure cost-guard decisions, at every boundary."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, datetime, timedelta, timezone

import pytest

from gpuwarden.core import errors, policy
from gpuwarden.core.model import Billing, Instance, InstanceState, Termination
from gpuwarden.core.model import TerminationReason as R

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
S = timedelta(seconds=1)
M = timedelta(minutes=1)
H = timedelta(hours=1)
LIMITS = policy.Limits()  # idle 30 m, lease 4 h default, min 1 h, max 8 h, hard cap 8 h
NO = policy.Observations()


def inst(**kw: object) -> Instance:
    base = Instance(
        id="abc",
        provider="fake",
        label="gpuwarden-main-abc",
        state=InstanceState.RUNNING,
        created_at=T0,
        lease_until=T0 + 4 * H,
        last_activity=T0,
        price_per_hour=1.2,
        provider_id="1001",
    )
    return replace(base, **kw)  # type: ignore[arg-type]


# --- decide --------------------------------------------------------------------------------

IDLE_AT = T0 + 30 * M


@pytest.mark.parametrize(
    ("name", "instance", "seen", "now", "reason", "next_check"),
    [
        ("fresh", inst(), NO, T0, None, IDLE_AT),
        ("idle one second before", inst(), NO, IDLE_AT - S, None, IDLE_AT),
        ("idle exactly at deadline", inst(), NO, IDLE_AT, R.IDLE, IDLE_AT),
        ("idle long past", inst(), NO, IDLE_AT + H, R.IDLE, None),
        ("activity moves idle", inst(last_activity=T0 + H), NO, IDLE_AT + H - S, None, None),
        ("busy is activity now", inst(), policy.Observations(busy=True), T0 + H, None, None),
        (
            "lease exactly at deadline",
            inst(last_activity=T0 + 4 * H - M),
            NO,
            T0 + 4 * H,
            R.LEASE_EXPIRED,
            None,
        ),
        (
            "lease beats idle when both passed",
            inst(last_activity=T0 + 4 * H - 30 * M),
            NO,
            T0 + 4 * H,
            R.LEASE_EXPIRED,
            None,
        ),
        (
            "hard cap beats lease and activity",
            inst(lease_until=T0 + 8 * H, last_activity=T0 + 8 * H),
            policy.Observations(busy=True),
            T0 + 8 * H,
            R.HARD_TIMEOUT,
            None,
        ),
        (
            "hard cap counts from the provider's earlier start",
            inst(provider_started_at=T0 - H, lease_until=T0 + 8 * H, last_activity=T0 + 7 * H),
            NO,
            T0 + 7 * H,
            R.HARD_TIMEOUT,
            None,
        ),
        (
            "a later provider start does not move the cap",
            inst(provider_started_at=T0 + H, lease_until=T0 + 8 * H, last_activity=T0 + 8 * H),
            NO,
            T0 + 8 * H,
            R.HARD_TIMEOUT,
            None,
        ),
        (
            "requested counts from creation",
            inst(state=InstanceState.REQUESTED, provider_id=None),
            NO,
            IDLE_AT,
            R.IDLE,
            None,
        ),
        (
            "provisioning counts from creation",
            inst(state=InstanceState.PROVISIONING),
            NO,
            IDLE_AT,
            R.IDLE,
            None,
        ),
        (
            "terminating is never ended again",
            inst(state=InstanceState.TERMINATING),
            NO,
            T0 + 9 * H,
            None,
            None,
        ),
        (
            "credit stop",
            inst(),
            policy.Observations(credit_stop=True),
            T0,
            R.INSUFFICIENT_CREDIT,
            None,
        ),
        ("budget stop", inst(), policy.Observations(budget_stop=True), T0, R.BUDGET, None),
        ("one strike keeps", inst(strikes=1), NO, T0, None, None),
        ("two strikes end", inst(strikes=2), NO, T0, R.WATCHDOG, None),
        (
            "observed failures override strikes",
            inst(strikes=0),
            policy.Observations(watchdog_failures=2),
            T0,
            R.WATCHDOG,
            None,
        ),
        (
            "a passed deadline beats a stop",
            inst(),
            policy.Observations(credit_stop=True),
            IDLE_AT,
            R.IDLE,
            None,
        ),
    ],
)
def test_decide(
    name: str,
    instance: Instance,
    seen: policy.Observations,
    now: datetime,
    reason: R | None,
    next_check: datetime | None,
) -> None:
    v = policy.decide(instance, seen, LIMITS, now)
    assert v.terminate == reason, name
    if reason is not None:
        assert v.next_check == now
    elif next_check is not None:
        assert v.next_check == next_check
    assert v.next_check >= now or instance.state is InstanceState.TERMINATING


def test_next_check_is_the_earliest_deadline() -> None:
    short_lease = inst(lease_until=T0 + 10 * M)
    assert policy.decide(short_lease, NO, LIMITS, T0).next_check == T0 + 10 * M
    busy = policy.decide(inst(), policy.Observations(busy=True), LIMITS, T0 + H)
    assert busy.next_check == T0 + H + 30 * M
    assert busy.why.startswith("idle")


# --- lease math ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hours", "expected", "error"),
    [
        (None, 4 * H, None),
        (1, H, None),
        (1 - 1 / 3600, None, errors.LeaseRefused),  # the minimum lease is 1 h
        (8, 8 * H, None),
        (8 + 1 / 3600, None, errors.LeaseMaxExceeded),
    ],
)
def test_initial_lease(hours: float | None, expected: timedelta | None, error: type | None) -> None:
    if error is not None:
        with pytest.raises(error):
            policy.initial_lease(hours, LIMITS)
    else:
        assert policy.initial_lease(hours, LIMITS) == expected


def test_extension_to_exactly_eight_hours_is_accepted() -> None:
    i = inst(lease_until=T0 + 4 * H)
    assert policy.extend(i, 4, LIMITS, T0 + 10 * M) == T0 + 8 * H


def test_extension_one_second_past_eight_hours_is_refused_with_what_is_allowed() -> None:
    i = inst(lease_until=T0 + 4 * H)
    with pytest.raises(errors.LeaseMaxExceeded) as got:
        policy.extend(i, 4 + 1 / 3600, LIMITS, T0 + 10 * M)
    assert "at most 4 h more" in got.value.message
    assert got.value.data["allowed_hours"] == pytest.approx(4.0)


def test_extension_refusal_reports_partial_room() -> None:
    i = inst(lease_until=T0 + 6 * H + 30 * M)
    with pytest.raises(errors.LeaseMaxExceeded) as got:
        policy.extend(i, 2, LIMITS, T0 + 10 * M)
    assert "1 h 30 min" in got.value.message


@pytest.mark.parametrize(
    ("instance", "now"),
    [
        (inst(), T0 + 4 * H),  # exactly at lease expiry
        (inst(last_activity=T0 + 4 * H), T0 + 5 * H),  # after expiry
        (inst(), IDLE_AT),  # the idle deadline passed: it is being ended
        (inst(state=InstanceState.TERMINATING), T0 + M),
        (inst(state=InstanceState.TERMINATED), T0 + M),
    ],
)
def test_extension_refused_after_expiry_or_during_termination(
    instance: Instance, now: datetime
) -> None:
    with pytest.raises(errors.LeaseRefused):
        policy.extend(instance, 1, LIMITS, now)


def test_extension_must_be_positive() -> None:
    with pytest.raises(errors.LeaseRefused):
        policy.extend(inst(), 0, LIMITS, T0)


def test_extension_never_passes_hard_cap_from_earlier_provider_start() -> None:
    i = inst(provider_started_at=T0 - H, lease_until=T0 + 4 * H)
    assert policy.lease_room(i, LIMITS) == 3 * H
    with pytest.raises(errors.LeaseMaxExceeded):
        policy.extend(i, 4, LIMITS, T0)


# --- cost math -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("billing", "duration", "billed"),
    [
        (Billing.PER_SECOND, timedelta(0), 0),
        (Billing.PER_SECOND, timedelta(seconds=0.2), 1),
        (Billing.PER_SECOND, 61 * S, 61),
        (Billing.PER_MINUTE, timedelta(0), 0),
        (Billing.PER_MINUTE, S, 60),  # Lambda: each started minute
        (Billing.PER_MINUTE, 60 * S, 60),
        (Billing.PER_MINUTE, 61 * S, 120),
        (Billing.PER_MINUTE, H + S, 3660),
    ],
)
def test_billed_seconds(billing: Billing, duration: timedelta, billed: float) -> None:
    assert policy.billed_seconds(T0, T0 + duration, billing) == billed


def test_estimate_per_minute_rounds_up() -> None:
    assert policy.estimate(1.2, 61 * S, Billing.PER_MINUTE) == pytest.approx(1.2 * 2 / 60)
    assert policy.estimate(1.2, 4 * H, Billing.PER_SECOND) == pytest.approx(4.8)


def test_cost_so_far_and_est_total() -> None:
    i = inst(last_activity=T0 + H)
    assert policy.cost_so_far(i, T0 + H) == pytest.approx(1.2)
    # earliest deadline: idle at T0 + 1 h 30 min
    assert policy.est_total(i, NO, LIMITS, T0 + H) == pytest.approx(1.8)
    # the budget counts to the lease end (activity may push idle that far)
    assert policy.committed_cost(i, LIMITS, T0 + H) == pytest.approx(4.8)


def test_cost_nothing_before_the_provider_acknowledged() -> None:
    i = inst(state=InstanceState.REQUESTED, provider_id=None)
    assert policy.cost_so_far(i, T0 + H) == 0.0
    # but its estimate counts from now: it may start at any moment
    assert policy.est_total(i, NO, LIMITS, T0) == pytest.approx(0.6)


def test_cost_of_ended_instance_stops_at_termination() -> None:
    i = inst(state=InstanceState.TERMINATED, terminated_at=T0 + H)
    assert policy.cost_so_far(i, T0 + 5 * H) == pytest.approx(1.2)
    assert policy.est_total(i, NO, LIMITS, T0 + 5 * H) == pytest.approx(1.2)


def test_limits_from_settings() -> None:
    from gpuwarden.config.settings import BudgetSettings, PolicySettings, Settings
    from gpuwarden.fleet.limits import limits_from

    lim = limits_from(
        Settings(
            policy=PolicySettings(idle_timeout="5s", hard_cap="20h", lease_max="8h"),
            budget=BudgetSettings(daily_limit=10.0),
        )
    )
    assert lim.idle_timeout == 5 * S
    assert lim.hard_cap == 20 * H
    assert lim.daily_limit == 10.0


# --- vanish_reason: the dead-man switch or someone else ------------------------------------

DM = policy.Limits(deadman_timeout=20 * M, deadman_margin=10 * M)  # hard cap 8 h
PROBED = T0 + H  # the last good probe


@pytest.mark.parametrize(
    ("name", "instance", "first_missed", "switch", "reason"),
    [
        ("probed, missed soon after", inst(last_probe_at=PROBED, last_probe_ok=True),
         PROBED + 5 * M, True, R.VANISHED),
        ("probed, one second short of the timeout", inst(last_probe_at=PROBED, last_probe_ok=True),
         PROBED + 20 * M - S, True, R.VANISHED),
        ("probed, exactly the timeout", inst(last_probe_at=PROBED, last_probe_ok=True),
         PROBED + 20 * M, True, R.DEADMAN),
        ("probed, long silent (daemon was down)", inst(last_probe_at=PROBED, last_probe_ok=True),
         PROBED + 3 * H, True, R.DEADMAN),
        ("no switch able to end it", inst(last_probe_at=PROBED, last_probe_ok=True),
         PROBED + 3 * H, False, R.VANISHED),
        ("last probe failed: counts from running_at",
         inst(running_at=T0 + M, last_probe_at=PROBED, last_probe_ok=False),
         T0 + 21 * M, True, R.DEADMAN),
        ("last probe failed: running_at too recent",
         inst(running_at=T0 + M, last_probe_at=PROBED, last_probe_ok=False),
         T0 + 21 * M - S, True, R.VANISHED),
        ("never probed, never running: counts from creation", inst(), T0 + 20 * M, True,
         R.DEADMAN),
        ("never probed, young", inst(), T0 + 19 * M, True, R.VANISHED),
        ("fresh probe but past hard cap + margin",
         inst(last_probe_at=T0 + 8 * H + 9 * M, last_probe_ok=True),
         T0 + 8 * H + 10 * M, True, R.DEADMAN),
        ("fresh probe, one second short of hard cap + margin",
         inst(last_probe_at=T0 + 8 * H + 9 * M, last_probe_ok=True),
         T0 + 8 * H + 10 * M - S, True, R.VANISHED),
        ("hard cap counts from the earlier provider start",
         inst(provider_started_at=T0 - H, last_probe_at=T0 + 7 * H + 9 * M, last_probe_ok=True),
         T0 + 7 * H + 10 * M, True, R.DEADMAN),
    ],
)  # fmt: skip
def test_vanish_reason(
    name: str, instance: Instance, first_missed: datetime, switch: bool, reason: R
) -> None:
    assert policy.vanish_reason(instance, DM, first_missed, switch=switch) is reason, name


def test_last_contact_prefers_a_good_probe() -> None:
    assert policy.last_contact(inst()) == T0
    assert policy.last_contact(inst(running_at=T0 + M)) == T0 + M
    good = inst(running_at=T0 + M, last_probe_at=T0 + H, last_probe_ok=True)
    assert policy.last_contact(good) == T0 + H
    bad = inst(running_at=T0 + M, last_probe_at=T0 + H, last_probe_ok=False)
    assert policy.last_contact(bad) == T0 + M


def test_limits_from_settings_carry_the_deadman_timing() -> None:
    from gpuwarden.config.settings import PolicySettings, Settings
    from gpuwarden.fleet.limits import limits_from

    lim = limits_from(Settings(policy=PolicySettings(deadman_timeout="3s", deadman_margin="7m")))
    assert (lim.deadman_timeout, lim.deadman_margin) == (3 * S, 7 * M)


# --- the termination record ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "instance", "now", "at", "uptime_s", "cost", "reason"),
    [
        ("ended now, an hour up", inst(reason=R.IDLE), T0 + H, T0 + H, 3600.0, 1.2, R.IDLE),
        ("no reason recorded: vanished", inst(), T0 + H, T0 + H, 3600.0, 1.2, R.VANISHED),
        ("ended earlier: counts to terminated_at",
         inst(terminated_at=T0 + 30 * M, reason=R.MANUAL), T0 + H, T0 + 30 * M, 1800.0, 0.6,
         R.MANUAL),
        ("billing starts at the provider's start",
         inst(provider_started_at=T0 + 30 * M), T0 + H, T0 + H, 1800.0, 0.6, R.VANISHED),
        ("never acknowledged: no uptime, no cost",
         inst(state=InstanceState.REQUESTED, provider_id=None, reason=R.LAUNCH_FAILED),
         T0 + H, T0 + H, 0.0, 0.0, R.LAUNCH_FAILED),
        ("per-minute billing rounds the started minute up",
         inst(billing=Billing.PER_MINUTE, price_per_hour=0.6), T0 + 61 * S, T0 + 61 * S, 61.0,
         0.02, R.VANISHED),
        ("cost rounded to six places", inst(price_per_hour=1.0), T0 + S, T0 + S, 1.0,
         round(1 / 3600, 6), R.VANISHED),
        ("ended at its start", inst(), T0, T0, 0.0, 0.0, R.VANISHED),
    ],
)  # fmt: skip
def test_termination_of(
    name: str,
    instance: Instance,
    now: datetime,
    at: datetime,
    uptime_s: float,
    cost: float,
    reason: R,
) -> None:
    t = policy.termination_of(instance, now)
    assert (t.at, t.uptime_s, t.reason) == (at, uptime_s, reason), name
    assert t.cost == pytest.approx(cost, abs=1e-9), name
    assert (t.instance_id, t.provider, t.provider_id) == (
        instance.id,
        instance.provider,
        instance.provider_id,
    )
    assert (t.gpu, t.region, t.price_per_hour) == (
        instance.gpu,
        instance.region,
        instance.price_per_hour,
    )


def test_termination_cost_is_the_cost_so_far() -> None:
    i = inst(state=InstanceState.TERMINATED, terminated_at=T0 + 2 * H + 7 * S)
    assert policy.termination_of(i, T0 + 5 * H).cost == round(policy.cost_so_far(i, T0 + 5 * H), 6)


# --- watchdog strikes ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("strikes", "probe_ok", "after"),
    [(0, False, 1), (1, False, 2), (5, False, 6), (0, True, 0), (1, True, 0), (5, True, 0)],
)
def test_strikes_after_a_probe(strikes: int, probe_ok: bool, after: int) -> None:
    assert policy.strikes_after(inst(strikes=strikes), probe_ok) == after


@pytest.mark.parametrize(
    ("strikes", "limit", "out"),
    [
        (0, 2, False),
        (1, 2, False),  # one short of the limit
        (2, 2, True),  # exactly at the limit
        (3, 2, True),
        (2, 3, False),
        (3, 3, True),
        (1, 1, True),
    ],
)
def test_struck_out_at_the_threshold(strikes: int, limit: int, out: bool) -> None:
    assert policy.struck_out(strikes, policy.Limits(watchdog_failures=limit)) is out


def test_decide_and_the_watchdog_share_the_strike_rule() -> None:
    limits = policy.Limits(watchdog_failures=3)
    i = inst(strikes=2)
    assert policy.decide(i, NO, limits, T0).terminate is None
    struck = inst(strikes=policy.strikes_after(i, probe_ok=False))
    assert policy.struck_out(struck.strikes, limits)
    assert policy.decide(struck, NO, limits, T0).terminate is R.WATCHDOG


# --- spend windows -------------------------------------------------------------------------

PLUS2 = timezone(timedelta(hours=2))
MIDNIGHT = datetime(2026, 3, 2, tzinfo=UTC)


@pytest.mark.parametrize(
    ("now", "day", "month"),
    [
        (MIDNIGHT - timedelta(microseconds=1), datetime(2026, 3, 1, tzinfo=UTC),
         datetime(2026, 3, 1, tzinfo=UTC)),
        (MIDNIGHT, MIDNIGHT, datetime(2026, 3, 1, tzinfo=UTC)),
        (MIDNIGHT + S, MIDNIGHT, datetime(2026, 3, 1, tzinfo=UTC)),
        # 01:00 at UTC+2 is 23:00 UTC the day before: the windows are UTC
        (datetime(2026, 3, 2, 1, 0, tzinfo=PLUS2), datetime(2026, 3, 1, tzinfo=UTC),
         datetime(2026, 3, 1, tzinfo=UTC)),
        (datetime(2026, 3, 1, tzinfo=UTC) - S, datetime(2026, 2, 28, tzinfo=UTC),
         datetime(2026, 2, 1, tzinfo=UTC)),
        (datetime(2028, 2, 29, 12, tzinfo=UTC), datetime(2028, 2, 29, tzinfo=UTC),
         datetime(2028, 2, 1, tzinfo=UTC)),
        (datetime(2027, 1, 1, tzinfo=UTC) - S, datetime(2026, 12, 31, tzinfo=UTC),
         datetime(2026, 12, 1, tzinfo=UTC)),
        (datetime(2027, 1, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC),
         datetime(2027, 1, 1, tzinfo=UTC)),
    ],
)  # fmt: skip
def test_day_and_month_windows_are_utc(now: datetime, day: datetime, month: datetime) -> None:
    assert policy.day_start(now) == day
    assert policy.month_start(now) == month


@pytest.mark.parametrize(
    ("days", "now", "start"),
    [
        (1, MIDNIGHT + H, MIDNIGHT),
        (1, MIDNIGHT - S, MIDNIGHT - 24 * H),
        (7, MIDNIGHT, MIDNIGHT - 6 * 24 * H),
        (3, datetime(2026, 3, 2, 1, 0, tzinfo=PLUS2), datetime(2026, 2, 27, tzinfo=UTC)),
    ],
)
def test_days_start(days: int, now: datetime, start: datetime) -> None:
    assert policy.days_start(days, now) == start


# --- idle tails and spend sums -------------------------------------------------------------


def term(**kw: object) -> Termination:
    base = Termination(
        at=T0,
        instance_id="abc",
        provider="fake",
        provider_id="1001",
        reason=R.IDLE,
        uptime_s=7200.0,
        gpu="RTX 4090",
        region="EU",
        price_per_hour=1.2,
        cost=2.4,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "t", "tail"),
    [
        ("idle: the idle_timeout tail", term(), 0.6),
        ("not idle: no tail", term(reason=R.MANUAL), 0.0),
        ("up shorter than idle_timeout: all of it", term(uptime_s=600.0, cost=0.2), 0.2),
        ("up exactly idle_timeout", term(uptime_s=1800.0, cost=0.6), 0.6),
        ("never more than its cost", term(cost=0.1), 0.1),
    ],
)
def test_idle_tail(name: str, t: Termination, tail: float) -> None:
    assert policy.idle_tail(t, LIMITS) == pytest.approx(tail), name


def test_spend_by_utc_day_provider_and_reason() -> None:
    ended = [
        term(at=MIDNIGHT - S, cost=2.4),  # idle, the last second of 1 March
        term(at=MIDNIGHT, provider="lambda", reason=R.MANUAL, cost=1.0),  # 2 March
        term(at=datetime(2026, 3, 2, 1, 0, tzinfo=PLUS2), reason=R.BUDGET, cost=0.5),  # 1 March
    ]
    live = [inst(created_at=MIDNIGHT, lease_until=MIDNIGHT + 4 * H, last_activity=MIDNIGHT)]
    s = policy.spend(ended, live, LIMITS, MIDNIGHT + H)
    march1, march2 = date(2026, 3, 1), date(2026, 3, 2)
    assert list(s.days) == [march1, march2]  # in the order first counted
    assert s.days[march1].total == pytest.approx(2.9)
    assert s.days[march1].idle == pytest.approx(0.6)
    assert s.days[march2].total == pytest.approx(2.2)  # 1.0 ended + 1.2 live so far
    assert s.days[march2].idle == 0.0
    assert s.by_provider == pytest.approx({"fake": 4.1, "lambda": 1.0})
    assert s.by_reason == pytest.approx({"idle": 2.4, "manual": 1.0, "budget": 0.5, "live": 1.2})
    assert (s.total, s.idle, s.live) == pytest.approx((5.1, 0.6, 1.2))


def test_spend_of_nothing() -> None:
    s = policy.spend([], [], LIMITS, T0)
    assert (s.days, s.by_provider, s.by_reason) == ({}, {}, {})
    assert (s.total, s.idle, s.live) == (0.0, 0.0, 0.0)


def test_spend_counts_a_live_instance_on_the_utc_day_of_now() -> None:
    s = policy.spend([], [inst()], LIMITS, MIDNIGHT - S)
    assert list(s.days) == [date(2026, 3, 1)]
    s = policy.spend([], [inst()], LIMITS, MIDNIGHT)
    assert list(s.days) == [date(2026, 3, 2)]
