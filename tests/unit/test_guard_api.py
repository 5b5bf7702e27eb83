"""The cost guard's service functions (what the control socket exposes): data in, data out."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from guard_support import settings
from tests.conftest import T0, MakeApp

from gpuwarden.control import instances as api
from gpuwarden.core import errors
from gpuwarden.core.clock import FakeClock
from gpuwarden.core.model import Billing, TerminationReason
from gpuwarden.fleet import launcher
from gpuwarden.providers.base import Offer
from gpuwarden.providers.fake import FakeProvider


async def test_offers_are_cheapest_first_across_providers(
    tmp_path: Path, make_app: MakeApp, clock: FakeClock
) -> None:
    vast = FakeProvider(clock, "vast")
    lam = FakeProvider(clock, "lambda", billing=Billing.PER_MINUTE)
    app = await make_app(clock=clock, providers=[vast, lam])
    found = await api.offers(app, gpu_ram_gb=0, limit=4)
    assert found["warnings"] == []
    got = found["offers"]
    prices = [o["price_per_hour"] for o in got]
    assert prices == sorted(prices) and len(got) == 4
    assert {o["provider"] for o in got} == {"vast", "lambda"}
    only = (await api.offers(app, provider="lambda", gpu="a100"))["offers"]
    assert [o["gpu"] for o in only] == ["A100 80GB"]
    assert only[0]["billing"] == "per_minute"
    with pytest.raises(errors.ProviderUnavailable):
        await api.offers(app, provider="nope")
    await app.store.close()


async def test_a_provider_that_failed_is_a_warning_not_a_silent_gap(
    tmp_path: Path, make_app: MakeApp, clock: FakeClock
) -> None:
    """The A10 seller is rate-limited: an A10 is not found elsewhere (the A100 seller's
    "A100 80GB" is not an A10), and the missing provider is named in offers and launch."""
    a10 = FakeProvider(clock, "lambda", offers=[_offer("lambda", "A10", 0.75)])
    a100 = FakeProvider(clock, "vast", offers=[_offer("vast", "A100 SXM4", 1.05)])
    app = await make_app(clock=clock, providers=[a10, a100])
    a10.faults.fail_next["search_offers"] = 3
    found = await api.offers(app, gpu="A10")
    assert found["offers"] == []
    assert len(found["warnings"]) == 1 and "lambda" in found["warnings"][0]
    with pytest.raises(errors.NoOffer, match="no offers from lambda"):
        await api.launch(app, gpu="A10", dry_run=True, by="test")
    est = await api.launch(app, gpu="a100", dry_run=True, by="test")
    assert est["gpu"] == "A100 SXM4"
    assert [w for w in est["warnings"] if "lambda" in w] == est["warnings"] != []
    assert a100.calls_to("launch") == []


def _offer(provider: str, gpu: str, price: float) -> Offer:
    return Offer(
        provider=provider,
        offer_id=f"{provider}-1",
        gpu_name=gpu,
        num_gpus=1,
        gpu_ram_gb=24.0,
        price_per_hour=price,
        region="US",
    )


async def test_launch_dry_run_estimates_without_renting(
    tmp_path: Path, make_app: MakeApp, clock: FakeClock
) -> None:
    fake = FakeProvider(clock, "lambda", billing=Billing.PER_MINUTE)
    app = await make_app(settings(tmp_path, budget={"daily_limit": 1.0}), clock, [fake])
    est = await api.launch(app, gpu="a10", hours=2, dry_run=True, by="test")
    assert est["gpu"] == "A10" and est["hours"] == 2
    assert est["estimated_cost"] == pytest.approx(1.5)
    assert est["refused"] is not None and "daily limit" in est["refused"]
    assert est["refused_code"] == "budget_exceeded"
    # What ends it besides the lease, and the budget left today before this rental.
    assert est["idle_timeout_s"] == 30 * 60 and est["hard_cap_h"] == 8
    assert (est["daily_limit"], est["daily_left"], est["daily_committed"]) == (1.0, 1.0, 0.0)
    assert est["warnings"] == []
    ok = await api.launch(app, gpu="a10", hours=1, dry_run=True, by="test")
    assert (ok["refused"], ok["refused_code"]) == (None, None)
    assert fake.calls_to("launch") == []
    with pytest.raises(errors.NoOffer):
        await api.launch(app, offer_id="no-such-offer", by="test")
    await app.store.close()


async def test_status_reports_deadline_cost_and_estimate(
    tmp_path: Path, make_app: MakeApp, clock: FakeClock
) -> None:
    fake = FakeProvider(clock, "fake")
    app = await make_app(settings(tmp_path, idle_timeout="30m"), clock, [fake])
    out = await api.launch(app, offer_id=fake.offers[1].offer_id, hours=2, by="test")  # $1.20/h
    clock.set(T0 + timedelta(minutes=10))
    st = await api.status(app)
    json.dumps(st)  # JSON-friendly
    [row] = st["instances"]
    assert row["id"] == out["id"]
    assert row["state"] == "provisioning"
    assert row["deadline_reason"] == "idle"
    assert row["time_left_s"] == 20 * 60
    assert row["uptime_s"] == 600
    assert row["cost_now"] == pytest.approx(0.2)
    assert row["est_total"] == pytest.approx(0.6)
    assert row["expired"] is False
    clock.set(T0 + timedelta(minutes=31))  # the guard is not running: it shows as expired
    [late] = (await api.status(app))["instances"]
    assert late["expired"] is True
    await app.store.close()


async def test_extend_refusal_says_how_much_is_allowed(
    tmp_path: Path, make_app: MakeApp, clock: FakeClock
) -> None:
    fake = FakeProvider(clock, "fake")
    app = await make_app(clock=clock, providers=[fake])
    inst = await launcher.launch(app, fake.offers[0], hours=6)
    with pytest.raises(errors.LeaseMaxExceeded) as got:
        await api.extend(app, id=inst.id, hours=3, by="test")
    assert "at most 2 h more" in got.value.message
    out = await api.extend(app, id=inst.id, hours=2, by="test")
    assert out["still_allowed_h"] == 0
    with pytest.raises(errors.NotFound):
        await api.extend(app, id="nope", hours=1, by="test")
    await app.store.close()


async def test_destroy_history_and_costs(
    tmp_path: Path, make_app: MakeApp, clock: FakeClock
) -> None:
    fake = FakeProvider(clock, "fake")
    app = await make_app(settings(tmp_path, idle_timeout="30m"), clock, [fake])
    a = await launcher.launch(app, fake.offers[1])  # $1.20/h
    b = await launcher.launch(app, fake.offers[0])  # $0.40/h
    clock.set(T0 + timedelta(hours=1))
    await app.terminator.end(a.id, TerminationReason.IDLE)
    done = await api.destroy(app, id=b.label, by="test")  # by label works too
    assert done["confirmed"] is True and done["reason"] == "manual"
    with pytest.raises(errors.InvalidState):
        await api.destroy(app, id=b.id, by="test")
    hist = await api.history(app, hours=2)
    assert [(h["instance_id"], h["reason"]) for h in hist] == [(a.id, "idle"), (b.id, "manual")]
    assert hist[0]["cost"] == pytest.approx(1.2) and hist[0]["uptime_s"] == 3600
    costs = await api.costs(app, days=1)
    assert costs["total"] == pytest.approx(1.6)
    assert costs["idle"] == pytest.approx(0.6)  # the idle tail: 30 min at $1.20/h
    assert costs["by_reason"] == {"idle": pytest.approx(1.2), "manual": pytest.approx(0.4)}
    assert costs["days"] == [
        {
            "day": "2026-03-01",
            "total": 1.6,
            "idle": 0.6,
            "warm_idle": 0.0,  # no job ever left an instance warm here
            "wait_saved_s": 0.0,
            "warm_reuses": 0,
        }
    ]
    assert costs["warm_idle"] == 0.0 and costs["wait_saved_s"] == 0.0
    assert (await api.destroy_all(app, by="test"))["count"] == 0
    await app.store.close()


async def test_an_instance_is_named_by_a_unique_id_prefix_or_its_label(
    tmp_path: Path, make_app: MakeApp, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeProvider(clock, "fake")
    app = await make_app(clock=clock, providers=[fake])
    ids = iter(["abcd1234", "abcd9999", "abce0000", "f00d0001"])
    monkeypatch.setattr(launcher, "new_instance_id", lambda: next(ids))
    a, b, c, d = [await launcher.launch(app, fake.offers[0]) for _ in range(4)]

    async def named(ref: str) -> str:
        return (await api.resolve_instance(app, ref)).id

    assert await named("abcd1234") == a.id  # the full id
    assert await named(c.label) == c.id  # the full label
    assert await named("abce") == c.id  # a unique prefix of 4
    assert await named("abcd9") == b.id
    with pytest.raises(errors.Ambiguous) as amb:
        await named("abcd")
    assert amb.value.code == "ambiguous"
    assert [x["id"] for x in amb.value.data["candidates"]] == [a.id, b.id]
    assert "abcd1234 (provisioning), abcd9999 (provisioning)" in amb.value.message
    with pytest.raises(errors.NotFound, match="at least 4 characters"):
        await named("abc")  # too short to be a prefix, though it is one
    with pytest.raises(errors.NotFound):
        await named("beef")
    with pytest.raises(errors.NotFound):
        await named(c.label[:-1])  # a label is only ever whole
    # Of several matches, the only live one is meant: the others are history.
    await api.destroy(app, id="abcd1", by="test")
    assert await named("abcd") == b.id
    # The service functions resolve the same way.
    assert (await api.activity(app, id="f00d", by="test"))["id"] == d.id
    assert (await api.extend(app, id="abcd", hours=1, by="test"))["id"] == b.id
    assert (await api.destroy(app, id="abce", by="test"))["id"] == c.id
    await app.store.close()


async def test_a_launch_ended_by_the_guard_during_the_provider_call_still_gets_its_id(
    tmp_path: Path, make_app: MakeApp, clock: FakeClock
) -> None:
    """With a deadline that falls during the provider's launch call, the guard commits
    TERMINATING while the launch path still believes the row is REQUESTED. The launch must
    record the provider's id on the ending row (so it is destroyed now), not fail with
    'terminating -> provisioning' and leave the instance to bill until the reconciler."""
    fake = FakeProvider(clock, "fake")
    app = await make_app(clock=clock, providers=[fake])
    real_get = app.store.get_instance
    raced: list[str] = []

    async def read_then_the_guard_ends_it(iid: str) -> Any:
        row = await real_get(iid)  # REQUESTED, as the launch path sees it
        if fake.calls_to("launch") and not raced:
            raced.append(iid)
            await app.terminator.begin(iid, TerminationReason.IDLE, {"why": "idle 0s"})
        return row

    app.store.get_instance = read_then_the_guard_ends_it  # type: ignore[method-assign,assignment]
    inst = await launcher.launch(app, fake.offers[0], hours=1)
    assert raced  # the race happened
    inst = await real_get(inst.id)
    assert inst.provider_id is not None
    assert inst.reason is TerminationReason.IDLE
    assert len(fake.calls_to("destroy")) == 1  # destroyed at once, by its id
