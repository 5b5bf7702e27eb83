"""Test kit for the cost guard: an App over a FakeClock, a real Store and FakeProviders, and
ways to wait for the loops without waiting on wall-clock time."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gpuwarden.config.settings import BudgetSettings, DaemonSettings, PolicySettings, Settings
from gpuwarden.core.clock import Clock, FakeClock
from gpuwarden.core.heartbeat import Heartbeats
from gpuwarden.core.model import Event, InstanceState
from gpuwarden.fleet.app import App
from gpuwarden.fleet.terminator import Terminator
from gpuwarden.loops.guard import Guard
from gpuwarden.loops.reconciler import Reconciler
from gpuwarden.providers.base import Provider
from gpuwarden.providers.fake import FakeProvider
from gpuwarden.store import Store

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def settings(tmp_path: Path, *, budget: dict[str, Any] | None = None, **policy: Any) -> Settings:
    return Settings(
        daemon=DaemonSettings(state_dir=tmp_path),
        policy=PolicySettings(**policy),
        budget=BudgetSettings(**(budget or {})),
    )


async def make_app(
    tmp_path: Path,
    clock: Clock,
    providers: list[FakeProvider],
    conf: Settings | None = None,
) -> App:
    store = await Store.open(tmp_path / "gpuwarden.db", clock)
    provs: dict[str, Provider] = {p.name: p for p in providers}
    return App(
        settings=conf or settings(tmp_path),
        clock=clock,
        store=store,
        providers=provs,
        heartbeats=Heartbeats(clock),
        terminator=Terminator(store, clock, provs),
    )


async def until(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait for a condition (the store's I/O runs in a thread) with an overall timeout."""
    async with asyncio.timeout(timeout):
        while not pred():
            await asyncio.sleep(0.001)


class Recorder:
    """Collects every event the store writes, and lets a test wait for one."""

    def __init__(self, store: Store) -> None:
        self.events: list[Event] = []
        self._changed = asyncio.Event()
        self.close = store.subscribe(self._on)

    def _on(self, ev: Event) -> None:
        self.events.append(ev)
        self._changed.set()

    def matching(self, pred: Callable[[Event], bool]) -> list[Event]:
        return [e for e in self.events if pred(e)]

    async def wait(self, pred: Callable[[Event], bool], timeout: float = 5.0) -> Event:
        async with asyncio.timeout(timeout):
            while True:
                found = self.matching(pred)
                if found:
                    return found[0]
                self._changed.clear()
                await self._changed.wait()

    async def terminated(self, instance_id: str, timeout: float = 5.0) -> Event:
        return await self.wait(
            lambda e: e.entity_id == instance_id and e.to_state == InstanceState.TERMINATED.value,
            timeout,
        )


@dataclass
class Running:
    """A guard running as a task, with a way to wait until it has nothing left to do."""

    app: App
    guard: Guard
    task: asyncio.Task[None]
    extra: list[asyncio.Task[None]] = field(default_factory=list)

    async def quiet(self, timeout: float = 5.0, *, drives: bool = True) -> None:
        """Wait until the guard sleeps with nothing pending (and, with `drives`, no destroy
        attempt in flight)."""
        term = self.guard.terminator
        await until(
            lambda: self.guard.settled() and not (drives and term.busy),
            timeout,
        )

    async def step(self, clock: FakeClock, seconds: float) -> None:
        """Advance the fake clock and let the guard finish what became due."""
        await self.quiet()  # its sleep must be planned before time moves
        await clock.advance(seconds)
        await self.quiet()


@contextlib.asynccontextmanager
async def running_guard(app: App) -> AsyncIterator[Running]:
    guard = Guard(app)
    task = asyncio.create_task(guard.run(), name="guard")
    run = Running(app, guard, task)
    try:
        await run.quiet()
        yield run
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def reconciler(app: App) -> Reconciler:
    return Reconciler(app)


def fake_clock() -> FakeClock:
    return FakeClock(T0)
