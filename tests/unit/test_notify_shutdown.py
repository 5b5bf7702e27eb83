"""The notifier under the real Supervisor: a daemon that stops with instances still billing
tells the operator so on the way out (the supervisor cancels every loop at once), through
apprise to a local receiver."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from jobs_fakes import add_instance
from notify_support import receiver
from tests.conftest import open_app

from gpuwarden.config import settings as config
from gpuwarden.fleet.app import App
from gpuwarden.lifecycle import supervisor
from gpuwarden.lifecycle.service import Service
from gpuwarden.notify.service import Notifier
from gpuwarden.system import systemd


async def test_a_daemon_stopping_with_instances_billing_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(os.environ):
        if name.startswith(("GPUWARDEN_", "NOTIFY_", "WATCHDOG_")):
            monkeypatch.delenv(name)
    async with receiver() as rx:
        path = tmp_path / "c.toml"
        path.write_text(
            f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n[providers.sim]\nenabled = false\n'
            f'[notify]\nurls = ["{rx.url}"]\nevents = ["stopped_billing"]\n'
        )
        settings = config.load(path)
        # Two instances live when the daemon starts, as after a stop mid-rental.
        settings.daemon.state_dir.mkdir()
        async with open_app(settings) as app:
            await add_instance(app, "i1", price_per_hour=0.25)
            await add_instance(app, "i2", price_per_hour=1.5)
        built: list[Notifier] = []
        made = asyncio.Event()

        def build(app: App) -> list[Service]:
            built.append(Notifier(app))
            made.set()
            return [built[0]]

        sup = supervisor.Supervisor(settings, path, build_services=build)
        sup.notifier = systemd.Notifier(None)
        task = asyncio.create_task(sup.run())
        await asyncio.wait_for(made.wait(), 10)
        await asyncio.wait_for(built[0].asleep.wait(), 10)  # its loop runs: past start-up
        sup.stopping.set()
        assert await asyncio.wait_for(task, 15) == 0
        [got] = rx.got
    assert got["title"] == "gpuwarden[main]: stopped with 2 instance(s) billing"
    assert "$1.75/h" in got["message"] and "i1, i2" in got["message"]
    assert got["type"] == "warning"
