"""The notifier's pure decisions: which store events call for a message, when a lease warning
and a destroy escalation fall due, the token bucket and the retry backoff."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest
from tests.conftest import T0

from gpuwarden.core.model import (
    BUDGET_STOPPED,
    QUEUE_PAUSED_FLAG,
    EntityKind,
    Event,
    Instance,
    InstanceState,
    NotifyKind,
)
from gpuwarden.notify.plan import TokenBucket, from_event, planned, retry_delay

WARN = timedelta(minutes=15)
ESCALATE = timedelta(minutes=5)


def _event(kind: EntityKind, entity: str, name: str, **kw: object) -> Event:
    fields: dict[str, object] = {
        "id": 1,
        "at": T0,
        "kind": kind,
        "entity_id": entity,
        "name": name,
        "from_state": None,
        "to_state": None,
        "reason": None,
        "details": {},
    }
    fields.update(kw)
    return Event(**fields)  # type: ignore[arg-type]


def _inst(**kw: object) -> Instance:
    base = Instance(
        id="i1",
        provider="fake",
        label="gpuwarden-main-i1",
        state=InstanceState.RUNNING,
        created_at=T0,
        lease_until=T0 + timedelta(hours=1),
        last_activity=T0,
        price_per_hour=1.0,
        gpu="RTX 4090",
        provider_id="p1",
    )
    return replace(base, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("reason", "kind"),
    [("idle", NotifyKind.INSTANCE_ENDED), ("deadman", NotifyKind.DEADMAN)],
)
def test_an_ended_instance_is_told_with_its_reason(reason: str, kind: NotifyKind) -> None:
    ev = _event(
        EntityKind.INSTANCE,
        "i1",
        "state",
        to_state="terminated",
        reason=reason,
        details={"gpu": "A100", "uptime_s": 3720.0, "cost": 1.5},
    )
    msg = from_event(ev, "main")
    assert msg is not None
    assert msg.kind is kind
    assert "i1" in msg.title and "A100" in msg.body
    assert "1h02m" in msg.body and "$1.50" in msg.body
    if kind is NotifyKind.INSTANCE_ENDED:
        assert "(idle)" in msg.title


def test_other_instance_events_are_not_told() -> None:
    for ev in (
        _event(EntityKind.INSTANCE, "i1", "state", to_state="terminating", reason="idle"),
        _event(EntityKind.INSTANCE, "i1", "extended"),
        _event(EntityKind.INSTANCE, "i1", "state", to_state="launch_failed"),
        _event(
            EntityKind.DAEMON, QUEUE_PAUSED_FLAG, "flag", reason="user", details={"value": True}
        ),
        _event(
            EntityKind.DAEMON,
            QUEUE_PAUSED_FLAG,
            "flag",
            reason="insufficient_credit",
            details={"value": False},
        ),
    ):
        assert from_event(ev, "main") is None


def test_budget_and_credit_stops_are_told() -> None:
    budget = _event(
        EntityKind.DAEMON,
        "daemon",
        BUDGET_STOPPED,
        details={"window": "daily", "limit": 10.0, "spent": 10.2, "instances": 2},
    )
    msg = from_event(budget, "main")
    assert msg is not None and msg.kind is NotifyKind.BUDGET_STOP
    assert "daily" in msg.title and "$10.20" in msg.body and "$10.00" in msg.body
    credit = _event(
        EntityKind.DAEMON,
        QUEUE_PAUSED_FLAG,
        "flag",
        reason="insufficient_credit",
        details={"value": True},
    )
    msg = from_event(credit, "main")
    assert msg is not None and msg.kind is NotifyKind.BUDGET_STOP and "credit" in msg.title


def test_a_lease_warning_falls_due_exactly_its_warning_before_the_end() -> None:
    inst = _inst()
    due_at = inst.lease_until - WARN
    due, later = planned(
        [inst],
        installation="main",
        lease_warning=WARN,
        escalate_after=ESCALATE,
        now=due_at - timedelta(seconds=1),
    )
    assert (due, later) == ([], due_at)
    due, later = planned(
        [inst], installation="main", lease_warning=WARN, escalate_after=ESCALATE, now=due_at
    )
    [msg] = due
    assert msg.kind is NotifyKind.LEASE_ENDING and "15 min" in msg.title
    assert later is None
    # an extended lease is a new key: warned about again near its new end
    longer = replace(inst, lease_until=inst.lease_until + timedelta(hours=1))
    [again], _ = planned(
        [longer],
        installation="main",
        lease_warning=WARN,
        escalate_after=ESCALATE,
        now=longer.lease_until - WARN,
    )
    assert again.key != msg.key and again.instance_id == "i1"


def test_a_destroy_escalates_after_five_minutes_of_terminating() -> None:
    inst = _inst(state=InstanceState.TERMINATING, terminating_at=T0, extra={"destroy_attempts": 9})
    due, later = planned(
        [inst],
        installation="main",
        lease_warning=WARN,
        escalate_after=ESCALATE,
        now=T0 + timedelta(minutes=4, seconds=59),
    )
    assert (due, later) == ([], T0 + ESCALATE)
    [msg], later = planned(
        [inst], installation="main", lease_warning=WARN, escalate_after=ESCALATE, now=T0 + ESCALATE
    )
    assert msg.kind is NotifyKind.DESTROY_FAILING and "9 attempts" in msg.body
    assert later is None


def test_a_lease_already_past_is_not_warned_about() -> None:
    inst = _inst(lease_until=T0)
    assert planned(
        [inst], installation="main", lease_warning=WARN, escalate_after=ESCALATE, now=T0
    ) == ([], None)


def test_the_token_bucket_allows_a_burst_then_the_rate() -> None:
    bucket = TokenBucket(rate=0.1, burst=2)  # one per 10 s after two at once
    assert bucket.take(100.0) == 0.0
    assert bucket.take(100.0) == 0.0
    assert bucket.take(100.0) == pytest.approx(10.0)
    assert bucket.take(105.0) == pytest.approx(5.0)  # nothing was taken by asking
    assert bucket.take(110.0) == 0.0
    assert bucket.take(1000.0) == 0.0  # refilled, but never beyond the burst
    assert bucket.take(1000.0) == 0.0
    assert bucket.take(1000.0) > 0.0


def test_retries_back_off_and_are_capped() -> None:
    assert [retry_delay(n) for n in (1, 2, 3)] == [2.0, 4.0, 8.0]
    assert retry_delay(20) == 300.0
