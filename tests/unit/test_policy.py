"""Table tests of the pure cost-guard decisions, at every boundary."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from gpuwarden.core import errors, policy
from gpuwarden.core.model import Billing, Instance, InstanceState
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
    assert policy.est_total(i, T0 + H, LIMITS) == pytest.approx(1.8)
    # the budget counts to the lease end (activity may push idle that far)
    assert policy.committed_cost(i, T0 + H, LIMITS) == pytest.approx(4.8)


def test_cost_nothing_before_the_provider_acknowledged() -> None:
    i = inst(state=InstanceState.REQUESTED, provider_id=None)
    assert policy.cost_so_far(i, T0 + H) == 0.0
    # but its estimate counts from now: it may start at any moment
    assert policy.est_total(i, T0, LIMITS) == pytest.approx(0.6)


def test_cost_of_ended_instance_stops_at_termination() -> None:
    i = inst(state=InstanceState.TERMINATED, terminated_at=T0 + H)
    assert policy.cost_so_far(i, T0 + 5 * H) == pytest.approx(1.2)
    assert policy.est_total(i, T0 + 5 * H, LIMITS) == pytest.approx(1.2)


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
