"""Spot jobs end to end on the sim cloud: real Vast client, real SSH, the real runner, the
guard and the reconciler running. A job on a spot instance that is outbid mid-run is run
again on another instance and produces its image once; the outbid instance is destroyed
(the sim's ledger) and recorded `preempted`; `--no-spot` never bids; a bid stays within the
job's max price."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from jobs_support import JobEnv, job_env, job_settings
from tests.conftest import eventually

from gpuwarden.config.settings import Settings
from gpuwarden.control import instances
from gpuwarden.core.model import EntityKind, InstanceState, JobState, TerminationReason
from gpuwarden.loops.reconciler import Reconciler

pytestmark = pytest.mark.slow

DONE = {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}


def spot_settings(tmp: Path, **jobs: Any) -> Settings:
    base = job_settings(tmp, **jobs)
    policy = base.policy.model_copy(update={"poll_interval": timedelta(seconds=1)})
    return base.model_copy(update={"policy": policy})


def ledger(env: JobEnv, provider_id: str | None) -> dict[str, Any]:
    [entry] = [e for e in env.sim.ledger()["instances"] if e["instance_id"] == provider_id]
    return dict(entry)


def start_reconciler(env: JobEnv) -> None:
    env.tasks.append(asyncio.create_task(Reconciler(env.app).run(), name="reconciler"))


async def outbid(env: JobEnv, provider_id: str) -> None:
    assert env.sim.urls is not None
    async with httpx.AsyncClient(base_url=env.sim.urls.admin) as http:
        reply = await http.post(f"/_sim/instances/{provider_id}/outbid")
        reply.raise_for_status()


async def test_an_outbid_job_runs_again_elsewhere_and_makes_its_image_once(
    tmp_path: Path,
) -> None:
    settings = spot_settings(tmp_path, preview_step_delay="0.1s", max_attempts=1)
    async with job_env(tmp_path, settings=settings) as env:
        start_reconciler(env)
        job_id = await env.submit("a harbour at night", steps=30, seed=5)

        async def midway() -> bool:
            job = await env.job(job_id)
            return job.state is JobState.RUNNING and job.progress_step >= 3

        await eventually(midway, timeout=20, what="the job to be a few steps in")
        first = await env.store.get_instance((await env.job(job_id)).instance_id or "")
        assert first.provider == "sim-vast" and first.extra["spot"]["bid"] > 0
        await outbid(env, first.provider_id or "")

        job = await env.wait_job(job_id, DONE, timeout=40)
        assert job.state is JobState.SUCCEEDED, job.error
        # One more attempt, which max_attempts = 1 did not refuse: a preemption is no fault.
        assert job.attempt == 1 and job.extra["preemptions"] == 1
        assert job.instance_id != first.id
        # The image is produced once: one file, from the second instance's run.
        [image] = job.outputs
        assert sorted(p.name for p in (tmp_path / "out" / job_id).glob("*.png")) == [
            Path(image).name
        ]
        events = await env.store.events(kind=EntityKind.JOB, entity_id=job_id)
        retries = [e for e in events if e.reason == "retry"]
        assert [e.details["preempted"] for e in retries] == [True]

        async def first_ended() -> bool:
            inst = await env.store.get_instance(first.id)
            return inst.state is InstanceState.TERMINATED

        await eventually(first_ended, timeout=10, what="the outbid instance to be terminated")
        ended = await env.store.get_instance(first.id)
        assert ended.reason is TerminationReason.PREEMPTED
        # The sim's ledger: stopped when outbid, then destroyed through the API.
        entry = ledger(env, first.provider_id)
        assert entry["spot"] and entry["stopped_at"] and not entry["running"]
        assert entry["ended_by"] == "api:account"
        second = await env.store.get_instance(job.instance_id or "")
        assert second.extra["spot"]["bid"] > 0  # still on spot: one preemption of three
        # costs: the preemption's re-run time, and what spot saved on what has ended
        spot = (await instances.costs(env.app))["spot"]
        assert spot["preemptions"] == 1 and spot["instances"] >= 1
        assert 0 < spot["rerun_s"] <= (ended.terminated_at - ended.created_at).total_seconds()  # type: ignore[operator]
        assert spot["saved"] > 0 and spot["paid"] < spot["on_demand"]


async def test_a_no_spot_job_never_bids(tmp_path: Path) -> None:
    async with job_env(tmp_path, settings=spot_settings(tmp_path)) as env:
        job_id = await env.submit("a lighthouse", steps=2, spot=False)
        job = await env.wait_job(job_id, DONE)
        assert job.state is JobState.SUCCEEDED, job.error
        inst = await env.store.get_instance(job.instance_id or "")
        assert "spot" not in inst.extra and job.extra["offer"]["spot"] is False
        assert all(not e["spot"] for e in env.sim.ledger()["instances"])
        assert all(i.details["bid"] is None for i in env.sim.core.of_kind("vast"))


async def test_a_bid_never_exceeds_the_jobs_max_price(tmp_path: Path) -> None:
    # The cheapest spot machine (a V100: min bid 0.0495/h) at x1.2 would cost more than 0.057
    # with its storage: the bid is lowered to fit, and what the sim bills stays within it.
    cap = 0.057
    async with job_env(tmp_path, settings=spot_settings(tmp_path)) as env:
        job_id = await env.submit("a fox", steps=2, max_price=cap)
        job = await env.wait_job(job_id, DONE)
        assert job.state is JobState.SUCCEEDED, job.error
        inst = await env.store.get_instance(job.instance_id or "")
        bid = inst.extra["spot"]["bid"]
        assert inst.extra["spot"]["min_bid"] <= bid < inst.extra["spot"]["min_bid"] * 1.2
        [rented] = env.sim.core.of_kind("vast")
        assert rented.details["bid"] == pytest.approx(bid)
        assert ledger(env, inst.provider_id)["price_per_hour"] <= cap
        assert inst.price_per_hour <= cap
