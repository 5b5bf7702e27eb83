"""FakeClock: sleepers wake in deadline order as time is stepped; sleep_until can be
interrupted by an event (which it clears). And nothing in daemon/ but clock.py reads time."""

from __future__ import annotations

import ast
import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

from gpuwarden.core.clock import FakeClock, SystemClock, format_ts, parse_ts

DAEMON = Path(__file__).resolve().parents[2] / "daemon" / "gpuwarden"
# What runs on instances (the job runner) is not the daemon: it has no Clock to read through.
INSTANCE_FILES = DAEMON / "remote" / "assets"
START = datetime(2026, 1, 1, tzinfo=UTC)


async def test_advance_wakes_sleepers_in_deadline_order() -> None:
    clock = FakeClock(START)
    woke: list[tuple[str, datetime]] = []

    async def sleeper(name: str, secs: float) -> None:
        await clock.sleep(secs)
        woke.append((name, clock.now()))

    tasks = [
        asyncio.create_task(sleeper(name, secs))
        for name, secs in (("c", 30), ("a", 10), ("b", 20), ("late", 100))
    ]
    await clock.advance(0)
    assert clock.sleepers == 4
    assert clock.next_wake() == START + timedelta(seconds=10)
    await clock.advance(25)
    assert woke == [("a", START + timedelta(seconds=10)), ("b", START + timedelta(seconds=20))]
    assert clock.now() == START + timedelta(seconds=25)
    await clock.advance(5)
    assert [n for n, _ in woke] == ["a", "b", "c"]
    assert clock.sleepers == 1
    tasks[3].cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert clock.sleepers == 0 and clock.next_wake() is None


async def test_monotonic_moves_with_now() -> None:
    clock = FakeClock(START)
    mono = clock.monotonic()
    await clock.advance(90)
    assert clock.monotonic() - mono == 90
    clock.set(START + timedelta(hours=1))  # a wall-clock jump does not move monotonic time
    assert clock.monotonic() - mono == 90


async def test_sleep_until_is_interrupted_and_clears_the_event() -> None:
    clock = FakeClock(START)
    interrupt = asyncio.Event()
    task = asyncio.create_task(clock.sleep_until(START + timedelta(hours=1), interrupt))
    await clock.advance(60)
    assert not task.done()
    interrupt.set()
    assert await asyncio.wait_for(task, 5) is True
    assert not interrupt.is_set()  # each change is seen once
    assert clock.sleepers == 0  # the cancelled sleep does not linger


async def test_sleep_until_reaches_its_time() -> None:
    clock = FakeClock(START)
    interrupt = asyncio.Event()
    task = asyncio.create_task(clock.sleep_until(START + timedelta(minutes=5), interrupt))
    await clock.advance(299)
    assert not task.done()
    await clock.advance(1)
    assert task.done() and task.result() is False


async def test_sleep_until_with_a_set_event_returns_at_once() -> None:
    clock = FakeClock(START)
    interrupt = asyncio.Event()
    interrupt.set()
    assert await clock.sleep_until(START + timedelta(days=1), interrupt) is True
    assert await clock.sleep_until(START - timedelta(seconds=1)) is False  # the past: no wait


async def test_system_clock_is_aware_utc() -> None:
    clock = SystemClock()
    assert clock.now().tzinfo is not None
    assert await clock.sleep_until(clock.now() - timedelta(seconds=1)) is False


def test_timestamps_round_trip() -> None:
    when = datetime(2026, 5, 1, 8, 30, 0, 123456, tzinfo=UTC)
    assert parse_ts(format_ts(when)) == when
    assert parse_ts("2026-05-01T08:30:00") == datetime(2026, 5, 1, 8, 30, tzinfo=UTC)


BANNED = {("time", "time"), ("time", "monotonic"), ("time", "time_ns"),
          ("time", "monotonic_ns"), ("datetime", "now"), ("datetime", "utcnow"),
          ("datetime", "today"), ("date", "today")}  # fmt: skip


def _time_reads(tree: ast.AST) -> list[str]:
    """Calls like time.time(), datetime.now(), datetime.datetime.utcnow(), and names imported
    from time that read the clock (from time import monotonic)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            base = node.func.value
            owner = base.attr if isinstance(base, ast.Attribute) else getattr(base, "id", "")
            if (owner, node.func.attr) in BANNED:
                found.append(f"{owner}.{node.func.attr}() line {node.lineno}")
        if isinstance(node, ast.ImportFrom) and node.module == "time":
            for alias in node.names:
                if ("time", alias.name) in BANNED:
                    found.append(f"from time import {alias.name} line {node.lineno}")
    return found


def test_nothing_but_clock_py_reads_the_time() -> None:
    offenders = {}
    files = sorted(DAEMON.rglob("*.py"))
    assert len(files) > 10
    for path in files:
        if path == DAEMON / "core" / "clock.py" or path.is_relative_to(INSTANCE_FILES):
            continue
        hits = _time_reads(ast.parse(path.read_text(), str(path)))
        if hits:
            offenders[str(path.relative_to(DAEMON))] = hits
    assert offenders == {}


def test_the_ast_check_catches_each_form() -> None:
    src = (
        "import time, datetime\nfrom datetime import datetime as dt\nfrom time import monotonic\n"
        "time.time()\ndatetime.datetime.now()\ndt.now()\n"
    )
    hits = _time_reads(ast.parse(src))
    assert len(hits) == 3  # an aliased name (dt.now) is left to ruff's banned-api rule
    assert any("time.time()" in h for h in hits)
    assert any("datetime.now()" in h for h in hits)
    assert any("from time import monotonic" in h for h in hits)
