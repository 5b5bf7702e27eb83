"""The keep-warm replay (tests/bench/keepwarm_replay.py) checked against the daemon on the sim
cloud, scaled down: a bursty trace of two sessions with the boot delay and the job time
divided by SCALE, submitted in real time to the real jobs loop (keep_warm "auto", the
weighing dispatcher, real SSH into sim instances). The replay, fed the cold start and job
length the daemon measured, must make the same number of rentals and bill about the same
seconds (the daemon's SSH and polling add a little to every job)."""

from __future__ import annotations

import asyncio
import statistics
from datetime import timedelta
from pathlib import Path

import pytest
from jobs_support import job_env, job_settings
from tests.bench.keepwarm_replay import Policy, replay
from tests.conftest import eventually

from gpuwarden.core.model import JobState

pytestmark = pytest.mark.slow

SCALE = 30.0  # trace seconds per real second
BOOT_S = 180.0 / SCALE  # a 3-minute cold start
STEPS, STEP_S = 4, 0.5  # about 60 trace seconds of preview per job
# Two sessions of a bursty day, in trace seconds (jobs 1.5 to 2.5 min apart, 25 min between).
# The second job comes after the first one ended: until a job has run, the daemon expects the
# default job length (60 s, which this scale does not divide), so a job queued behind a
# booting instance then would make it rent where the replay, which knows the length, waits.
TRACE = [0.0, 330.0, 420.0, 530.0, 590.0, 730.0, 2230.0, 2320.0, 2410.0]
BILLED_TOLERANCE = 0.2  # seen: 50 s against 48 s


async def test_the_daemon_on_the_sim_rents_and_bills_as_the_replay_says(tmp_path: Path) -> None:
    settings = job_settings(
        tmp_path,
        keep_warm="auto",
        max_instances=2,
        steps=STEPS,
        preview_step_delay=f"{STEP_S}s",
        ssh_wait="60s",
    )
    sim = settings.providers.sim.model_copy(update={"boot_delay": timedelta(seconds=BOOT_S)})
    settings = settings.model_copy(
        update={"providers": settings.providers.model_copy(update={"sim": sim})}
    )
    arrivals = [t / SCALE for t in TRACE]
    async with job_env(tmp_path, settings=settings) as env:
        loop = asyncio.get_running_loop()
        start = loop.time()
        ids: list[str] = []
        for at in arrivals:
            # The trace's arrival times, in real time: this paces the input, it waits for
            # nothing the daemon does.
            await asyncio.sleep(max(0.0, start + at - loop.time()))
            ids.append(await env.submit(f"job {len(ids)}", steps=STEPS))
        jobs = [
            await env.wait_job(j, {JobState.SUCCEEDED, JobState.FAILED}, timeout=60) for j in ids
        ]
        assert all(j.state is JobState.SUCCEEDED for j in jobs), [j.error for j in jobs]

        async def all_ended() -> bool:
            return not any(e["running"] for e in env.sim.ledger()["instances"])

        await eventually(all_ended, timeout=60, what="the instances to end after their windows")
        ledger = env.sim.ledger()["instances"]
        inst = await env.store.get_instance(jobs[0].instance_id or "")
        stats = await env.store.get_flag(f"jobs.cold_start:{inst.provider}:{inst.gpu}")
    job_s = statistics.mean(
        (j.finished_at - j.started_at).total_seconds()  # type: ignore[operator]
        for j in jobs
    )
    cold_s = float(stats["mean"])  # the daemon's estimate: launch to SSH answering
    said = replay(arrivals, job_s=job_s, cold_s=cold_s, policy=Policy("auto", None))
    billed = sum(float(e["billed_seconds"]) for e in ledger)
    print(
        f"\nsim: {len(ledger)} rentals, {billed:.1f} s billed; replay (cold {cold_s:.1f} s,"
        f" job {job_s:.1f} s): {said.launches} rentals, {said.billed:.1f} s billed"
    )
    assert len(ledger) == said.launches
    assert abs(billed - said.billed) <= BILLED_TOLERANCE * said.billed
