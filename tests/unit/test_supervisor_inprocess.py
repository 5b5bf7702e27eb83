"""The Supervisor in-process with test services: start order and READY, heartbeats under
service names, start-up failure cleanup, and the shutdown deadline for a loop that will not
stop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog
from jobs_fakes import add_instance

from gpuwarden.config import settings as config
from gpuwarden.fleet.app import App
from gpuwarden.lifecycle import supervisor
from gpuwarden.lifecycle.service import Service
from gpuwarden.system.lock import StateLock
from gpuwarden.system.systemd import Notifier


class Recorder(Notifier):
    """Records notifications, and what `journal` held when READY=1 went out."""

    def __init__(self, journal: list[str] | None = None) -> None:
        super().__init__(None)
        self.sent: list[dict[str, object]] = []
        self.ready_seen = asyncio.Event()
        self.journal = journal if journal is not None else []
        self.at_ready: list[str] = []

    def notify(self, **fields: object) -> bool:
        self.sent.append(fields)
        if "READY" in fields and not self.ready_seen.is_set():
            self.at_ready = list(self.journal)
            self.ready_seen.set()
        return True


class Loop:
    def __init__(self, name: str, journal: list[str], app: App) -> None:
        self.name = name
        self.journal = journal
        self.app = app

    async def start(self) -> None:
        self.journal.append(f"start {self.name}")

    async def run(self) -> None:
        self.journal.append(f"run {self.name}")
        while True:
            self.app.heartbeats.beat(self.name)
            await asyncio.sleep(0.01)


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[config.Settings]:
    for name in list(os.environ):
        if name.startswith(("GPUWARDEN_", "NOTIFY_", "WATCHDOG_")):
            monkeypatch.delenv(name)
    path = tmp_path / "c.toml"
    path.write_text(
        f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n[providers.sim]\nenabled = false\n'
    )
    loaded = config.load(path)
    # Below the 1 s floor a config may set, so that the overrun test ends quickly.
    quick = loaded.daemon.model_copy(update={"shutdown_timeout": timedelta(seconds=0.3)})
    yield loaded.model_copy(update={"daemon": quick})


def make(
    settings: config.Settings,
    tmp_path: Path,
    build: Callable[[App], list[Service]],
    journal: list[str] | None = None,
) -> tuple[supervisor.Supervisor, Recorder]:
    sup = supervisor.Supervisor(settings, tmp_path / "c.toml", build_services=build)
    rec = Recorder(journal)
    sup.notifier = rec
    return sup, rec


async def test_services_start_in_order_then_ready_then_run(
    settings: config.Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal: list[str] = []

    def build(app: App) -> list[Service]:
        journal.append("build")
        return [Loop("alpha", journal, app), Loop("beta", journal, app)]

    sup, rec = make(settings, tmp_path, build, journal)
    task = asyncio.create_task(sup.run())
    await asyncio.wait_for(rec.ready_seen.wait(), 10)
    assert rec.at_ready == ["build", "start alpha", "start beta"]  # after every start()
    assert sup.app is not None and sup.app.ssh_public_key.startswith("ssh-ed25519 ")
    assert sup.app.reload is not None
    for _ in range(100):  # the loops get going
        if "run beta" in journal:
            break
        await asyncio.sleep(0.01)
    assert set(sup.app.heartbeats.ages()) >= {"alpha", "beta"}
    names = {t.get_name() for t in asyncio.all_tasks()}
    assert {"alpha", "beta", "systemd-watchdog", "config-reload"} <= names
    sup.stopping.set()
    assert await asyncio.wait_for(task, 10) == 0
    assert [m["STATUS"] for m in rec.sent if "STOPPING" in m] == ["stopping"]  # none live
    with StateLock(settings.lock_path):  # released on the way out
        pass


async def test_a_failing_start_cleans_up_and_exits_1(
    settings: config.Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Broken:
        name = "broken"

        async def start(self) -> None:
            raise RuntimeError("cannot bind")

        async def run(self) -> None:
            raise AssertionError("never runs")

    sup, rec = make(settings, tmp_path, lambda app: [Broken()])
    with structlog.testing.capture_logs() as logs:
        code = await asyncio.wait_for(sup.run(), 10)
    assert code == 1
    assert not rec.ready_seen.is_set()  # never READY
    failed = [e for e in logs if e["event"] == "startup_failed"]
    assert failed and failed[0].get("exc_info")
    with StateLock(settings.lock_path):
        pass


async def test_a_corrupt_database_exits_1_while_the_services_are_still_being_imported(
    settings: config.Settings, tmp_path: Path
) -> None:
    settings.daemon.state_dir.mkdir(parents=True)
    settings.db_path.write_bytes(b"not a database" * 100)
    sup, rec = make(settings, tmp_path, lambda app: [])
    with structlog.testing.capture_logs() as logs:
        code = await asyncio.wait_for(sup.run(), 30)
    assert code == 1
    assert not rec.ready_seen.is_set()
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["store_corrupt"]
    with StateLock(settings.lock_path):  # released on the way out
        pass


async def test_a_service_module_that_fails_to_import_fails_the_start_after_the_store_closes(
    settings: config.Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        supervisor, "SERVICE_MODULES", (*supervisor.SERVICE_MODULES, "gpuwarden.no_such_module")
    )
    built: list[App] = []

    def build(app: App) -> list[Service]:
        built.append(app)
        return []

    sup, rec = make(settings, tmp_path, build)
    with structlog.testing.capture_logs() as logs:
        code = await asyncio.wait_for(sup.run(), 30)
    assert code == 1
    assert not rec.ready_seen.is_set() and built == []  # failed before any service
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["startup_failed"]
    with StateLock(settings.lock_path):
        pass
    # The store was closed: the database opens again, whole.
    from gpuwarden.core.clock import FakeClock
    from gpuwarden.store import Store

    store = await Store.open(settings.db_path, FakeClock())
    await store.close()


async def test_a_loop_that_ignores_cancellation_meets_the_shutdown_deadline(
    settings: config.Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = asyncio.Event()

    class Stubborn:
        name = "stubborn"

        async def start(self) -> None:
            pass

        async def run(self) -> None:
            while not release.is_set():
                try:
                    await release.wait()
                except asyncio.CancelledError:
                    continue  # the bug this deadline exists for

    sup, rec = make(settings, tmp_path, lambda app: [Stubborn()])
    task = asyncio.create_task(sup.run())
    await asyncio.wait_for(rec.ready_seen.wait(), 10)
    with structlog.testing.capture_logs() as logs:
        sup.stopping.set()
        code = await asyncio.wait_for(task, 10)
    assert code == 1 and sup.abandoned
    overran = [e for e in logs if e["event"] == "shutdown_deadline_exceeded"]
    assert overran and "stubborn" in overran[0]["tasks"]
    release.set()  # let the stuck task end so the test loop closes cleanly
    await asyncio.sleep(0)
    for t in asyncio.all_tasks():
        if t.get_name() in ("stubborn", "root"):
            await asyncio.gather(t, return_exceptions=True)


async def test_a_held_lock_exits_75_before_opening_the_database(
    settings: config.Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings.daemon.state_dir.mkdir(parents=True)
    with StateLock(settings.lock_path):
        sup, _ = make(settings, tmp_path, lambda app: [])
        assert await sup.run() == 75
    assert not settings.db_path.exists()
    assert f"pid {os.getpid()}" in capsys.readouterr().err


async def test_the_control_socket_binds_before_the_reconciler_looks_at_any_provider(
    settings: config.Settings, tmp_path: Path
) -> None:
    """A second daemon on the same socket (another state dir, the same label) must fail
    before its reconciler's first pass could end the first daemon's instances as orphans."""
    from gpuwarden.lifecycle import wiring

    journal: list[str] = []

    def build(app: App) -> list[Service]:
        services = wiring.build_services(app)
        for service in services:
            real = service.start

            async def start(name: str = service.name, real: Any = real) -> None:
                journal.append(name)
                await real()

            service.start = start  # type: ignore[method-assign]
        return services

    other = tmp_path / "first.sock"
    first = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # a live daemon's socket
    first.bind(str(other))
    first.listen(1)
    try:
        second = settings.model_copy(
            update={"daemon": settings.daemon.model_copy(update={"socket": other})}
        )
        sup, rec = make(second, tmp_path, build)
        assert await asyncio.wait_for(sup.run(), 10) == 1
    finally:
        first.close()
    assert journal == ["control"]  # refused at the socket: the reconciler never started
    assert not rec.ready_seen.is_set()


async def test_a_sim_base_url_means_that_sim_and_none_of_its_own(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n'
        '[providers.sim]\nenabled = true\nbase_url = "http://127.0.0.1:8700/"\n'
    )
    sup, _ = make(config.load(path), tmp_path, lambda app: [])
    async with contextlib.AsyncExitStack() as stack:
        urls = await sup._start_sim(stack)
    assert urls is not None
    assert (urls.vast, urls.lambda_) == (
        "http://127.0.0.1:8700/vast",
        "http://127.0.0.1:8700/lambda/api/v1",
    )
    assert not (tmp_path / "state" / "sim").exists()  # no sandbox: no sim started here


async def test_stopping_with_instances_billing_warns_with_count_and_burn(
    settings: config.Settings, tmp_path: Path
) -> None:
    """Nothing ends them on their deadlines while the daemon is down: STATUS= and a warning
    say how many still bill and at what hourly rate."""

    class Renter:
        name = "renter"

        def __init__(self, app: App) -> None:
            self.app = app

        async def start(self) -> None:
            await add_instance(self.app, "i1", price_per_hour=0.25)
            await add_instance(self.app, "i2", price_per_hour=1.5)

        async def run(self) -> None:
            await asyncio.Event().wait()

    sup, rec = make(settings, tmp_path, lambda app: [Renter(app)])
    task = asyncio.create_task(sup.run())
    await asyncio.wait_for(rec.ready_seen.wait(), 10)
    with structlog.testing.capture_logs() as logs:
        sup.stopping.set()
        assert await asyncio.wait_for(task, 10) == 0
    stopping = [m for m in rec.sent if "STOPPING" in m]
    assert stopping[0]["STATUS"] == "stopping with 2 instance(s) still billing, $1.750/h"
    warned = [e for e in logs if e["event"] == "stopping_with_instances_billing"]
    assert warned and warned[0]["log_level"] == "warning"
    assert (warned[0]["count"], warned[0]["burn_per_hour"]) == (2, 1.75)


async def test_sim_on_openssh_it_cannot_serve_exits_78_before_any_sim_starts(
    settings: config.Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from gpuwarden.sim import openssh

    monkeypatch.setattr(openssh, "SSHD", tmp_path / "no-sshd")
    sim = settings.providers.sim.model_copy(update={"enabled": True, "ssh": "openssh"})
    providers = settings.providers.model_copy(update={"sim": sim})
    sup, _ = make(settings.model_copy(update={"providers": providers}), tmp_path, lambda app: [])
    with structlog.testing.capture_logs() as logs:
        assert await sup.run() == 78
    [refused] = [e for e in logs if e.get("event") == "openssh_unavailable"]
    assert refused["field"] == "providers.sim.ssh" and "openssh-server" in refused["error"]
    assert not (settings.daemon.state_dir / "sim").exists()
