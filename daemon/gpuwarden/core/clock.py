"""Time, injected. Nothing else in the daemon reads the wall clock or sleeps directly.

The system clock serves the daemon; the fake clock serves tests, which step time forward
instead of waiting for it (hypercorn's injected-clock idea).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, timezone-aware UTC."""
        ...

    def monotonic(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...

    async def sleep_until(self, when: datetime, interrupt: asyncio.Event | None = None) -> bool:
        """Sleep until `when`, or until `interrupt` is set. True if interrupted.

        The interrupt event is cleared before returning True, so the caller sees each change
        once.
        """
        ...


async def _wait_or_interrupt(sleeper: asyncio.Future[None], interrupt: asyncio.Event) -> bool:
    waiter: asyncio.Future[Any] = asyncio.ensure_future(interrupt.wait())
    both: list[asyncio.Future[Any]] = [sleeper, waiter]
    try:
        done, _ = await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        if not sleeper.done():
            sleeper.cancel()
    if waiter in done:
        interrupt.clear()
        return True
    return False


class SystemClock:
    """The real clock. Deadlines are re-read against the wall clock after each sleep."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    async def sleep_until(self, when: datetime, interrupt: asyncio.Event | None = None) -> bool:
        delay = max(0.0, (when - self.now()).total_seconds())
        if interrupt is None:
            await asyncio.sleep(delay)
            return False
        if interrupt.is_set():
            interrupt.clear()
            return True
        return await _wait_or_interrupt(asyncio.ensure_future(asyncio.sleep(delay)), interrupt)


class FakeClock:
    """A clock that moves only when a test calls `advance`. Sleepers wake in deadline order."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2026, 1, 1, tzinfo=UTC)
        self._mono = 1000.0
        self._sleepers: list[tuple[datetime, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now(self) -> datetime:
        return self._now

    def monotonic(self) -> float:
        return self._mono

    def _sleeper(self, when: datetime) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if when <= self._now:
            fut.set_result(None)
        else:
            heapq.heappush(self._sleepers, (when, next(self._seq), fut))
        return fut

    async def sleep(self, seconds: float) -> None:
        await self._sleeper(self._now + timedelta(seconds=max(0.0, seconds)))

    async def sleep_until(self, when: datetime, interrupt: asyncio.Event | None = None) -> bool:
        if interrupt is None:
            await self._sleeper(when)
            return False
        if interrupt.is_set():
            interrupt.clear()
            return True
        return await _wait_or_interrupt(self._sleeper(when), interrupt)

    @property
    def sleepers(self) -> int:
        """How many sleeps are pending (cancelled ones excluded)."""
        return sum(1 for _, _, f in self._sleepers if not f.done())

    def next_wake(self) -> datetime | None:
        pending = [w for w, _, f in self._sleepers if not f.done()]
        return min(pending) if pending else None

    async def advance(self, seconds: float) -> None:
        """Move time forward, waking each sleeper at its own deadline and letting it run."""
        target = self._now + timedelta(seconds=seconds)
        while self._sleepers and self._sleepers[0][0] <= target:
            when, _, fut = heapq.heappop(self._sleepers)
            if fut.done():
                continue
            self._mono += (when - self._now).total_seconds()
            self._now = max(self._now, when)
            fut.set_result(None)
            await settle()
        self._mono += (target - self._now).total_seconds()
        self._now = target
        await settle()

    def set(self, when: datetime) -> None:
        """Jump without waking anyone (for setting up a scenario before tasks start)."""
        self._now = when


async def settle(rounds: int = 20) -> None:
    """Let ready tasks run: yields to the loop a few times. Not a wait on wall time."""
    for _ in range(rounds):
        await asyncio.sleep(0)


def parse_ts(value: str | None) -> datetime | None:
    """Parse an ISO 8601 time stored by us; always returns aware UTC."""
    if value is None:
        return None
    dt = datetime.fromisoformat(value)
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def format_ts(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat(timespec="microseconds")
