"""The daemon the scale benchmark runs: `gpuwarden run`'s Supervisor with every loop, on the
FakeProvider instead of a cloud, and a watchdog prober that answers at once (no SSH hosts).

Run as `python -m tests.bench.scale_daemon CONFIG` from the repository root. The fake cloud
is rebuilt from the database's live rows (the ids the seed gave them), and each destroy call
is appended to `<state_dir>/destroys.log` as "<provider id> <unix time>", which the
benchmark reads to measure each deadline's lag.
"""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvloop

from gpuwarden.config import settings as config
from gpuwarden.core.clock import Clock, parse_ts
from gpuwarden.core.model import Instance
from gpuwarden.lifecycle.service import Service
from gpuwarden.lifecycle.supervisor import Supervisor
from gpuwarden.system import logs as glog

# Imported where used, as `gpuwarden run` imports them: while the store opens (supervisor.py).
if TYPE_CHECKING:
    from gpuwarden.fleet.app import App
    from gpuwarden.loops.watchdog import ProbeResult
    from gpuwarden.providers.base import Provider
    from gpuwarden.providers.fake import FakeProvider

PROVIDER = "fake"


class InstantProber:
    """A probe that finds the instance healthy and idle."""

    async def probe(self, inst: Instance, timeout: float) -> ProbeResult:
        from gpuwarden.loops.watchdog import ProbeResult

        await asyncio.sleep(0)
        return ProbeResult()


def _fake_cloud(db: Path, clock: Clock, log_path: Path) -> FakeProvider:
    from gpuwarden.providers.fake import FakeProvider

    fake = FakeProvider(clock, PROVIDER, credit=1e9)
    with sqlite3.connect(db) as conn:
        live = conn.execute(
            "SELECT provider_id, label, provider_started_at FROM instances WHERE provider = ?"
            " AND state IN ('requested', 'provisioning', 'running', 'terminating')"
            " ORDER BY CAST(provider_id AS INTEGER)",
            (PROVIDER,),
        ).fetchall()
    for pid, label, started in live:
        made = fake.spawn(label)
        assert made == pid, f"seeded provider ids must run from 1001 up: {made} != {pid}"
        # Started when the database says, so the reconciler finds nothing to correct.
        at = parse_ts(started)
        if at is not None:
            fake.machines[pid] = replace(fake.machines[pid], launched_at=at)
    out = log_path.open("a", buffering=1)

    def on_destroy(pid: str) -> None:
        out.write(f"{pid} {time.time():.6f}\n")

    fake.on_destroy = on_destroy
    return fake


def main(argv: list[str]) -> int:
    path = Path(argv[0])
    settings = config.load(path)
    glog.configure(level=settings.daemon.log_level)
    state = settings.daemon.state_dir

    def providers(s: Any, clock: Clock, **_: Any) -> dict[str, Provider]:
        return {PROVIDER: _fake_cloud(s.db_path, clock, state / "destroys.log")}

    def services(app: App) -> list[Service]:
        from gpuwarden.lifecycle import wiring
        from gpuwarden.loops.watchdog import Watchdog

        return [
            Watchdog(app, InstantProber()) if s.name == "watchdog" else s
            for s in wiring.build_services(app)
        ]

    sup = Supervisor(settings, path, build_services=services, make_providers=providers)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(sup.run())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
