"""The reconciler against a FakeProvider: adoption, orphans, vanished instances, failed
launches, and the credit and budget stops. Each pass is called directly."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from guard_support import settings
from tests.conftest import T0, MakeApp

from gpuwarden.control import instances as api
from gpuwarden.core import errors
from gpuwarden.core.clock import FakeClock, format_ts
from gpuwarden.core.model import (
    QUEUE_PAUSED_FLAG,
    EntityKind,
    InstanceState,
    TerminationReason,
    instance_label,
)
from gpuwarden.fleet import budget, launcher
from gpuwarden.loops.reconciler import Reconciler
from gpuwarden.providers.fake import FakeProvider


@pytest.fixture
def fake(clock: FakeClock) -> FakeProvider:
    return FakeProvider(clock, "fake", boot_delay=timedelta(seconds=10))


async def test_copies_provider_state_into_ours(
    tmp_path: Path, make_app: MakeApp, clock: FakeClock, fake: FakeProvider
) -> None:
    app = await make_app(clock=clock, providers=[fake])
    inst = await launcher.launch(app, fake.offers[0])
    rec = Reconciler(app)
    await rec.pass_once()
    assert (await app.store.get_instance(inst.id)).state is InstanceState.PROVISIONING
    clock.set(T0 + timedelta(seconds=11))
    await rec.pass_once()
    got = await app.store.get_instance(inst.id)
    assert got.state is InstanceState.RUNNING
    assert got.ssh_host == "127.0.0.1"
    assert got.ssh_port is not None
    assert got.provider_started_at == T0
    await app.store.close()


async def test_adopts_an_intent_whose_launch_answer_was_lost_and_ends_it(
    tmp_path: Path, make_app: MakeApp, clock: FakeClock, fake: FakeProvider
) -> None:
    app = await make_app(clock=clock, providers=[fake])
    fake.faults.transient_after_create_next = 1
    with pytest.raises(errors.ProviderUnavailable):
        await launcher.launch(app, fake.offers[0])
    [inst] = await app.store.live_instances()
    assert inst.state is InstanceState.REQUESTED  # never assume nothing exists
    assert len(fake.live()) == 1
    await Reconciler(app).pass_once()
    got = await app.store.get_instance(inst.id)
    assert got.state is InstanceState.TERMINATED
    assert got.reason is TerminationReason.ORPHAN
    assert got.provider_id is not None
    assert fake.bills[got.provider_id].end == T0
    assert fake.live() == []
    assert len(await app.store.instances()) == 1  # adopted into its own row
    await app.store.close()


async def test_destroys_an_unknown_labelled_instance_as_an_orphan(
    tmp_path: Path, make_app: MakeApp, clock: FakeClock, fake: FakeProvider
) -> None:
    app = await make_app(clock=clock, providers=[fake])
    pid = fake.spawn(instance_label("main", "deadbeef"))
    foreign = fake.spawn(instance_label("other", "cafe0000"))  # another installation's
    await Reconciler(app).pass_once()
    got = await app.store.get_instance("deadbeef")
    assert got.state is InstanceState.TERMINATED
    assert got.reason is TerminationReason.ORPHAN
    assert got.provider_id == pid
    assert fake.bills[pid].end == T0
    assert fake.bills[foreign].end is None  # not ours: left alone
    [term] = await app.store.terminations(T0)
    assert term.reason is TerminationReason.ORPHAN
    names = [e.name for e in await app.store.events(entity_id="deadbeef")]
    assert "orphan_found" in names
    await app.store.close()


async def test_an_instance_for_a_given_up_intent_is_an_orphan_in_a_new_row(
    tmp_path: Path, make_app: MakeApp, clock: FakeClock, fake: FakeProvider
) -> None:
    app = await make_app(clock=clock, providers=[fake])
    fake.faults.no_capacity.add(fake.offers[0].offer_id)
    with pytest.raises(errors.NoOffer):
        await launcher.launch(app, fake.offers[0])
    [failed] = await app.store.instances()
    assert failed.state is InstanceState.LAUNCH_FAILED
    pid = fake.spawn(failed.label)  # the provider created it after all
    await Reconciler(app).pass_once()
    rows = await app.store.instances()
    assert len(rows) == 2
    orphan = next(r for r in rows if r.id != failed.id)
    assert orphan.provider_id == pid
    assert orphan.reason is TerminationReason.ORPHAN
    assert orphan.state is InstanceState.TERMINATED
    assert (await app.store.get_instance(failed.id)).state is InstanceState.LAUNCH_FAILED
    await app.store.close()


async def test_vanished_only_after_two_misses_past_grace(
    tmp_path: Path, make_app: MakeApp, clock: FakeClock, fake: FakeProvider
) -> None:
    app = await make_app(settings(tmp_path, vanish_grace="60s"), clock, [fake])
    inst = await launcher.launch(app, fake.offers[0])
    rec = Reconciler(app)
    clock.set(T0 + timedelta(seconds=5))
    await fake.destroy(str(inst.provider_id))  # the provider ended it, not us
    fake.calls.clear()
    for at in (30, 45, 61):  # two misses inside the grace do not count; 61 s is the first
        clock.set(T0 + timedelta(seconds=at))
        await rec.pass_once()
        assert (await app.store.get_instance(inst.id)).state is InstanceState.PROVISIONING
    clock.set(T0 + timedelta(seconds=91))
    await rec.pass_once()
    got = await app.store.get_instance(inst.id)
    assert got.state is InstanceState.TERMINATED
    assert got.reason is TerminationReason.VANISHED
    await app.store.close()


async def test_listing_lag_is_not_vanishing(
    tmp_path: Path, make_app: MakeApp, clock: FakeClock, fake: FakeProvider
) -> None:
    app = await make_app(settings(tmp_path, vanish_grace="10s"), clock, [fake])
    fake.faults.listing_lag = timedelta(minutes=10)
    inst = await launcher.launch(app, fake.offers[0])
    rec = Reconciler(app)
    for at in (20, 40, 60, 80):
        clock.set(T0 + timedelta(seconds=at))
        await rec.pass_once()
    assert (await app.store.get_instance(inst.id)).state.live  # get() still sees it
    await app.store.close()


async def test_a_failed_listing_is_skipped_never_read_as_empty(
    tmp_path: Path, make_app: MakeApp, clock: FakeClock, fake: FakeProvider
) -> None:
    app = await make_app(settings(tmp_path, vanish_grace="10s"), clock, [fake])
    inst = await launcher.launch(app, fake.offers[0])
    await fake.destroy(str(inst.provider_id))
    fake.faults.fail_next["list_instances"] = 5
    rec = Reconciler(app)
    for at in (20, 40, 60, 80, 100):
        clock.set(T0 + timedelta(seconds=at))
        await rec.pass_once()
    assert (await app.store.get_instance(inst.id)).state is InstanceState.PROVISIONING
    await app.store.close()


async def test_an_intent_never_listed_becomes_launch_failed(
    tmp_path: Path, make_app: MakeApp, clock: FakeClock, fake: FakeProvider
) -> None:
    app = await make_app(settings(tmp_path, vanish_grace="60s"), clock, [fake])
    fake.faults.fail_next["launch"] = 1  # a 5xx that created nothing
    with pytest.raises(errors.ProviderUnavailable):
        await launcher.launch(app, fake.offers[0])
    [inst] = await app.store.instances()
    rec = Reconciler(app)
    for at in (10, 61):
        clock.set(T0 + timedelta(seconds=at))
        await rec.pass_once()
        assert (await app.store.get_instance(inst.id)).state is InstanceState.REQUESTED
    clock.set(T0 + timedelta(seconds=91))
    await rec.pass_once()
    got = await app.store.get_instance(inst.id)
    assert got.state is InstanceState.LAUNCH_FAILED
    assert got.reason is TerminationReason.LAUNCH_FAILED
    await app.store.close()


async def test_a_terminating_instance_no_longer_listed_is_confirmed(
    tmp_path: Path, make_app: MakeApp, clock: FakeClock, fake: FakeProvider
) -> None:
    app = await make_app(clock=clock, providers=[fake])
    inst = await launcher.launch(app, fake.offers[0])
    await app.terminator.begin(inst.id, TerminationReason.MANUAL)
    await fake.destroy(str(inst.provider_id))
    await Reconciler(app).pass_once()
    got = await app.store.get_instance(inst.id)
    assert got.state is InstanceState.TERMINATED
    assert got.reason is TerminationReason.MANUAL
    await app.store.close()


async def test_credit_under_the_floor_ends_everything_and_pauses_the_queue(
    tmp_path: Path, make_app: MakeApp, clock: FakeClock, fake: FakeProvider
) -> None:
    other = FakeProvider(clock, "other")
    conf = settings(tmp_path, budget={"credit_floor": 1.0})
    app = await make_app(conf, clock, [fake, other])
    a = await launcher.launch(app, fake.offers[0])
    b = await launcher.launch(app, other.offers[0])
    fake.credit = 0.5
    await Reconciler(app).pass_once()
    for inst in (a, b):
        got = await app.store.get_instance(inst.id)
        assert got.state is InstanceState.TERMINATED
        assert got.reason is TerminationReason.INSUFFICIENT_CREDIT
    assert await app.store.get_flag(QUEUE_PAUSED_FLAG) is True
    [flag] = [e for e in await app.store.events(kind=EntityKind.DAEMON) if e.name == "flag"]
    assert flag.reason == "insufficient_credit"
    await app.store.close()


async def test_insufficient_credit_on_launch_triggers_the_credit_stop(
    tmp_path: Path, make_app: MakeApp, clock: FakeClock, fake: FakeProvider
) -> None:
    app = await make_app(clock=clock, providers=[fake])
    running = await launcher.launch(app, fake.offers[0])
    fake.faults.insufficient_credit = True
    with pytest.raises(errors.QueuePaused):
        await launcher.launch(app, fake.offers[1])
    got = await app.store.get_instance(running.id)
    assert got.reason is TerminationReason.INSUFFICIENT_CREDIT
    assert got.state is InstanceState.TERMINATED
    assert await app.store.get_flag(QUEUE_PAUSED_FLAG) is True
    await app.store.close()


async def test_budget_refuses_new_rentals_and_stops_spend_past_the_limit(
    tmp_path: Path, make_app: MakeApp, clock: FakeClock, fake: FakeProvider
) -> None:
    app = await make_app(clock=clock, providers=[fake])
    inst = await launcher.launch(app, fake.offers[1], hours=4)  # $1.20/h
    app.settings = settings(tmp_path, budget={"daily_limit": 5.5, "max_hourly_price": 1.0})
    with pytest.raises(errors.PriceTooHigh):
        await launcher.launch(app, fake.offers[1])
    with pytest.raises(errors.BudgetExceeded) as refused:
        await launcher.launch(app, fake.offers[0], hours=2)  # 4.80 + 0.80 > 5.50
    assert refused.value.data["window"] == "daily"
    await launcher.launch(app, fake.offers[0], hours=1)  # 4.80 + 0.40 fits
    with pytest.raises(errors.BudgetExceeded):
        await api.extend(app, id=inst.id, hours=1, by="test")
    rec = Reconciler(app)
    clock.set(T0 + timedelta(minutes=20))
    await api.activity(app, id=inst.id, by="test")
    await rec.pass_once()
    assert (await app.store.get_instance(inst.id)).state.live
    app.settings = settings(tmp_path, budget={"daily_limit": 0.5})
    await rec.pass_once()  # spent 0.40 + 0.13: past the limit
    for row in await app.store.instances():
        assert row.state is InstanceState.TERMINATED
        assert row.reason is TerminationReason.BUDGET
    await app.store.close()


@pytest.mark.parametrize(
    ("provider", "silent", "reason"),
    [
        # The daemon was down 30 min; the switch (20 min) had cause: deadman.
        ("vast", timedelta(minutes=30), TerminationReason.DEADMAN),
        # Missed 5 min after the last good probe: the switch had no cause.
        ("vast", timedelta(minutes=5), TerminationReason.VANISHED),
        # Lambda without the opt-in carries no key: its switch cannot end it.
        ("lambda", timedelta(minutes=30), TerminationReason.VANISHED),
        # A provider without a switch at all.
        ("fake", timedelta(minutes=30), TerminationReason.VANISHED),
    ],
)
async def test_a_restart_that_finds_an_instance_gone_blames_the_switch_when_it_had_cause(
    tmp_path: Path,
    make_app: MakeApp,
    clock: FakeClock,
    provider: str,
    silent: timedelta,
    reason: TerminationReason,
) -> None:
    cloud = FakeProvider(clock, provider, boot_delay=timedelta(seconds=10))
    conf = settings(tmp_path, vanish_grace="60s", deadman_timeout="20m", deadman_margin="10m")
    app = await make_app(conf, clock, [cloud])
    inst = await launcher.launch(app, cloud.offers[0])
    clock.set(T0 + timedelta(seconds=11))
    await Reconciler(app).pass_once()  # RUNNING
    probed = T0 + timedelta(minutes=2)
    await app.store.update_instance(inst.id, last_probe_at=probed, last_probe_ok=True)
    # The daemon goes silent after that probe; the instance ends (by its switch, or not).
    clock.set(probed + timedelta(minutes=1))
    await cloud.destroy(str(inst.provider_id))
    # A new daemon: its reconciler's first pass (before READY), then the next one.
    rec = Reconciler(app)
    clock.set(probed + silent)
    await rec.pass_once()
    assert (await app.store.get_instance(inst.id)).state is InstanceState.RUNNING
    clock.set(probed + silent + timedelta(seconds=30))
    await rec.pass_once()
    got = await app.store.get_instance(inst.id)
    assert got.state is InstanceState.TERMINATED
    assert got.reason is reason
    [term] = await app.store.terminations(T0)
    assert term.reason is reason
    [ev] = [e for e in await app.store.events(entity_id=inst.id) if e.to_state == "terminated"]
    assert ev.details["first_missed"] == format_ts(probed + silent)
    assert ev.details["last_contact"] == format_ts(probed)
    await app.store.close()


async def test_the_first_miss_not_the_confirming_pass_decides(
    tmp_path: Path, make_app: MakeApp, clock: FakeClock
) -> None:
    """Missed 19 min after the last probe and confirmed at 20+: still vanished (the switch
    needs 20 min of silence before the instance is gone)."""
    cloud = FakeProvider(clock, "sim-vast")
    conf = settings(tmp_path, vanish_grace="10s", deadman_timeout="20m")
    app = await make_app(conf, clock, [cloud])
    inst = await launcher.launch(app, cloud.offers[0])
    await app.store.update_instance(inst.id, last_probe_at=T0, last_probe_ok=True)
    await cloud.destroy(str(inst.provider_id))
    rec = Reconciler(app)
    clock.set(T0 + timedelta(minutes=19))
    await rec.pass_once()
    clock.set(T0 + timedelta(minutes=21))
    await rec.pass_once()
    got = await app.store.get_instance(inst.id)
    assert (got.state, got.reason) == (InstanceState.TERMINATED, TerminationReason.VANISHED)
    await app.store.close()


async def test_yesterdays_spend_counts_in_the_month_not_the_day(
    tmp_path: Path, make_app: MakeApp, clock: FakeClock, fake: FakeProvider
) -> None:
    app = await make_app(clock=clock, providers=[fake])
    inst = await launcher.launch(app, fake.offers[0])
    clock.set(T0 + timedelta(hours=1))
    ended = await app.terminator.end(inst.id, TerminationReason.MANUAL)
    assert ended.state is InstanceState.TERMINATED
    [term] = await app.store.terminations(T0)
    assert term.cost > 0
    st = await budget.state(app, T0 + timedelta(days=1))  # the next day, the same month
    assert st.daily.spent == 0
    assert st.monthly.spent == pytest.approx(term.cost)
    await app.store.close()
