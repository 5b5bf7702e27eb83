"""The job queue end to end on the sim cloud: real provider clients over loopback HTTP, real
SSH and SFTP into sim sandboxes, the real runner script, a real Store; short timeouts."""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from jobs_support import (
    Faulty,
    JobEnv,
    Recording,
    env_start,
    job_env,
    job_settings,
    sha256,
)
from tests.conftest import eventually

from gpuwarden.control import jobs as api
from gpuwarden.core import errors
from gpuwarden.core.model import (
    EntityKind,
    Instance,
    InstanceState,
    JobSpec,
    JobState,
    TerminationReason,
)
from gpuwarden.jobs import decisions as queue
from gpuwarden.jobs.runner import Connector, RemoteConn
from gpuwarden.jobs.service import JobService
from gpuwarden.providers.base import Provider

pytestmark = pytest.mark.slow

DONE = {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}


def ledger_entry(env: JobEnv, provider_id: str | None) -> dict[str, Any]:
    [entry] = [e for e in env.sim.ledger()["instances"] if e["instance_id"] == provider_id]
    return dict(entry)


def seconds_between(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


async def test_a_job_runs_end_to_end_and_its_instance_is_destroyed(tmp_path: Path) -> None:
    async with job_env(tmp_path) as env:
        job_id = await env.submit("a red fox in the snow", seed=42, steps=5)
        job = await env.wait_job(job_id, DONE)
        assert job.state is JobState.SUCCEEDED, job.error
        assert job.progress_step == job.progress_total == 5
        # The image is on disk with the sha256 that the runner reported.
        result = json.loads((tmp_path / "out" / job_id / "result.json").read_text())
        assert result["engine"] == "preview" and result["seed"] == 42 and result["steps"] == 5
        [image] = job.outputs
        assert Path(image) == tmp_path / "out" / job_id / "image-0.png"
        assert sha256(Path(image)) == result["files"][0]["sha256"]
        assert Path(image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert job.gpu_seconds > 0 and job.cost > 0
        # keep_warm 0s: destroyed at once with reason job_done.
        assert job.instance_id is not None

        async def ended() -> bool:
            inst = await env.store.get_instance(job.instance_id or "")
            return inst.state is InstanceState.TERMINATED

        await eventually(ended, timeout=10, what="the instance to be terminated")
        inst = await env.store.get_instance(job.instance_id)
        assert inst.reason is TerminationReason.JOB_DONE
        # The sim's ledger billed about boot + job, and the entry is closed.
        entry = ledger_entry(env, inst.provider_id)
        assert not entry["running"], entry
        billed = seconds_between(entry["launched_at"], entry["ended_at"])
        held = (inst.terminated_at - inst.created_at).total_seconds()  # type: ignore[operator]
        cold = (inst.running_at - inst.created_at).total_seconds()  # type: ignore[operator]
        # boot + job + keep-warm (0 here), within the loop's polling slack
        assert job.gpu_seconds <= billed <= held + 0.5
        assert billed <= cold + job.gpu_seconds + 2.0
        # Progress went into job events, rate-limited but ending on the last step.
        events = await env.store.events(kind=EntityKind.JOB, entity_id=job_id)
        progress = [e.details["step"] for e in events if e.name == "progress"]
        assert progress and progress[-1] == 5 and progress == sorted(progress)


async def test_the_next_job_reuses_the_warm_instance_then_it_ends_idle(tmp_path: Path) -> None:
    # The window must outlast the gap between the first job's end and the second one's
    # dispatch, however loaded the machine: this test is about reuse, not about speed.
    settings = job_settings(tmp_path, keep_warm="4s")
    async with job_env(tmp_path, settings=settings) as env:
        first = await env.wait_job(await env.submit("first", seed=1), DONE)
        assert first.state is JobState.SUCCEEDED, first.error
        second = await env.wait_job(await env.submit("second", seed=2), DONE)
        assert second.state is JobState.SUCCEEDED, second.error
        assert second.instance_id == first.instance_id  # no new rental
        assert len(env.sim.ledger()["instances"]) == 1
        assert first.instance_id is not None

        async def ended() -> bool:
            inst = await env.store.get_instance(first.instance_id or "")
            return inst.state is InstanceState.TERMINATED

        await eventually(ended, timeout=10, what="the warm instance to end")
        inst = await env.store.get_instance(first.instance_id)
        assert inst.reason is TerminationReason.IDLE
        # Billed: boot + both jobs + the keep-warm window, and not much more.
        entry = ledger_entry(env, inst.provider_id)
        billed = seconds_between(entry["launched_at"], entry["ended_at"])
        assert second.finished_at is not None
        after_last = (inst.terminated_at - second.finished_at).total_seconds()  # type: ignore[operator]
        assert 4.0 <= after_last <= 4.0 + 3.0
        assert billed <= (inst.terminated_at - inst.created_at).total_seconds() + 0.5  # type: ignore[operator]


async def test_no_capacity_falls_back_to_the_next_offer(tmp_path: Path) -> None:
    faulty: dict[str, Faulty] = {}

    def wrap(providers: dict[str, Provider]) -> dict[str, Provider]:
        for name, p in providers.items():
            faulty[name] = Faulty(p)
        return dict(faulty)  # Faulty forwards everything else to the real client

    async with job_env(tmp_path, wrap=wrap, start=False) as env:
        # The cheapest offer is sold out.
        want = queue.requirements(
            JobSpec(prompt="x"), default_gpu_ram_gb=8.0, min_reliability=0.95, budget_max_price=None
        )
        offers = []
        for p in env.app.providers.values():
            offers += await p.search_offers(want)
        cheapest, runner_up = queue.rank_offers(offers, want)[:2]
        faulty[cheapest.provider].no_capacity.add(cheapest.offer_id)
        await env_start(env, None)
        job = await env.wait_job(await env.submit("fallback"), DONE)
        assert job.state is JobState.SUCCEEDED, job.error
        inst = await env.store.get_instance(job.instance_id or "")
        assert (inst.provider, inst.offer_id) == (runner_up.provider, runner_up.offer_id)
        assert job.attempt == 0  # a refused offer is not a failed attempt
        refused = await env.store.instances([InstanceState.LAUNCH_FAILED])
        assert [i.offer_id for i in refused] == [cheapest.offer_id]


async def test_a_launch_without_ssh_is_ended_and_the_job_retried_elsewhere(tmp_path: Path) -> None:
    dead: set[str] = set()

    @dataclass
    class NoSshOnFirst:
        inner: Connector

        async def connect(self, inst: Instance) -> RemoteConn:
            if not dead:
                dead.add(inst.id)
            if inst.id in dead:
                raise ConnectionRefusedError("sshd never came up")
            return await self.inner.connect(inst)

    # The first instance never answers, so the wait runs out there; the second one must
    # answer within it even on a loaded machine (boot, then an SSH handshake).
    settings = job_settings(tmp_path, ssh_wait="6s")
    async with job_env(tmp_path, settings=settings, connector=NoSshOnFirst) as env:
        job = await env.wait_job(await env.submit("elsewhere"), DONE)
        assert job.state is JobState.SUCCEEDED, job.error
        assert job.attempt == 1
        [bad] = dead
        assert job.instance_id != bad
        failed = await env.store.get_instance(bad)
        assert failed.reason is TerminationReason.LAUNCH_FAILED
        assert failed.offer_id != (await env.store.get_instance(job.instance_id or "")).offer_id

        async def ended() -> bool:
            return (await env.store.get_instance(bad)).state is InstanceState.TERMINATED

        await eventually(ended, timeout=10, what="the instance without SSH to be destroyed")
        assert env.sim.ledger()["running"] <= 1


async def test_an_ssh_drop_mid_job_reattaches_and_finishes_once(tmp_path: Path) -> None:
    recording: list[Recording] = []

    def record(inner: Connector) -> Connector:
        rec = Recording(inner)
        recording.append(rec)
        return rec

    settings = job_settings(tmp_path, preview_step_delay="0.05s")
    async with job_env(tmp_path, settings=settings, connector=record) as env:
        job_id = await env.submit("dropped", steps=30)

        async def running() -> bool:
            return (await env.job(job_id)).progress_step >= 3

        await eventually(running, timeout=15, what="the job to make progress")
        [rec] = recording
        for conn in rec.conns:
            conn.conn.close()  # type: ignore[attr-defined]  # the network goes away
        job = await env.wait_job(job_id, DONE)
        assert job.state is JobState.SUCCEEDED, job.error
        assert len(rec.conns) >= 3  # the ready check, the first session, the reattached one
        inst = await env.store.get_instance(job.instance_id or "")
        box = env.sandbox(inst.provider_id or "") / ".gpuwarden" / "jobs" / job_id
        starts = [ln for ln in (box / "progress.jsonl").read_text().splitlines() if '"start"' in ln]
        assert len(starts) == 1  # the runner ran once
        landed = sorted(p.name for p in (tmp_path / "out" / job_id).iterdir())
        assert landed == ["image-0.png", "result.json"]  # one image, no leftovers


async def test_a_service_restart_mid_job_continues_it_without_a_second_rental(
    tmp_path: Path,
) -> None:
    # 30 steps of 0.2 s: the job is still running when the test, having seen step 3 (the
    # progress it reads lags the runner by a poll), kills the loop, even on a loaded machine.
    settings = job_settings(tmp_path, preview_step_delay="0.2s")
    async with job_env(tmp_path, settings=settings) as env:
        job_id = await env.submit("restart", steps=30)

        async def running() -> bool:
            return (await env.job(job_id)).progress_step >= 3

        await eventually(running, timeout=15, what="the job to make progress")
        # The service dies (its tasks are cancelled, as in a crash of the loop) ...
        for t in env.tasks:
            t.cancel()
        await asyncio.gather(*env.tasks, return_exceptions=True)
        env.tasks.clear()
        assert (await env.job(job_id)).state is JobState.RUNNING
        # ... and a new one picks the job up from the store.
        env.service = JobService(env.app)
        await env_start(env, None)
        job = await env.wait_job(job_id, DONE)
        assert job.state is JobState.SUCCEEDED, job.error
        assert len(env.sim.ledger()["instances"]) == 1  # no second rental
        states = [
            e.to_state
            for e in await env.store.events(kind=EntityKind.JOB, entity_id=job_id)
            if e.name == "state"
        ]
        assert states.count("succeeded") == 1 and states[-1] == "succeeded"


PWNED_PROMPTS = [
    "'; touch pwned; '",
    "$(touch pwned)",
    "".join(chr(c) for c in range(0x4E00, 0x4E00 + 9_990)) + "🦊\"'`$(x)\\n",
]


async def test_hostile_prompts_reach_the_runner_unchanged_and_run_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert len(PWNED_PROMPTS[2]) >= 10_000
    settings = job_settings(tmp_path, max_instances=3)
    async with job_env(tmp_path, settings=settings) as env:
        ids = [await env.submit(p, steps=1) for p in PWNED_PROMPTS]
        for job_id, prompt in zip(ids, PWNED_PROMPTS, strict=True):
            job = await env.wait_job(job_id, DONE)
            assert job.state is JobState.SUCCEEDED, job.error
            assert job.spec.prompt == prompt
            result = json.loads((tmp_path / "out" / job_id / "result.json").read_text())
            assert result["prompt_sha256"] == hashlib.sha256(prompt.encode()).hexdigest()
            inst = await env.store.get_instance(job.instance_id or "")
            spec = (
                env.sandbox(inst.provider_id or "") / ".gpuwarden" / "jobs" / job_id / "spec.json"
            )
            assert json.loads(spec.read_text())["prompt"] == prompt
    found = [p for p in tmp_path.rglob("*pwned*")] + [p for p in Path.cwd().glob("*pwned*")]
    assert found == []


async def test_cancel_while_queued_launches_nothing(tmp_path: Path) -> None:
    async with job_env(tmp_path) as env:
        await api.pause(env.app, by="test")
        job_id = await env.submit("never")
        assert (await env.job(job_id)).state is JobState.QUEUED
        out = await api.cancel(env.app, job_id, by="test")
        assert out["state"] == "cancelled"
        await api.resume(env.app, by="test")
        job = await env.job(job_id)
        assert job.state is JobState.CANCELLED
        assert env.sim.ledger()["instances"] == []
        with pytest.raises(errors.InvalidState):
            await api.cancel(env.app, job_id, by="test")


async def test_cancel_while_running_kills_the_remote_process(tmp_path: Path) -> None:
    settings = job_settings(tmp_path, preview_step_delay="0.05s")
    async with job_env(tmp_path, settings=settings) as env:
        job_id = await env.submit("stop me", steps=400)

        async def running() -> bool:
            return (await env.job(job_id)).progress_step >= 2

        await eventually(running, timeout=15, what="the job to make progress")
        job = await env.job(job_id)
        inst = await env.store.get_instance(job.instance_id or "")
        box = env.sandbox(inst.provider_id or "") / ".gpuwarden" / "jobs" / job_id
        pid = int((box / "pid").read_text())
        out = await api.cancel(env.app, job_id, by="test")
        assert out["cancel_requested"] is True
        job = await env.wait_job(job_id, DONE)
        assert job.state is JobState.CANCELLED
        assert job.outputs == ()
        assert not (tmp_path / "out" / job_id / "image-0.png").exists()

        async def gone() -> bool:
            return not Path(f"/proc/{pid}").exists() or _zombie(pid)

        await eventually(gone, timeout=10, what="the runner process to be killed")

        async def ended() -> bool:
            return (await env.store.get_instance(inst.id)).state is InstanceState.TERMINATED

        await eventually(ended, timeout=10, what="the instance to follow the after-job rule")
        assert (await env.store.get_instance(inst.id)).reason is TerminationReason.JOB_DONE


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except OSError:
        return True
