"""Test kit for the notifier: a local HTTP receiver on loopback for apprise's `json://` target
(it can fail the next requests or hang), settings that point at it, and a Notifier running
as a task."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from tests.conftest import eventually

from gpuwarden.config.settings import DaemonSettings, NotifySettings, PolicySettings, Settings
from gpuwarden.core.clock import FakeClock
from gpuwarden.fleet.app import App
from gpuwarden.notify.service import Notifier


class Receiver:
    """What apprise's json:// plugin POSTs, as a list of JSON bodies. `fail_next` answers
    the next N requests 500; `hang` holds every request until the receiver closes."""

    def __init__(self) -> None:
        self.got: list[dict[str, Any]] = []
        self.calls = 0
        self.fail_next = 0
        self.hang = False
        self.entered = asyncio.Event()  # a request arrived (also one that hangs)
        self._changed = asyncio.Event()
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"json://127.0.0.1:{self.port}/hook"

    async def _handle(self, request: web.Request) -> web.Response:
        self.calls += 1
        self.entered.set()
        self._changed.set()
        if self.hang:
            await self._release.wait()
            return web.Response(status=503)
        if self.fail_next > 0:
            self.fail_next -= 1
            return web.Response(status=500, text="down")
        self.got.append(await request.json())
        self._changed.set()
        return web.Response(text="ok")

    async def wait_for(self, count: int, timeout: float = 15.0) -> list[dict[str, Any]]:
        """Wait (on an event, with a timeout) until `count` messages have arrived."""
        async with asyncio.timeout(timeout):
            while len(self.got) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.got

    async def wait_calls(self, count: int, timeout: float = 15.0) -> None:
        async with asyncio.timeout(timeout):
            while self.calls < count:
                self._changed.clear()
                await self._changed.wait()

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert isinstance(server, asyncio.base_events.Server)
        self.port = server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()


@contextlib.asynccontextmanager
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    try:
        yield r
    finally:
        await r.close()


def notify_settings(
    tmp_path: Path, urls: list[str], *, policy: dict[str, Any] | None = None, **notify: Any
) -> Settings:
    return Settings(
        daemon=DaemonSettings(state_dir=tmp_path),
        policy=PolicySettings(**(policy or {})),
        notify=NotifySettings(urls=urls, **notify),
    )


@dataclass
class RunningNotifier:
    notifier: Notifier
    task: asyncio.Task[None]

    async def quiet(self) -> None:
        """Wait until the notifier's main loop sleeps with nothing pending."""
        await eventually(self.notifier.settled, timeout=10, interval=0.001)

    async def step(self, clock: FakeClock, seconds: float) -> None:
        """Advance the fake clock and let the notifier plan what became due."""
        await self.quiet()
        await clock.advance(seconds)
        await self.quiet()

    async def stop(self) -> None:
        """Stop as the daemon does: `stopping` set, the task cancelled."""
        self.notifier.app.stopping.set()
        self.task.cancel()
        await asyncio.wait({self.task}, timeout=15)


@contextlib.asynccontextmanager
async def running_notifier(app: App, **kw: Any) -> AsyncIterator[RunningNotifier]:
    notifier = Notifier(app, **kw)
    await notifier.start()
    task = asyncio.create_task(notifier.run(), name="notifier")
    run = RunningNotifier(notifier, task)
    try:
        async with asyncio.timeout(5):
            await notifier.asleep.wait()
        yield run
    finally:
        task.cancel()
        await asyncio.wait({task}, timeout=15)
