"""Test kit for the cost guard: settings, a Recorder of the store's events, and a guard
running as a task with ways to wait for it without waiting on wall-clock time. The App comes
from the `make_app` fixture (tests/conftest.py), over the `clock` fixture."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import eventually

from gpuwarden.config.settings import BudgetSettings, DaemonSettings, PolicySettings, Settings
from gpuwarden.core.clock import FakeClock
from gpuwarden.core.model import Event, InstanceState
from gpuwarden.fleet.app import App
from gpuwarden.loops.guard import Guard
from gpuwarden.store import Store


def settings(tmp_path: Path, *, budget: dict[str, Any] | None = None, **policy: Any) -> Settings:
    return Settings(
        daemon=DaemonSettings(state_dir=tmp_path),
        policy=PolicySettings(**policy),
        budget=BudgetSettings(**(budget or {})),
    )


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
        await eventually(  # the store's I/O runs in a thread: poll often, time does not move
            lambda: self.guard.settled() and not (drives and term.busy),
            timeout=timeout,
            interval=0.001,
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
