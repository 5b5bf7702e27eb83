"""Benchmark (`make bench`): the lag from each deadline to its destroy call.

1,000 instances on the FakeProvider, their lease deadlines spread over a 10 s window, the
real Guard on the SystemClock and a real Store (WAL, synchronous=FULL) on tmp_path. Prints
p50 / p99 / max and asserts p99 < 1 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import structlog
from tests.conftest import MakeApp, eventually

from gpuwarden.config.settings import DaemonSettings, PolicySettings, Settings
from gpuwarden.core.clock import SystemClock
from gpuwarden.core.model import Instance, InstanceState, instance_label
from gpuwarden.loops.guard import Guard
from gpuwarden.providers.fake import FakeProvider
from gpuwarden.system import logs as glog

COUNT = 1000
WINDOW = timedelta(seconds=10)
SETUP = timedelta(seconds=5)  # inserting 1,000 rows, each its own fsynced transaction (~1 s)


@pytest.fixture(autouse=True)
def _warnings_only() -> Iterator[None]:
    """`make bench` runs with -s: an info line for each of 1,000 terminations would bury the
    figure, so only warnings and errors reach the console."""
    glog.configure(level="warning")
    yield
    structlog.reset_defaults()


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def test_deadline_to_destroy_lag_p99_under_one_second(
    tmp_path: Path, make_app: MakeApp
) -> None:
    clock = SystemClock()
    fake = FakeProvider(clock, "fake")
    called: dict[str, datetime] = {}

    def on_destroy(pid: str) -> None:
        called.setdefault(pid, clock.now())

    fake.on_destroy = on_destroy
    conf = Settings(
        daemon=DaemonSettings(state_dir=tmp_path),
        policy=PolicySettings(idle_timeout="8h", lease_min="1s", lease_default="1h"),
    )
    app = await make_app(conf, clock, [fake])
    store = app.store
    start = clock.now()
    first = start + SETUP
    deadlines: dict[str, datetime] = {}
    offer = fake.offers[0]
    for n in range(COUNT):
        iid = f"b{n:07x}"
        label = instance_label(app.installation, iid)
        pid = fake.spawn(label, offer)
        due = first + WINDOW * (n / COUNT)
        deadlines[pid] = due
        await store.insert_instance(
            Instance(
                id=iid,
                provider="fake",
                label=label,
                state=InstanceState.RUNNING,
                created_at=start,
                lease_until=due,
                last_activity=start,
                price_per_hour=offer.price_per_hour,
                provider_id=pid,
                provider_started_at=start,
                billing=offer.billing,
            )
        )
    setup_s = (clock.now() - start).total_seconds()
    assert clock.now() < first, f"setup took {setup_s:.1f} s; raise SETUP"
    guard = Guard(app)
    task = asyncio.create_task(guard.run())
    t0 = time.perf_counter()

    async def all_destroyed() -> bool:
        return len(called) >= COUNT and not await store.live_instances()

    try:
        await eventually(
            all_destroyed,
            timeout=(first - clock.now() + WINDOW).total_seconds() + 60,
            interval=0.05,
            what="every destroy",
        )
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await store.close()
    lags = [(called[pid] - due).total_seconds() for pid, due in deadlines.items()]
    early = [lag for lag in lags if lag < 0]
    p50, p99 = statistics.median(lags), _quantile(lags, 0.99)
    print(
        f"\nguard lag over {COUNT} deadlines in {WINDOW.total_seconds():g} s:"
        f" p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, max {max(lags) * 1000:.1f} ms"
        f" (setup {setup_s:.1f} s, run {time.perf_counter() - t0:.1f} s, {guard.passes} passes)"
    )
    assert not early, f"{len(early)} destroyed before their deadline"
    assert p99 < 1.0
