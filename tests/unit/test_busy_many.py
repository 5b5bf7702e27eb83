"""Busy instances in a fleet with more running jobs than one page of `store.jobs` (1,000):
every instance with a job on it is busy for the guard, or its idle deadline could end it
with the job running."""

from __future__ import annotations

import sqlite3
from datetime import timedelta
from pathlib import Path

from tests.bench.scale_seed import _insert
from tests.conftest import MakeApp

from gpuwarden.config.settings import Settings
from gpuwarden.core.clock import FakeClock
from gpuwarden.core.model import Billing, Instance, InstanceState, Job, JobSpec, JobState
from gpuwarden.fleet.busy import busy_instances, jobs_on_instances
from gpuwarden.store import Store

N = 1_200


async def test_every_instance_with_a_running_job_is_busy(tmp_path: Path, make_app: MakeApp) -> None:
    clock = FakeClock()
    now = clock.now()
    conf = Settings(daemon={"state_dir": str(tmp_path)})
    db = conf.db_path
    await (await Store.open(db, clock)).close()  # the schema
    instances = [
        Instance(
            id=f"i{n:05d}",
            provider="fake",
            label=f"gpuwarden-main-i{n:05d}",
            state=InstanceState.RUNNING,
            price_per_hour=0.5,
            billing=Billing.PER_SECOND,
            created_at=now,
            lease_until=now + timedelta(hours=4),
            last_activity=now,
        )
        for n in range(N)
    ]
    jobs = [
        Job(
            id=f"j{n:05d}",
            state=JobState.RUNNING,
            spec=JobSpec(prompt="p"),
            created_at=now,
            updated_at=now,
            instance_id=f"i{n:05d}",
        )
        for n in range(N)
    ]
    with sqlite3.connect(db) as conn:
        _insert(conn, "instances", instances)
        _insert(conn, "jobs", jobs)
    app = await make_app(conf, clock)
    assert len(await busy_instances(app)) == N
    on = await jobs_on_instances(app)
    assert len(on) == N and on["i01199"] == "j01199"
