"""The supervisor's parts with fakes: restart with capped backoff, the signal handlers, and
config reload (a broken file keeps the old config)."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest
import structlog
from tests.conftest import MakeApp

from gpuwarden.config import settings as config
from gpuwarden.core.clock import FakeClock
from gpuwarden.core.model import CONFIG_RELOADED
from gpuwarden.fleet.app import App
from gpuwarden.lifecycle.reloader import ConfigReloader, changed_keys
from gpuwarden.lifecycle.runtime import EXIT_FORCED, SignalHandlers, backoff, keep_running
from gpuwarden.system.systemd import Notifier


def test_backoff_doubles_up_to_the_cap() -> None:
    assert [backoff(n) for n in range(1, 10)] == [1, 2, 4, 8, 16, 32, 60, 60, 60]


class Flaky:
    """Fails `failures` times, then runs until cancelled."""

    name = "flaky"

    async def start(self) -> None:
        pass

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0
        self.running = asyncio.Event()

    async def run(self) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise RuntimeError(f"failure {self.calls}")
        self.running.set()
        await asyncio.Event().wait()


async def test_a_failing_loop_is_restarted_with_backoff() -> None:
    clock = FakeClock()
    service = Flaky(failures=3)
    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(keep_running(service, clock, asyncio.Event()))
        waits = []
        for _ in range(3):
            await clock.advance(0)
            wake = clock.next_wake()
            assert wake is not None
            waits.append((wake - clock.now()).total_seconds())
            await clock.advance(waits[-1])
        await asyncio.wait_for(service.running.wait(), 5)
    assert waits == [1.0, 2.0, 4.0]
    assert service.calls == 4
    failed = [e for e in logs if e["event"] == "service_failed"]
    assert [e["restart_in"] for e in failed] == [1.0, 2.0, 4.0]
    assert all(e["service"] == "flaky" and e.get("exc_info") for e in failed)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled()  # cancellation passes straight through


async def test_backoff_starts_afresh_after_a_healthy_run() -> None:
    clock = FakeClock()

    class FailsAfterAWhile:
        name = "slow-fail"

        async def start(self) -> None:
            pass

        calls = 0

        async def run(self) -> None:
            self.calls += 1
            await clock.sleep(120)  # healthy for two minutes, then it breaks
            raise RuntimeError("boom")

    service = FailsAfterAWhile()
    task = asyncio.create_task(keep_running(service, clock, asyncio.Event()))
    await clock.advance(0)  # let it start its first run
    for _ in range(3):
        await clock.advance(120)
        wake = clock.next_wake()
        assert wake is not None and (wake - clock.now()).total_seconds() == 1.0
        await clock.advance(1)
    assert service.calls == 4
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_a_loop_that_ends_on_stop_is_not_restarted() -> None:
    clock = FakeClock()
    stopping = asyncio.Event()

    class Polite:
        name = "polite"

        async def start(self) -> None:
            pass

        async def run(self) -> None:
            await stopping.wait()

    task = asyncio.create_task(keep_running(Polite(), clock, stopping))
    stopping.set()
    await asyncio.wait_for(task, 5)
    assert task.done() and task.exception() is None


async def test_a_loop_that_returns_early_is_restarted() -> None:
    clock = FakeClock()
    runs = 0

    class Quitter:
        name = "quitter"

        async def start(self) -> None:
            pass

        async def run(self) -> None:
            nonlocal runs
            runs += 1

    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(keep_running(Quitter(), clock, asyncio.Event()))
        await clock.advance(0)
        await clock.advance(1)
    assert runs == 2
    assert [e["event"] for e in logs][:2] == ["service_exited", "service_restarting"]
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def test_signal_handlers_set_events_and_a_second_sigint_forces_exit() -> None:
    stopping, reload = asyncio.Event(), asyncio.Event()
    forced: list[int] = []
    handlers = SignalHandlers(stopping, reload, force_exit=forced.append)
    handlers.on_hup(signal.SIGHUP)
    assert reload.is_set() and not stopping.is_set()
    handlers.on_stop(signal.SIGTERM)
    assert stopping.is_set() and forced == []
    handlers.on_stop(signal.SIGINT)  # the first Ctrl-C: still graceful
    assert forced == []
    handlers.on_stop(signal.SIGINT)
    assert forced == [EXIT_FORCED] == [130]


async def test_handlers_are_installed_on_the_loop() -> None:
    stopping, reload = asyncio.Event(), asyncio.Event()
    handlers = SignalHandlers(stopping, reload)
    loop = asyncio.get_running_loop()
    handlers.install(loop)
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        await asyncio.wait_for(reload.wait(), 5)
        assert not stopping.is_set()
    finally:
        handlers.remove(loop)


# --- reload ----------------------------------------------------------------------------------


class Recorder(Notifier):
    def __init__(self) -> None:
        super().__init__(None)
        self.sent: list[dict[str, object]] = []

    def notify(self, **fields: object) -> bool:
        self.sent.append(fields)
        return True


@pytest.fixture
async def app_with_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_app: MakeApp
) -> tuple[App, Path]:
    for name in list(os.environ):
        if name.startswith("GPUWARDEN_"):
            monkeypatch.delenv(name)
    path = tmp_path / "c.toml"
    path.write_text(f'[daemon]\nstate_dir = "{tmp_path}"\n[policy]\nidle_timeout = "30m"\n')
    return await make_app(config.load(path), FakeClock()), path


async def test_a_broken_file_is_refused_and_the_old_config_stays(
    app_with_config: tuple[App, Path],
) -> None:
    app, path = app_with_config
    before = app.settings
    notifier = Recorder()
    reloader = ConfigReloader(app, path, notifier, lambda: "running")
    path.write_text('[policy]\nidle_timeout = "soon"\nlease_max = "1h"\n')
    with structlog.testing.capture_logs() as logs:
        result = await reloader.reload()
    assert result["reloaded"] is False
    assert any("policy.idle_timeout" in p for p in result["problems"])
    assert app.settings is before
    assert CONFIG_RELOADED not in [e.name for e in await app.store.events()]
    refused = [e for e in logs if e["event"] == "config_reload_refused"]
    assert refused and refused[0]["log_level"] == "error"
    assert "RELOADING" in notifier.sent[0] and "READY" in notifier.sent[-1]


NOT_TAKEN = [
    ("a non-UTF-8 byte", b"# caf\xe9\n"),
    ("a duration that overflows", b'[policy]\nidle_timeout = "99999999999d"\n'),
    ("an infinite duration", b"[policy]\nhard_cap = inf\n"),
    ("an empty file", b""),
    ("comments only", b"# nothing here\n"),
]


@pytest.mark.parametrize(("case", "data"), NOT_TAKEN, ids=[n[0] for n in NOT_TAKEN])
async def test_a_reload_that_cannot_be_taken_is_refused_and_the_daemon_goes_on(
    case: str, data: bytes, app_with_config: tuple[App, Path], tmp_path: Path
) -> None:
    app, path = app_with_config
    before = app.settings
    reloader = ConfigReloader(app, path, Recorder(), lambda: "running")
    if data.startswith(b"#") and case != "comments only":
        data = path.read_bytes() + data  # one bad byte appended to a good file
    path.write_bytes(data)
    with structlog.testing.capture_logs() as logs:
        result = await reloader.reload()
    assert result["reloaded"] is False and result["problems"]
    assert app.settings is before
    assert [e for e in logs if e["event"] == "config_reload_refused"]
    assert CONFIG_RELOADED not in [e.name for e in await app.store.events()]
    # and the next good file is taken as usual
    path.write_text(f'[daemon]\nstate_dir = "{tmp_path}"\n[policy]\nidle_timeout = "10m"\n')
    assert (await reloader.reload())["reloaded"] is True
    assert app.settings.policy.idle_timeout.total_seconds() == 600


async def test_a_valid_file_replaces_the_settings_and_is_recorded(
    app_with_config: tuple[App, Path], tmp_path: Path
) -> None:
    app, path = app_with_config
    reloader = ConfigReloader(app, path, Recorder(), lambda: "running")
    path.write_text(
        f'[daemon]\nstate_dir = "{tmp_path}"\nsocket = "/tmp/other.sock"\n'
        '[policy]\nidle_timeout = "10m"\n'
    )
    result = await reloader.reload()
    assert result == {
        "reloaded": True,
        "changed": ["daemon.socket", "policy.idle_timeout"],
        "needs_restart": ["daemon.socket"],
    }
    assert app.settings.policy.idle_timeout.total_seconds() == 600
    assert app.jobs_wake.is_set()
    reloads = [e for e in await app.store.events() if e.name == CONFIG_RELOADED]
    assert [e.details["changed"] for e in reloads] == [["daemon.socket", "policy.idle_timeout"]]
    # The socket in force is still the first one: reloading the same file again still says
    # a restart is needed, though nothing changed since the last reload.
    again = await reloader.reload()
    assert again == {"reloaded": True, "changed": [], "needs_restart": ["daemon.socket"]}


async def test_reload_runs_when_requested(app_with_config: tuple[App, Path]) -> None:
    app, path = app_with_config
    reloader = ConfigReloader(app, path, Recorder(), lambda: "running")
    requested = asyncio.Event()
    task = asyncio.create_task(reloader.run(requested))
    path.write_text(f'[daemon]\nstate_dir = "{path.parent}"\n[policy]\nidle_timeout = "5m"\n')
    requested.set()
    await asyncio.wait_for(app.jobs_wake.wait(), 5)
    assert app.settings.policy.idle_timeout.total_seconds() == 300
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def test_changed_keys() -> None:
    old = {"a": {"b": 1, "c": 2}, "d": 3}
    new = {"a": {"b": 1, "c": 5}, "d": 3, "e": 1}
    assert changed_keys(old, new) == ["a.c", "e"]
