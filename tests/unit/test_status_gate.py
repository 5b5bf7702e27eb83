"""`status` builds one answer at a time per daemon, through a gate the App owns (created with
it, inside its event loop): a gate made at import was shared by every daemon in the process
and bound to the first loop that waited on it, so a second daemon, or the same one on a
restarted loop, failed with "bound to a different event loop"."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from jobs_fakes import add_instance
from tests.conftest import open_app

from gpuwarden.config.settings import Settings
from gpuwarden.control import instances


async def _two_status_calls_at_once(state_dir: Path) -> list[int]:
    async with open_app(Settings(daemon={"state_dir": str(state_dir)})) as app:
        await add_instance(app)
        real = app.store.jobs_holding_instances
        calls = 0

        async def yielding(*args: Any) -> Any:
            nonlocal calls
            calls += 1
            await asyncio.sleep(0)  # the first call holds the gate across a yield
            return await real(*args)

        app.store.jobs_holding_instances = yielding  # type: ignore[method-assign,assignment]
        answers = await asyncio.gather(instances.status(app), instances.status(app))
        assert calls == 2  # both answers waited in the gate at a read that yields
        return [len(a["instances"]) for a in answers]


def test_two_daemons_on_two_loops_do_not_share_the_status_gate(tmp_path: Path) -> None:
    for name in ("one", "two"):  # each asyncio.run is a new loop, as a restart makes
        (tmp_path / name).mkdir()
        assert asyncio.run(_two_status_calls_at_once(tmp_path / name)) == [1, 1]
