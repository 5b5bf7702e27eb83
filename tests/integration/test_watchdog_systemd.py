"""The systemd watchdog end to end through the real Supervisor, with a fake NOTIFY_SOCKET
(a datagram socket we read) and a FakeClock: WATCHDOG=1 goes out only while every loop beats;
a stalled loop stops the pings and STATUS names it; a loop that keeps raising is restarted
with backoff until its backoff outgrows the staleness limit, and then it too stops the pings
(so systemd restarts the daemon). Also: every service the daemon wires up beats on time."""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import eventually

from gpuwarden.config.settings import Settings
from gpuwarden.core.clock import Clock, FakeClock, SystemClock, settle
from gpuwarden.core.heartbeat import BEAT_EVERY, STALE_AFTER
from gpuwarden.fleet.app import App
from gpuwarden.lifecycle import wiring
from gpuwarden.lifecycle.service import Service
from gpuwarden.lifecycle.supervisor import Supervisor

WATCHDOG_SEC = 10.0  # WatchdogSec: the supervisor pings every half of it


class Steady:
    """A healthy loop: beats, sleeps BEAT_EVERY on the clock, forever."""

    name = "steady"

    async def start(self) -> None:
        pass

    def __init__(self, app: App) -> None:
        self.app = app

    async def run(self) -> None:
        while True:
            self.app.heartbeats.beat(self.name)
            await self.app.clock.sleep(BEAT_EVERY)


class Stalling:
    """Beats like Steady until `stall` is set, then hangs (no beats) until `release`."""

    name = "stall"

    async def start(self) -> None:
        pass

    def __init__(self, app: App) -> None:
        self.app = app
        self.stall = asyncio.Event()
        self.release = asyncio.Event()

    async def run(self) -> None:
        while True:
            self.app.heartbeats.beat(self.name)
            if self.stall.is_set():
                await self.release.wait()  # wedged: e.g. a call with no timeout
                self.stall.clear()
                continue
            await self.app.clock.sleep(BEAT_EVERY)


class Failing:
    """Raises at once, every time: the supervisor restarts it with growing backoff."""

    name = "flaky"

    async def start(self) -> None:
        pass

    def __init__(self, app: App) -> None:
        self.app = app
        self.runs = 0

    async def run(self) -> None:
        self.runs += 1
        self.app.heartbeats.beat(self.name)
        raise RuntimeError("boom")


@dataclass
class NotifySocket:
    sock: socket.socket
    path: str
    messages: list[dict[str, str]]
    counted: int = 0

    def drain(self) -> list[dict[str, str]]:
        """Read every datagram sent so far (sendto is synchronous: nothing is in flight)."""
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return self.messages
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append(fields)

    def pings(self) -> int:
        return sum(1 for m in self.drain() if m.get("WATCHDOG") == "1")

    def new_pings(self) -> int:
        """Pings since the last call."""
        total = self.pings()
        fresh, self.counted = total - self.counted, total
        return fresh

    def statuses(self) -> list[str]:
        return [m["STATUS"] for m in self.drain() if "STATUS" in m]


@pytest.fixture
def notify(monkeypatch: pytest.MonkeyPatch, short_dir: Path) -> Iterator[NotifySocket]:
    path = str(short_dir / "notify")  # AF_UNIX paths are short
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", str(int(WATCHDOG_SEC * 1_000_000)))
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    try:
        yield NotifySocket(sock, path, [])
    finally:
        sock.close()


@dataclass
class Daemon:
    sup: Supervisor
    clock: Any
    task: asyncio.Task[int]
    services: list[Service]

    async def step(self, seconds: float, by: float = 1.0) -> None:
        for _ in range(round(seconds / by)):
            await self.clock.advance(by)


@pytest.fixture
async def daemon_factory(
    tmp_path: Path, short_dir: Path, notify: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Callable[..., Awaitable[Daemon]]]:
    started: list[Daemon] = []

    async def start(build: Callable[[App], list[Service]], clock: Clock | None = None) -> Daemon:
        holder: list[Service] = []

        def built(app: App) -> list[Service]:
            holder.extend(build(app))
            return holder

        settings = Settings(
            daemon={"state_dir": str(tmp_path / "state"), "socket": str(short_dir / "ctl.sock")}
        )
        clock = clock or FakeClock()
        sup = Supervisor(settings, tmp_path / "config.toml", clock=clock, build_services=built)
        task = asyncio.create_task(sup.run())

        def ready() -> bool:
            if any(m.get("READY") == "1" for m in notify.drain()):
                return True
            if task.done():
                raise AssertionError(f"daemon exited early: {task.result()}")
            return False

        # Real start-up I/O: store, key, lock.
        await eventually(ready, timeout=15, interval=0.02, what="READY=1")
        await settle()
        d = Daemon(sup, clock, task, holder)
        started.append(d)
        return d

    try:
        yield start
    finally:
        for d in started:
            d.sup.stopping.set()
            code = await asyncio.wait_for(d.task, 15)
            assert code == 0


async def test_a_stalled_loop_stops_the_pings_and_status_names_it(
    daemon_factory: Callable[..., Awaitable[Daemon]], notify: NotifySocket
) -> None:
    stalling: list[Stalling] = []

    def build(app: App) -> list[Service]:
        stalling.append(Stalling(app))
        return [Steady(app), stalling[0]]

    d = await daemon_factory(build)
    before = notify.pings()
    await d.step(3 * WATCHDOG_SEC)
    healthy = notify.pings() - before
    assert healthy >= 5  # every WatchdogSec/2 while all loops beat

    stalling[0].stall.set()
    await d.step(STALE_AFTER + 2 * WATCHDOG_SEC)
    statuses = notify.statuses()
    assert statuses[-1] == "stalled: stall"
    stalled_at = next(
        i for i, m in enumerate(notify.messages) if m.get("STATUS") == "stalled: stall"
    )
    pings_after_stall = [m for m in notify.messages[stalled_at:] if m.get("WATCHDOG") == "1"]
    assert pings_after_stall == []
    # Keep going: still silent, for as long as the loop stays stuck (systemd would now kill us).
    quiet = notify.pings()
    await d.step(2 * WATCHDOG_SEC)
    assert notify.pings() == quiet
    assert d.sup.app is not None
    assert d.sup.app.heartbeats.stale() == ["stall"]

    stalling[0].release.set()
    await d.step(WATCHDOG_SEC)
    assert notify.pings() > quiet
    assert notify.statuses()[-1].startswith("running")


async def test_a_loop_that_keeps_raising_is_restarted_then_goes_stale(
    daemon_factory: Callable[..., Awaitable[Daemon]], notify: NotifySocket
) -> None:
    failing: list[Failing] = []

    def build(app: App) -> list[Service]:
        failing.append(Failing(app))
        return [Steady(app), failing[0]]

    d = await daemon_factory(build)
    # Backoff 1, 2, 4, 8, 16 s: the loop beats at each restart, within the staleness limit...
    await d.step(31)
    assert failing[0].runs >= 5
    assert not any(s.startswith("stalled") for s in notify.statuses())
    # ...until the waits (32 s, then 60 s) outgrow it: STATUS names it and the pings pause
    # for longer than the shipped unit's WatchdogSec, so systemd restarts the daemon.
    ping_times: list[float] = []
    notify.new_pings()
    for second in range(120):
        await d.clock.advance(1.0)
        ping_times += [float(second)] * notify.new_pings()
    assert "stalled: flaky" in notify.statuses()
    gaps = [b - a for a, b in itertools.pairwise(ping_times)]
    assert max(gaps) > unit_watchdog_sec(), (gaps, failing[0].runs)


def unit_watchdog_sec() -> float:
    """WatchdogSec of systemd/gpuwarden.service (30 s when the unit does not say)."""
    unit = Path(__file__).resolve().parents[2] / "systemd" / "gpuwarden.service"
    text = unit.read_text() if unit.exists() else ""
    m = re.search(r"^WatchdogSec=(\d+)s?\s*$", text, re.MULTILINE)
    return float(m.group(1)) if m else 30.0


@pytest.mark.slow
async def test_every_wired_service_beats_within_beat_every(
    daemon_factory: Callable[..., Awaitable[Daemon]], notify: NotifySocket
) -> None:
    """The daemon's real services (as wiring lists them), idle, on the system clock (some
    loops time their beats on the event loop): none may go longer than BEAT_EVERY between
    beats, or the systemd watchdog would kill a healthy daemon."""
    d = await daemon_factory(wiring.build_services, SystemClock())
    assert d.services, "wiring built no services"
    app = d.sup.app
    assert app is not None
    names = sorted(s.name for s in d.services)
    worst: dict[str, float] = {}
    loop = asyncio.get_running_loop()
    end = loop.time() + BEAT_EVERY + 2.5  # a loop slower than BEAT_EVERY + 1 shows here
    while loop.time() < end:  # sampling real time: what is measured is the loops' pace
        for name, age in app.heartbeats.ages().items():
            worst[name] = max(worst.get(name, 0.0), age)
        await asyncio.sleep(0.1)
    assert sorted(worst) == names
    late = {n: round(a, 1) for n, a in worst.items() if a > BEAT_EVERY + 1.0}
    assert late == {}, f"loops that beat late: {late}"
    assert not any(s.startswith("stalled") for s in notify.statuses())
