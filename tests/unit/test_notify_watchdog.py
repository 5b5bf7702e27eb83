"""The watchdog task: WATCHDOG=1 every interval while every loop is fresh; when a loop stops
beating the pings stop and STATUS names it; when it beats again the pings resume."""

from __future__ import annotations

import asyncio

import structlog

from gpuwarden.core.clock import FakeClock
from gpuwarden.core.heartbeat import STALE_AFTER, Heartbeats
from gpuwarden.lifecycle.runtime import watchdog_loop
from gpuwarden.system.systemd import Notifier


class RecordingNotifier(Notifier):
    """Records what would have been sent."""

    def __init__(self) -> None:
        super().__init__(None)
        self.sent: list[dict[str, object]] = []

    def notify(self, **fields: object) -> bool:
        self.sent.append(fields)
        return True

    def pings(self) -> int:
        return sum(1 for m in self.sent if "WATCHDOG" in m)

    def statuses(self) -> list[object]:
        return [m["STATUS"] for m in self.sent if "STATUS" in m]


async def test_pings_only_while_every_loop_is_fresh() -> None:
    clock = FakeClock()
    beats = Heartbeats(clock)
    beats.register("guard")
    beats.register("jobs")
    notifier = RecordingNotifier()
    task = asyncio.create_task(
        watchdog_loop(notifier, beats, clock, interval=1.0, running_status=lambda: "running")
    )
    try:
        for _ in range(10):  # both loops beat every second: a ping every second
            beats.beat("guard")
            beats.beat("jobs")
            await clock.advance(1)
        assert notifier.pings() >= 10
        assert notifier.statuses() == []

        with structlog.testing.capture_logs() as logs:
            for _ in range(int(STALE_AFTER) + 5):  # "jobs" stops beating
                beats.beat("guard")
                await clock.advance(1)
            pings_when_stalled = notifier.pings()
            for _ in range(10):
                beats.beat("guard")
                await clock.advance(1)
        assert notifier.pings() == pings_when_stalled  # no ping while "jobs" is stale
        assert notifier.statuses() == ["stalled: jobs"]  # said once, not every second
        stalled = [e for e in logs if e["event"] == "loops_stalled"]
        assert len(stalled) == 1 and stalled[0]["loops"] == ["jobs"]

        beats.beat("jobs")  # it recovers
        beats.beat("guard")
        await clock.advance(1)
        assert notifier.pings() == pings_when_stalled + 1
        assert notifier.statuses() == ["stalled: jobs", "running"]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled()


async def test_the_pings_stop_within_stale_after_plus_one_interval() -> None:
    clock = FakeClock()
    beats = Heartbeats(clock)
    beats.register("reconciler")
    notifier = RecordingNotifier()
    task = asyncio.create_task(
        watchdog_loop(notifier, beats, clock, interval=2.0, running_status=lambda: "ok")
    )
    try:
        await clock.advance(STALE_AFTER + 2.0)
        count = notifier.pings()
        await clock.advance(60)
        assert notifier.pings() == count
        assert count <= STALE_AFTER / 2.0 + 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_without_a_systemd_watchdog_it_still_reports_stalls() -> None:
    clock = FakeClock()
    beats = Heartbeats(clock)
    beats.register("watchdog")
    notifier = RecordingNotifier()
    task = asyncio.create_task(
        watchdog_loop(notifier, beats, clock, interval=None, running_status=lambda: "ok")
    )
    try:
        await clock.advance(STALE_AFTER + 10)
        assert notifier.pings() == 0
        assert notifier.statuses() == ["stalled: watchdog"]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
