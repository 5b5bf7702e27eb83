"""The notifier delivering through real apprise to a local HTTP receiver (apprise's json://
target on loopback), on a FakeClock: one test per kind of message, a retry after the
receiver fails, the rate limit, a full queue, and the guard keeping its deadlines while the
receiver hangs."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from guard_support import Recorder, running_guard
from notify_support import (
    Receiver,
    RunningNotifier,
    notify_settings,
    receiver,
    running_notifier,
)
from tests.conftest import T0, MakeApp, eventually

from gpuwarden.config import settings as config
from gpuwarden.core.clock import FakeClock
from gpuwarden.core.model import InstanceState, NotifyKind, TerminationReason
from gpuwarden.fleet import budget, launcher
from gpuwarden.fleet.app import App
from gpuwarden.notify.plan import Message
from gpuwarden.providers.fake import FakeProvider
from gpuwarden.system import redact


@pytest.fixture
def fake(clock: FakeClock) -> FakeProvider:
    return FakeProvider(clock, "fake")


Rig = Callable[..., contextlib.AbstractAsyncContextManager[tuple[Receiver, App, RunningNotifier]]]


@pytest.fixture
def rig(tmp_path: Path, make_app: MakeApp, clock: FakeClock, fake: FakeProvider) -> Rig:
    """A receiver, an App whose notify.urls point at it (and `settings`, notify keys and
    `policy`), and a Notifier running on it."""

    @contextlib.asynccontextmanager
    async def make(**kw: Any) -> AsyncIterator[tuple[Receiver, App, RunningNotifier]]:
        async with receiver() as rx:
            app = await make_app(notify_settings(tmp_path, [rx.url], **kw), clock, [fake])
            async with running_notifier(app) as run:
                yield rx, app, run

    return make


async def _launch(app: App, fake: FakeProvider, hours: float = 2) -> str:
    return (await launcher.launch(app, fake.offers[0], hours=hours)).id


# --- one test per kind ------------------------------------------------------------------------


async def test_an_instance_ended_is_told_with_why(
    rig: Rig, clock: FakeClock, fake: FakeProvider
) -> None:
    async with rig() as (rx, app, _run):
        iid = await _launch(app, fake)
        await app.terminator.end(iid, TerminationReason.IDLE, {"why": "idle"})
        [got] = await rx.wait_for(1)
    assert got["title"] == f"gpuwarden[main]: instance {iid} ended (idle)"
    assert "reason idle" in got["message"]
    assert got["type"] == "info"


async def test_the_dead_man_switch_firing_is_told(
    rig: Rig, clock: FakeClock, fake: FakeProvider
) -> None:
    async with rig() as (rx, app, _run):
        iid = await _launch(app, fake)
        # what the reconciler records when the provider ended it and the switch had cause
        await app.store.transition_instance(
            iid, InstanceState.TERMINATED, reason=TerminationReason.DEADMAN
        )
        [got] = await rx.wait_for(1)
    assert got["title"] == f"gpuwarden[main]: dead-man switch ended instance {iid}"
    assert got["type"] == "warning"


async def test_a_budget_stop_is_told_once_besides_each_ended_instance(
    rig: Rig, clock: FakeClock, fake: FakeProvider
) -> None:
    async with rig() as (rx, app, _run):
        await _launch(app, fake)
        await _launch(app, fake)
        window = budget.Window("daily", 5.0, 5.5, 6.0)
        assert await budget.budget_stop(app, window) == 2
        got = await rx.wait_for(3)  # the stop, then both instances ended (budget)
    titles = [g["title"] for g in got]
    assert titles[0] == "gpuwarden[main]: budget stop (daily limit)"
    assert sorted(t.rsplit(" ", 1)[1] for t in titles[1:]) == ["(budget)", "(budget)"]


async def test_a_credit_stop_is_told(rig: Rig, clock: FakeClock, fake: FakeProvider) -> None:
    async with rig(events=["budget_stop"]) as (rx, app, _run):
        await _launch(app, fake)
        await budget.credit_stop(app, provider="fake", why="credit $0.10 is under the floor")
        [got] = await rx.wait_for(1)
        assert rx.calls == 1  # notify.events: the instance's end is not told
    assert got["title"] == "gpuwarden[main]: credit stop"


async def test_a_lease_ending_in_15_minutes_is_told_once(
    rig: Rig, clock: FakeClock, fake: FakeProvider
) -> None:
    async with rig() as (rx, app, run):
        iid = await _launch(app, fake, hours=1)
        await run.step(clock, 45 * 60 - 1)
        assert rx.calls == 0
        await run.step(clock, 1)
        [got] = await rx.wait_for(1)
        await run.step(clock, 60)  # a later pass does not tell it again
    assert rx.calls == 1
    assert got["title"] == f"gpuwarden[main]: lease of instance {iid} ends in 15 min"
    assert f"gpuwarden extend {iid}" in got["message"]


async def test_a_destroy_still_failing_after_five_minutes_is_escalated(
    rig: Rig, clock: FakeClock, fake: FakeProvider
) -> None:
    async with rig(events=["destroy_failing"]) as (rx, app, run):
        iid = await _launch(app, fake)
        fake.faults.fail_next["destroy"] = 1000
        ended = await app.terminator.end(iid, TerminationReason.MANUAL, {"by": "test"})
        assert ended.state is InstanceState.TERMINATING
        await run.step(clock, 299)
        assert rx.calls == 0
        await run.step(clock, 1)
        [got] = await rx.wait_for(1)
    assert got["title"] == f"gpuwarden[main]: destroy of instance {iid} still failing"
    assert got["type"] == "warning"


async def test_stopping_with_instances_billing_is_told_on_the_way_out(
    rig: Rig, clock: FakeClock, fake: FakeProvider
) -> None:
    async with rig() as (rx, app, run):
        iid = await _launch(app, fake)
        await run.stop()
        [got] = rx.got
    assert got["title"] == "gpuwarden[main]: stopped with 1 instance(s) billing"
    assert iid in got["message"] and "dead-man switch" in got["message"]


# --- delivery: retries, rate limit, a full queue ---------------------------------------------


async def test_a_failed_delivery_is_retried_after_a_backoff(
    rig: Rig, clock: FakeClock, fake: FakeProvider
) -> None:
    async with rig() as (rx, _app, run):
        rx.fail_next = 1
        run.notifier.put(Message(NotifyKind.INSTANCE_ENDED, "t", "once"))
        await eventually(lambda: run.notifier.retrying)
        assert (rx.calls, rx.got) == (1, [])
        await clock.advance(1.9)
        assert rx.calls == 1  # the backoff is 2 s
        await clock.advance(0.1)
        [got] = await rx.wait_for(1)
        await eventually(lambda: run.notifier.delivered == 1)
    assert got["message"] == "once"
    assert rx.calls == 2
    assert run.notifier.failed == 0


async def test_sends_are_rate_limited(rig: Rig, clock: FakeClock, fake: FakeProvider) -> None:
    async with rig(burst=2, rate_per_minute=6) as (rx, _app, run):
        for n in range(3):
            run.notifier.put(Message(NotifyKind.INSTANCE_ENDED, "t", f"m{n}"))
        await rx.wait_for(2)
        await eventually(lambda: run.notifier.throttled)
        await clock.advance(9.9)
        assert rx.calls == 2  # one per 10 s after the burst
        await clock.advance(0.1)
        got = await rx.wait_for(3)
    assert [g["message"] for g in got] == ["m0", "m1", "m2"]


class _Stuck:
    """A sender whose deliveries never finish."""

    def __init__(self) -> None:
        self.started = asyncio.Event()

    async def send(self, message: Message) -> bool:
        self.started.set()
        await asyncio.Event().wait()
        return True


async def test_a_full_queue_drops_its_oldest_and_counts_them(
    tmp_path: Path, make_app: MakeApp, clock: FakeClock
) -> None:
    stuck = _Stuck()

    def make(urls: Sequence[str]) -> _Stuck:
        return stuck

    settings = notify_settings(tmp_path, ["json://127.0.0.1:9/x"], queue_size=2)
    app = await make_app(settings, clock)
    async with running_notifier(app, make_sender=make) as run:
        n = run.notifier
        n.put(Message(NotifyKind.INSTANCE_ENDED, "t", "in flight"))
        await asyncio.wait_for(stuck.started.wait(), 5)
        for i in range(5):
            n.put(Message(NotifyKind.INSTANCE_ENDED, "t", f"m{i}"))
        assert (n.queued, n.dropped) == (2, 3)
        assert [m.body for m in n._queue] == ["m3", "m4"]


# --- the guard is never held up -----------------------------------------------------------


async def test_the_guard_ends_on_time_while_the_receiver_hangs(
    rig: Rig, clock: FakeClock, fake: FakeProvider
) -> None:
    async with rig(policy={"idle_timeout": "5m"}) as (rx, app, run), running_guard(app) as guard:
        rx.hang = True
        rec = Recorder(app.store)
        first = await launcher.launch(app, fake.offers[0], hours=1)
        await guard.quiet()
        await guard.step(clock, 60)
        second = await launcher.launch(app, fake.offers[0], hours=1)  # idle at T0+6m
        await guard.step(clock, 240)  # the first's idle deadline: ended, and told
        await rec.terminated(first.id)
        await asyncio.wait_for(rx.entered.wait(), 10)  # the notifier's send now hangs
        await guard.step(clock, 59)
        assert _destroyed(fake) == [first.provider_id]
        await guard.step(clock, 1)  # the second's deadline, to the second
        await rec.terminated(second.id)
        assert rx.got == []  # nothing has been answered
        assert run.notifier.delivered == 0
    assert _destroyed(fake) == [first.provider_id, second.provider_id]
    assert fake.bills[str(first.provider_id)].end == T0 + timedelta(minutes=5)
    assert fake.bills[str(second.provider_id)].end == T0 + timedelta(minutes=6)
    [ended] = rec.matching(
        lambda e: e.entity_id == second.id and e.to_state == InstanceState.TERMINATING.value
    )
    assert ended.details["lag_s"] == 0.0


def _destroyed(fake: FakeProvider) -> list[str]:
    """The provider ids destroy was called for, in order, each once."""
    return list(dict.fromkeys(str(c[0]) for c in fake.calls_to("destroy")))


# --- settings --------------------------------------------------------------------------------


def test_notify_urls_are_secrets_masked_in_the_shown_config_and_the_logs(tmp_path: Path) -> None:
    url = "ntfy://s3cr3t-topic-token@ntfy.example.org/alerts"
    settings = notify_settings(tmp_path, [url])
    assert url not in str(config.redacted(settings))
    assert config.redacted(settings)["notify"]["urls"] == [redact.MASK]
    redact.register_secrets_from(settings)
    try:
        assert url not in redact.scrub(f"apprise could not reach {url}")
    finally:
        redact.clear_secrets()


def test_a_bad_notify_url_is_named_without_quoting_it(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[notify]\nurls = ["json://127.0.0.1:9/ok", "nosuchscheme://hunter2@x", "plain-text"]\n'
        'events = ["lease_ending", "no_such_event"]\nrate_per_minute = 0\n'
    )
    with pytest.raises(config.ConfigError) as err:
        config.load(path)
    fields = [p[0] for p in err.value.problems]
    assert fields == ["notify.urls.1", "notify.urls.2", "notify.events.1", "notify.rate_per_minute"]
    assert "hunter2" not in err.value.render() and "plain-text" not in err.value.render()


async def test_without_urls_nothing_is_queued(
    tmp_path: Path, make_app: MakeApp, clock: FakeClock, fake: FakeProvider
) -> None:
    app = await make_app(notify_settings(tmp_path, []), clock, [fake])
    made: list[Sequence[str]] = []

    def make(urls: Sequence[str]) -> _Stuck:
        made.append(urls)
        return _Stuck()

    async with running_notifier(app, make_sender=make) as run:
        iid = await _launch(app, fake, hours=1)
        await app.terminator.end(iid, TerminationReason.MANUAL, {"by": "test"})
        assert run.notifier.queued == 0
        await run.stop()
    assert made == []


def test_the_daemon_runs_the_notifier(tmp_path: Path) -> None:
    from gpuwarden.lifecycle import wiring

    assert "Notifier(app)" in Path(wiring.__file__).read_text()
