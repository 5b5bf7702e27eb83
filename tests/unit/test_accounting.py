"""What the record says an instance cost and why it ended (issue 17, item 10): an intent
ended before the provider was ever called is launch_failed at $0 (not idle), and an instance
the provider ended while the watchdog was striking it is vanished (not watchdog). (The Vast
storage price is checked against the sim's ledger in test_sim_clients.py.)"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from test_watchdog import FakeProber
from tests.conftest import MakeApp

from gpuwarden.config.settings import Settings
from gpuwarden.core.clock import FakeClock
from gpuwarden.core.model import Instance, InstanceState, TerminationReason, instance_label
from gpuwarden.fleet.app import App
from gpuwarden.loops.reconciler import Reconciler
from gpuwarden.loops.watchdog import ProbeFailed, Watchdog, next_probe_at
from gpuwarden.providers.fake import FakeProvider

START = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
async def app(tmp_path: Path, make_app: MakeApp) -> App:
    clock = FakeClock(START)
    settings = Settings(
        daemon={"state_dir": str(tmp_path)},
        policy={"watchdog_interval": "60s", "watchdog_failures": 2, "vanish_grace": "5s"},
    )
    return await make_app(settings, clock, [FakeProvider(clock)])


def fake(app: App) -> FakeProvider:
    provider = app.providers["fake"]
    assert isinstance(provider, FakeProvider)
    return provider


def clock_of(app: App) -> FakeClock:
    assert isinstance(app.clock, FakeClock)
    return app.clock


async def test_an_intent_ended_before_the_provider_call_is_recorded_as_launch_failed(
    app: App,
) -> None:
    # What a daemon killed between committing the intent and calling the provider leaves:
    # a REQUESTED row and nothing at the provider. The guard ends it (idle) on restart.
    now = app.clock.now()
    intent = Instance(
        id="i1",
        provider="fake",
        label=instance_label("main", "i1"),
        state=InstanceState.REQUESTED,
        created_at=now,
        lease_until=now + timedelta(hours=1),
        last_activity=now,
        price_per_hour=0.4,
    )
    await app.store.insert_instance(intent)
    await app.terminator.end("i1", TerminationReason.IDLE)
    assert (await app.store.get_instance("i1")).state is InstanceState.TERMINATING
    rec = Reconciler(app)
    for _ in range(3):  # past the grace, missed twice
        await clock_of(app).advance(10)
        await rec.pass_once()
    done = await app.store.get_instance("i1")
    assert done.state is InstanceState.TERMINATED
    assert done.reason is TerminationReason.LAUNCH_FAILED
    [term] = await app.store.terminations(START)
    assert (term.reason, term.cost) == (TerminationReason.LAUNCH_FAILED, 0.0)
    assert fake(app).calls_to("destroy") == []


async def add_running(app: App) -> Instance:
    label = instance_label("main", "i1")
    pid = fake(app).spawn(label)
    now = app.clock.now()
    inst = Instance(
        id="i1",
        provider="fake",
        label=label,
        state=InstanceState.RUNNING,
        created_at=now,
        lease_until=now + timedelta(hours=4),
        last_activity=now,
        price_per_hour=1.0,
        provider_id=pid,
        provider_started_at=now,
        ssh_host="127.0.0.1",
        ssh_port=22,
        running_at=now,
    )
    await app.store.insert_instance(inst)
    return inst


async def strike_out(app: App) -> None:
    prober = FakeProber()
    prober.clock = clock_of(app)
    prober.default = ProbeFailed("refused", "connection refused")
    wd = Watchdog(app, prober)
    for _ in range(2):
        due = next_probe_at("i1", wd.interval, app.clock.now())
        await clock_of(app).advance((due - app.clock.now()).total_seconds())
        await wd.tick()
        await wd.probes_done()


async def test_an_instance_the_provider_ended_is_vanished_not_a_watchdog_verdict(
    app: App,
) -> None:
    inst = await add_running(app)
    assert inst.provider_id is not None
    machine = fake(app).machines[inst.provider_id]
    fake(app).machines[inst.provider_id] = replace(machine, destroyed_at=app.clock.now())
    await strike_out(app)
    done = await app.store.get_instance("i1")
    assert done.state is InstanceState.TERMINATED
    assert done.reason is TerminationReason.VANISHED
    assert fake(app).calls_to("destroy") == []  # nothing of ours ended it


async def test_an_unclear_provider_answer_leaves_the_watchdog_verdict(app: App) -> None:
    await add_running(app)
    fake(app).faults.fail_next["get"] = 1  # a Transient: unknown, so end what may bill
    await strike_out(app)
    done = await app.store.get_instance("i1")
    assert done.reason is TerminationReason.WATCHDOG
    assert len(fake(app).calls_to("destroy")) == 1
