"""The guard loop on a FakeClock, a FakeProvider and a real Store: exact deadlines, wake-ups
on change, and destroy retries that never give up."""

from __future__ import annotations

import asyncio
import itertools
from datetime import timedelta
from pathlib import Path

import pytest
from guard_support import Recorder, running_guard, settings
from tests.conftest import T0, MakeApp

from gpuwarden.control import instances as api
from gpuwarden.core import errors
from gpuwarden.core.clock import FakeClock
from gpuwarden.core.model import EntityKind, InstanceState, TerminationReason
from gpuwarden.fleet import launcher
from gpuwarden.fleet.terminator import ESCALATE_AFTER, backoff
from gpuwarden.providers.fake import FakeProvider


@pytest.fixture
def fake(clock: FakeClock) -> FakeProvider:
    return FakeProvider(clock, "fake")


async def test_idle_instance_is_destroyed_exactly_at_its_deadline(
    tmp_path: Path, make_app: MakeApp, clock: FakeClock, fake: FakeProvider
) -> None:
    app = await make_app(settings(tmp_path, idle_timeout="5m"), clock, [fake])
    rec = Recorder(app.store)
    async with running_guard(app) as run:
        inst = await launcher.launch(app, fake.offers[0], hours=1)
        await run.quiet()
        assert run.guard.next_wake is not None
        await run.step(clock, 299)
        assert fake.calls_to("destroy") == []
        await run.step(clock, 1)  # exactly the deadline
        await rec.terminated(inst.id)
    assert inst.provider_id is not None
    assert fake.bills[inst.provider_id].end == T0 + timedelta(minutes=5)
    done = await app.store.get_instance(inst.id)
    assert done.state is InstanceState.TERMINATED
    assert done.reason is TerminationReason.IDLE
    [term] = await app.store.terminations(T0)
    assert term.reason is TerminationReason.IDLE
    assert term.uptime_s == 300
    assert term.cost == pytest.approx(fake.offers[0].price_per_hour * 300 / 3600, abs=1e-6)
    await app.store.close()


async def test_guard_sleeps_until_the_earliest_deadline_not_a_fixed_poll(
    tmp_path: Path, make_app: MakeApp, clock: FakeClock, fake: FakeProvider
) -> None:
    app = await make_app(settings(tmp_path, idle_timeout="3s"), clock, [fake])
    rec = Recorder(app.store)
    async with running_guard(app) as run:
        inst = await launcher.launch(app, fake.offers[0], hours=1)
        await run.quiet()
        # the beat is every 5 s, but the deadline is in 3 s: that is when it wakes
        assert run.guard.next_wake == T0 + timedelta(seconds=3)
        await run.step(clock, 3)
        await rec.terminated(inst.id)
    assert fake.bills[str(inst.provider_id)].end == T0 + timedelta(seconds=3)
    await app.store.close()


async def test_wakes_on_change_without_time_passing(
    tmp_path: Path, make_app: MakeApp, clock: FakeClock, fake: FakeProvider
) -> None:
    app = await make_app(clock=clock, providers=[fake])
    rec = Recorder(app.store)
    async with running_guard(app) as run:
        inst = await launcher.launch(app, fake.offers[0])
        await run.quiet()
        passes = run.guard.passes
        # the watchdog's second strike: the guard ends it at once, the clock stands still
        await app.store.record(EntityKind.INSTANCE, inst.id, "strike", updates={"strikes": 2})
        await rec.terminated(inst.id)
        assert run.guard.passes > passes
    done = await app.store.get_instance(inst.id)
    assert done.reason is TerminationReason.WATCHDOG
    assert clock.now() == T0
    await app.store.close()


async def test_activity_and_extension_move_the_deadline(
    tmp_path: Path, make_app: MakeApp, clock: FakeClock, fake: FakeProvider
) -> None:
    app = await make_app(settings(tmp_path, idle_timeout="10m"), clock, [fake])
    rec = Recorder(app.store)
    async with running_guard(app) as run:
        inst = await launcher.launch(app, fake.offers[0], hours=1)
        await run.step(clock, 9 * 60)
        await api.activity(app, id=inst.id, by="test")
        await run.step(clock, 9 * 60)  # 18 min: the original idle deadline has passed
        assert (await app.store.get_instance(inst.id)).state.live
        await api.extend(app, id=inst.id, hours=1, by="test")  # extension is activity too
        await run.quiet()
        await run.step(clock, 9 * 60)
        assert (await app.store.get_instance(inst.id)).state is InstanceState.PROVISIONING
        await run.step(clock, 60)
        await rec.terminated(inst.id)
    assert (await app.store.get_instance(inst.id)).reason is TerminationReason.IDLE
    assert fake.bills[str(inst.provider_id)].end == T0 + timedelta(minutes=28)
    await app.store.close()


async def test_hard_cap_wins_over_a_busy_extended_instance(
    tmp_path: Path, make_app: MakeApp, clock: FakeClock, fake: FakeProvider
) -> None:
    conf = settings(
        tmp_path,
        idle_timeout="5s",
        lease_min="1s",
        lease_default="10s",
        lease_max="20s",
        hard_cap="20s",
    )
    app = await make_app(conf, clock, [fake])
    rec = Recorder(app.store)
    async with running_guard(app) as run:
        inst = await launcher.launch(app, fake.offers[0])
        await run.step(clock, 4)
        await api.extend(app, id=inst.id, hours=10 / 3600, by="test")  # lease to 20 s: the maximum
        with pytest.raises(errors.LeaseMaxExceeded):
            await api.extend(app, id=inst.id, hours=1 / 3600, by="test")
        for _ in range(3):  # kept busy: activity every 4 s
            await run.step(clock, 4)
            await api.activity(app, id=inst.id, by="test")
        await run.step(clock, 3)
        await api.activity(app, id=inst.id, by="test")  # busy at 19 s
        assert (await app.store.get_instance(inst.id)).state.live
        await run.step(clock, 1)  # 20 s: the cap, also the lease end; the cap wins
        await rec.terminated(inst.id)
    done = await app.store.get_instance(inst.id)
    assert done.reason is TerminationReason.HARD_TIMEOUT
    assert fake.bills[str(inst.provider_id)].end == T0 + timedelta(seconds=20)
    await app.store.close()


async def test_destroy_is_retried_with_backoff_until_confirmed_and_never_gives_up(
    tmp_path: Path, make_app: MakeApp, clock: FakeClock, fake: FakeProvider
) -> None:
    app = await make_app(settings(tmp_path, idle_timeout="1m"), clock, [fake])
    rec = Recorder(app.store)
    failures = ESCALATE_AFTER + 5
    times: list[float] = []
    fake.on_destroy = lambda _pid: times.append((clock.now() - T0).total_seconds())
    async with running_guard(app) as run:
        inst = await launcher.launch(app, fake.offers[0], hours=1)
        fake.faults.fail_next["destroy"] = failures
        await run.step(clock, 60)
        assert (await app.store.get_instance(inst.id)).state is InstanceState.TERMINATING
        for _ in range(2000):
            if len(times) > failures:
                break
            await run.step(clock, 0.5)
        await rec.terminated(inst.id)
    assert len(times) == failures + 1
    gaps = [b - a for a, b in itertools.pairwise(times)]
    for n, gap in enumerate(gaps, start=1):
        assert backoff(n) <= gap <= backoff(n) + 0.5, (n, gaps)
    assert max(gaps) == pytest.approx(60, abs=0.5)  # capped
    retries = rec.matching(lambda e: e.name == "destroy_retry")
    assert [e.details["level"] for e in retries] == ["warning", "error"]  # escalations only
    done = await app.store.get_instance(inst.id)
    assert done.state is InstanceState.TERMINATED
    assert done.reason is TerminationReason.IDLE  # the first reason stands
    assert done.extra["destroy_attempts"] == failures
    await app.store.close()


async def test_a_destroy_that_does_nothing_is_noticed_and_repeated(
    tmp_path: Path, make_app: MakeApp, clock: FakeClock, fake: FakeProvider
) -> None:
    app = await make_app(clock=clock, providers=[fake])
    rec = Recorder(app.store)
    async with running_guard(app) as run:
        inst = await launcher.launch(app, fake.offers[0])
        fake.faults.destroy_noop_next = 1
        out = await api.destroy(app, id=inst.id, by="test")
        assert out["confirmed"] is False  # get() still saw it
        await run.step(clock, 1)
        await rec.terminated(inst.id)
    assert len(fake.calls_to("destroy")) == 2
    assert (await app.store.get_instance(inst.id)).reason is TerminationReason.MANUAL
    await app.store.close()


async def test_end_is_idempotent_and_keeps_the_first_reason(
    tmp_path: Path, make_app: MakeApp, clock: FakeClock, fake: FakeProvider
) -> None:
    app = await make_app(clock=clock, providers=[fake])
    inst = await launcher.launch(app, fake.offers[0])
    fake.faults.fail_next["destroy"] = 1
    term = app.terminator
    first = await term.end(inst.id, TerminationReason.MANUAL)
    assert first.state is InstanceState.TERMINATING
    again = await term.end(inst.id, TerminationReason.BUDGET)
    assert again.reason is TerminationReason.MANUAL
    assert term.retry_at(again, clock.now()) == clock.now() + timedelta(seconds=1)
    states = [e.to_state for e in await app.store.events(entity_id=inst.id) if e.name == "state"]
    assert states.count("terminating") == 1
    await app.store.close()


async def test_a_terminating_instance_is_driven_again_after_restart(
    tmp_path: Path, make_app: MakeApp, clock: FakeClock, fake: FakeProvider
) -> None:
    app = await make_app(clock=clock, providers=[fake])
    inst = await launcher.launch(app, fake.offers[0])
    await app.terminator.begin(inst.id, TerminationReason.MANUAL)  # then a crash
    await app.store.close()
    app2 = await make_app(clock=clock, providers=[fake])
    rec = Recorder(app2.store)
    async with running_guard(app2):
        await rec.terminated(inst.id)
    assert fake.bills[str(inst.provider_id)].end == T0
    await app2.store.close()


class HangingProvider(FakeProvider):
    """A provider whose destroy of one instance hangs until released."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock, "fake")
        self.gate = asyncio.Event()
        self.slow: set[str] = set()

    async def destroy(self, provider_id: str) -> None:
        if provider_id in self.slow:
            await self.gate.wait()
        await super().destroy(provider_id)


async def test_slow_destroys_do_not_delay_other_deadlines(
    tmp_path: Path, make_app: MakeApp, clock: FakeClock
) -> None:
    fake = HangingProvider(clock)
    app = await make_app(settings(tmp_path, idle_timeout="1m"), clock, [fake])
    rec = Recorder(app.store)
    async with running_guard(app) as run:
        a = await launcher.launch(app, fake.offers[0], hours=1)
        fake.slow.add(str(a.provider_id))
        await run.step(clock, 30)
        b = await launcher.launch(app, fake.offers[0], hours=1)
        await clock.advance(30)  # a is due; its destroy hangs
        await run.quiet(drives=False)
        await clock.advance(30)  # b is due 30 s later
        await rec.terminated(b.id)
        assert fake.bills[str(b.provider_id)].end == T0 + timedelta(seconds=90)
        fake.gate.set()
        await rec.terminated(a.id)
    await app.store.close()
