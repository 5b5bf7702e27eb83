"""What the tests share: the App factory, the clocks, `eventually`, short temporary
directories for AF_UNIX sockets, and the environment and event loop a `gpuwarden run` child
(gpuwarden.system.childproc.DaemonProcess) is started with.

Fixtures are found by pytest; the plain helpers are imported as `from tests.conftest import
...` (tests/ is a package, so this module is `tests.conftest` for pytest and mypy alike).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import inspect
import os
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn, Protocol, TypeVar

import pytest

from gpuwarden.config.settings import Settings
from gpuwarden.core.clock import Clock, FakeClock, SystemClock
from gpuwarden.core.heartbeat import Heartbeats
from gpuwarden.fleet.app import App
from gpuwarden.fleet.terminator import Terminator
from gpuwarden.providers.base import Provider
from gpuwarden.store import Store

T = TypeVar("T")

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)  # the `clock` fixture's start


# --- clocks ----------------------------------------------------------------------------------


class AutoClock(FakeClock):
    """A FakeClock whose sleeps move time at once and are recorded (no waiting at all)."""

    def __init__(self) -> None:
        super().__init__()
        self.slept: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        await self.advance(seconds)


@pytest.fixture
def clock() -> FakeClock:
    """A FakeClock at T0: time moves only when the test advances it."""
    return FakeClock(T0)


@pytest.fixture
def auto_clock() -> AutoClock:
    """A clock whose sleeps return at once, having moved time (the provider clients' pacing
    and backoff, read from `auto_clock.slept`)."""
    return AutoClock()


# --- the App ---------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def open_app(
    settings: Settings,
    clock: Clock | None = None,
    providers: Iterable[Provider] = (),
) -> AsyncIterator[App]:
    """The tests' one App: `settings`, the clock (the SystemClock unless given), a real Store
    at settings.db_path, the providers by name, fresh heartbeats, its one Terminator, started
    now, no loops. The store is closed at the end."""
    clock = clock or SystemClock()
    store = await Store.open(settings.db_path, clock)
    by_name: dict[str, Provider] = {p.name: p for p in providers}
    try:
        yield App(
            settings,
            clock,
            store,
            by_name,
            Heartbeats(clock),
            Terminator(store, clock, by_name),
            started_monotonic=clock.monotonic(),
        )
    finally:
        await store.close()


class MakeApp(Protocol):
    """The `make_app` fixture: open_app's arguments; the settings default to a state
    directory in tmp_path and nothing else."""

    async def __call__(
        self,
        settings: Settings | None = None,
        clock: Clock | None = None,
        providers: Iterable[Provider] = (),
    ) -> App: ...


@pytest.fixture
async def make_app(tmp_path: Path) -> AsyncIterator[MakeApp]:
    """Build Apps with open_app; their stores are closed when the test ends."""
    async with contextlib.AsyncExitStack() as stack:

        async def make(
            settings: Settings | None = None,
            clock: Clock | None = None,
            providers: Iterable[Provider] = (),
        ) -> App:
            conf = settings or Settings(daemon={"state_dir": str(tmp_path)})
            return await stack.enter_async_context(open_app(conf, clock, providers))

        yield make


# --- waiting -----------------------------------------------------------------------------------


async def eventually(
    check: Callable[[], object],
    *,
    timeout: float = 15.0,
    interval: float = 0.03,
    what: str | None = None,
) -> Any:
    """The first truthy result of `check()` (awaited if it returns an awaitable), polled every
    `interval` seconds of real time. Past `timeout` (a check still running is cancelled):
    AssertionError naming `what` and the last result.

    For conditions on real things (processes, sockets, the store's I/O thread); a test on a
    FakeClock steps the clock instead, and waits on events where it has them."""
    result: object = None
    bound = asyncio.timeout(timeout)
    try:
        async with bound:
            while True:
                result = check()
                if inspect.isawaitable(result):
                    result = await result
                if result:
                    return result
                await asyncio.sleep(interval)
    except TimeoutError:
        if not bound.expired():
            raise  # the check's own timeout, not ours
        waited = f"waiting for {what}" if what else "for a condition"
        raise AssertionError(f"timed out after {timeout:g} s {waited} (last: {result!r})") from None


# --- short directories ---------------------------------------------------------------------------


@contextlib.contextmanager
def short_tmp() -> Iterator[Path]:
    """A new directory straight under /tmp, removed at the end. AF_UNIX socket paths are
    limited to 108 bytes, which pytest's tmp_path can exceed."""
    path = Path(tempfile.mkdtemp(prefix="gwt-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory for sockets (see short_tmp), removed after the test."""
    with short_tmp() as path:
        yield path


# --- daemon processes ----------------------------------------------------------------------------


def daemon_env(**extra: str) -> dict[str, str]:
    """The environment for a child `gpuwarden` process: ours without what would steer it
    (GPUWARDEN_* settings, systemd's NOTIFY_/WATCHDOG_/JOURNAL_ variables, a credentials
    directory), unbuffered, plus `extra`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("GPUWARDEN_", "NOTIFY_", "WATCHDOG_", "JOURNAL_"))
        and k != "CREDENTIALS_DIRECTORY"
    }
    return env | {"PYTHONUNBUFFERED": "1"} | extra


class LoopThread:
    """An event loop in a thread of its own, for synchronous tests that keep an asyncio object
    (a DaemonProcess reading the daemon's output) alive between calls."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="loop", daemon=True)

    def __enter__(self) -> LoopThread:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run `coro` on the loop and wait (up to `timeout` s) for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


# --- the runner script ----------------------------------------------------------------------------

RUNNER_SCRIPT = Path(__file__).resolve().parents[1] / "daemon/gpuwarden/remote/assets/txt2img.py"


def load_runner(name: str = "txt2img_under_test") -> ModuleType:
    """The instance-side runner (txt2img.py) imported as a module, to call its functions."""
    spec = importlib.util.spec_from_file_location(name, RUNNER_SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def unavailable(reason: str) -> NoReturn:
    """Skip with `reason`, or fail under CI, where everything the tests need is installed."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI must run these tests)")
    pytest.skip(reason)


def processes_with(marker: str) -> list[int]:
    """Pids of live (not zombie) processes whose command line contains `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(") ", 1)[1][:1]
        except (OSError, IndexError):
            continue
        if marker in cmdline and state != "Z":
            found.append(int(entry.name))
    return found
