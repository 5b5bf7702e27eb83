"""The JobService's decisions with fakes all round: FakeProvider offers, a fake launch and end,
the FakeConnector as the instances, a real Store and a FakeClock that the tests step."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from jobs_fakes import FakeConnector, add_instance, add_job, settings
from tests.conftest import MakeApp

from gpuwarden.control import instances as views
from gpuwarden.control import jobs as api
from gpuwarden.core import policy
from gpuwarden.core.clock import FakeClock
from gpuwarden.core.model import (
    EntityKind,
    Instance,
    InstanceState,
    JobState,
    TerminationReason,
    instance_label,
)
from gpuwarden.fleet.app import App
from gpuwarden.fleet.limits import limits_from
from gpuwarden.jobs.service import JobService
from gpuwarden.providers.base import Offer
from gpuwarden.providers.fake import FakeProvider


@dataclass
class Cloud:
    """The fake launch and end paths, recording what they were asked."""

    provider: FakeProvider
    launches: list[str] = field(default_factory=list)  # offer ids
    ends: list[tuple[str, TerminationReason]] = field(default_factory=list)
    ended_at: dict[str, float] = field(default_factory=dict)
    ended_when: dict[str, datetime] = field(default_factory=dict)
    peak: int = 0  # the most instances rented at once

    async def launch(self, app: App, offer: Offer, job_id: str | None) -> Instance:
        self.launches.append(offer.offer_id)
        self.peak = max(self.peak, len(self.launches) - len(self.ends))
        iid = f"i{len(self.launches)}"
        now = app.clock.now()
        inst = Instance(
            id=iid,
            provider=offer.provider,
            label=instance_label("main", iid),
            state=InstanceState.REQUESTED,
            created_at=now,
            lease_until=now + timedelta(hours=4),
            last_activity=now,
            price_per_hour=offer.price_per_hour,
            gpu=offer.gpu_name,
            offer_id=offer.offer_id,
            job_id=job_id,
        )
        await app.store.insert_instance(inst)
        launched = await self.provider.launch(offer, _spec(inst.label))
        return await app.store.transition_instance(
            iid, InstanceState.PROVISIONING, provider_id=launched.provider_id
        )

    async def end(self, app: App, instance_id: str, reason: TerminationReason) -> None:
        self.ends.append((instance_id, reason))
        self.ended_at[instance_id] = app.clock.monotonic()
        self.ended_when[instance_id] = app.clock.now()
        await app.store.transition_instance(instance_id, InstanceState.TERMINATING, reason=reason)
        await app.store.transition_instance(instance_id, InstanceState.TERMINATED)


def _spec(label: str) -> Any:
    from gpuwarden.providers.base import LaunchSpec

    return LaunchSpec(label=label, image="img")


@dataclass
class Env:
    app: App
    clock: FakeClock
    cloud: Cloud
    connector: FakeConnector
    service: JobService
    task: asyncio.Task[None] | None = None

    async def until(self, cond: Callable[[], Awaitable[bool]], limit: float = 3600) -> None:
        """Step the fake clock from wake-up to wake-up until `cond` holds (or `limit` fake
        seconds pass); wait briefly on the database thread in between."""
        start = self.clock.monotonic()
        async with asyncio.timeout(30):
            while not await cond():
                if self.task is not None and self.task.done():
                    self.task.result()
                    raise AssertionError("the service stopped")
                assert self.clock.monotonic() - start <= limit, "condition not reached in time"
                wake = self.clock.next_wake()
                await _settle(self)
                if wake is not None:
                    await self.clock.advance(max(0.0, (wake - self.clock.now()).total_seconds()))
                else:
                    await asyncio.sleep(0.005)

    async def state(self, job_id: str) -> JobState:
        return (await self.app.store.get_job(job_id)).state


async def _settle(env: Env) -> None:
    """Let pending database work land before time moves. A few loop turns were not enough on
    a loaded machine: the store's thread was still writing (a job's end, a rental) when the
    clock stepped on, and the service decided on a stale view (a second rental, an instance
    ended before the waiting job took it). `writes_done` waits for every write queued before
    it; a few rounds let chains of writes land too."""
    for _ in range(4):
        await env.app.store.writes_done()
        for _ in range(5):
            await asyncio.sleep(0)


@pytest.fixture
async def make_env(
    tmp_path: Path, make_app: MakeApp
) -> AsyncIterator[Callable[..., Awaitable[Env]]]:
    envs: list[Env] = []

    async def make(*, start: bool = True, **jobs: Any) -> Env:
        clock = FakeClock()
        app = await make_app(settings(tmp_path, **{"ssh_wait": "120s", **jobs}), clock)
        provider = FakeProvider(clock, "fake", boot_delay=timedelta(seconds=60))
        app.providers["fake"] = provider
        cloud = Cloud(provider)
        connector = FakeConnector()
        service = JobService(app, connector=connector, launch=cloud.launch, end=cloud.end)
        env = Env(app, clock, cloud, connector, service)
        envs.append(env)
        if start:
            await service.start()
            env.task = asyncio.create_task(service.run())
        return env

    yield make
    for env in envs:
        env.app.stopping.set()
        if env.task is not None:
            env.task.cancel()
            await asyncio.gather(env.task, return_exceptions=True)
        await env.app.store.close()


async def submit(env: Env, prompt: str = "a fox", **kw: Any) -> str:
    return str((await api.submit(env.app, prompt=prompt, steps=2, by="test", **kw))["id"])


async def test_auto_keep_warm_without_history_is_the_ski_rental_window_then_idle(
    make_env: Any,
) -> None:
    env: Env = await make_env(keep_warm="auto")
    job_id = await submit(env)

    async def done() -> bool:
        return (await env.state(job_id)) is JobState.SUCCEEDED

    await env.until(done)
    job = await env.app.store.get_job(job_id)
    inst = await env.app.store.get_instance(job.instance_id or "")
    # The window counts from the job's recorded end: the test notices the end only after
    # `until` has stepped the clock on, so the clock at that moment would be late.
    assert job.finished_at is not None

    async def ended() -> bool:
        return bool(env.cloud.ends)

    await env.until(ended)
    assert env.cloud.ends == [(inst.id, TerminationReason.IDLE)]
    # The cold start (launch to SSH) was the provider's 60 s boot. With no idle gap seen yet
    # the window is half the ski-rental one: half of what a cold start costs billed and
    # waited through (wait_weight 1), so one cold start.
    stats = await env.app.store.get_flag("jobs.cold_start:fake:RTX 4090")
    assert stats["n"] == 1 and 60 <= stats["mean"] <= 75
    warm_for = (env.cloud.ended_when[inst.id] - job.finished_at).total_seconds()
    assert stats["mean"] - 2 <= warm_for <= stats["mean"] + 2


async def test_a_waiting_job_reuses_the_instance_and_0s_ends_at_once(make_env: Any) -> None:
    env: Env = await make_env(keep_warm="0s", max_instances=1)
    first, second = await submit(env, "one"), await submit(env, "two")

    async def both_done() -> bool:
        return {await env.state(first), await env.state(second)} == {JobState.SUCCEEDED}

    await env.until(both_done)
    assert env.cloud.launches == ["fake-offer-1"]  # one rental for both
    j1, j2 = env.app.store.get_job(first), env.app.store.get_job(second)
    assert (await j1).instance_id == (await j2).instance_id

    async def ended() -> bool:
        return bool(env.cloud.ends)

    await env.until(ended, limit=5)
    assert env.cloud.ends == [("i1", TerminationReason.JOB_DONE)]


async def test_at_most_max_instances_are_rented(make_env: Any) -> None:
    env: Env = await make_env(keep_warm="0s", max_instances=2)
    ids = [await submit(env, f"job {i}", gpu_ram_gb=float(i)) for i in range(3)]

    async def all_done() -> bool:
        return all([await env.state(j) is JobState.SUCCEEDED for j in ids])

    await env.until(all_done)
    # Three jobs, never more than two instances at once (the third waited for capacity or
    # reused a finished instance); how the third got its GPU depends on timing.
    assert env.cloud.peak == 2
    assert 2 <= len(env.cloud.launches) <= 3


async def test_a_paused_queue_accepts_but_does_not_dispatch(make_env: Any) -> None:
    env: Env = await make_env()
    await api.pause(env.app, by="test")
    out = await api.submit(env.app, prompt="later", by="test")
    assert out["queue_paused"] is True and out["state"] == "queued"
    await env.clock.advance(60)
    assert env.cloud.launches == []
    await api.resume(env.app, by="test")

    async def launched() -> bool:
        return bool(env.cloud.launches)

    await env.until(launched, limit=10)


async def test_no_ssh_within_ssh_wait_ends_the_instance_and_retries(make_env: Any) -> None:
    env: Env = await make_env(ssh_wait="90s", max_attempts=2)
    env.connector.remote("i1").refuse = True
    env.connector.remote("i2").refuse = True
    job_id = await submit(env)

    async def failed() -> bool:
        return (await env.state(job_id)) is JobState.FAILED

    await env.until(failed)
    assert env.cloud.ends == [
        ("i1", TerminationReason.LAUNCH_FAILED),
        ("i2", TerminationReason.LAUNCH_FAILED),
    ]
    # The retry avoided the offer that failed.
    assert env.cloud.launches[0] != env.cloud.launches[1]
    job = await env.app.store.get_job(job_id)
    assert job.attempt == 1 and "after 2 attempts" in (job.error or "")


async def test_restart_requeues_a_job_whose_instance_is_gone(make_env: Any) -> None:
    env: Env = await make_env(start=False, max_attempts=2)
    gone = await add_instance(env.app, "i9", state=InstanceState.RUNNING)
    await env.app.store.transition_instance(
        gone.id, InstanceState.TERMINATING, reason=TerminationReason.WATCHDOG
    )
    again = await add_job(env.app, "ja", JobState.RUNNING, instance_id=gone.id)
    spent = await add_job(env.app, "jb", JobState.FETCHING, instance_id=gone.id, attempt=1)
    await env.service.start()
    job = await env.app.store.get_job(again.id)
    assert (job.state, job.attempt, job.instance_id) == (JobState.QUEUED, 1, None)
    assert (await env.app.store.get_job(spent.id)).state is JobState.FAILED


async def test_restart_continues_a_job_on_its_live_instance(make_env: Any) -> None:
    env: Env = await make_env(start=False)
    inst = await add_instance(env.app, "i7", provider="fake")
    job = await add_job(env.app, "jc", JobState.RUNNING, instance_id=inst.id)
    await env.service.start()
    env.task = asyncio.create_task(env.service.run())

    async def done() -> bool:
        return (await env.state(job.id)) is JobState.SUCCEEDED

    await env.until(done)
    assert env.cloud.launches == []  # no second rental
    assert env.connector.remote(inst.id).starts == 1


async def test_the_idle_timer_counts_from_the_end_of_the_job(make_env: Any) -> None:
    """The runner touches last_activity at most every 30 s here (idle_timeout 30 m / 4, at
    most 30 s), and not while it fetches; a 40-step job (40 s or more) ends after its last
    touch. The job's end, not that touch (nor the launch), is where the idle deadline counts
    from."""
    env: Env = await make_env(keep_warm="1h")
    job_id = str((await api.submit(env.app, prompt="slow", steps=40, by="test"))["id"])

    async def done() -> bool:
        return (await env.state(job_id)) is JobState.SUCCEEDED

    await env.until(done)
    job = await env.app.store.get_job(job_id)
    assert job.started_at is not None and job.finished_at is not None
    assert (job.finished_at - job.started_at).total_seconds() >= 35  # outlived a touch period

    async def moved() -> bool:
        inst = await env.app.store.get_instance(job.instance_id or "")
        return inst.last_activity == job.finished_at

    await env.until(moved, limit=5)
    inst = await env.app.store.get_instance(job.instance_id or "")
    limits = limits_from(env.app.settings)
    idle_at = policy.idle_deadline(inst, policy.Observations(), limits, env.clock.now())
    assert idle_at == job.finished_at + timedelta(minutes=30)


async def test_a_job_cancelled_while_its_instance_booted_counts_from_the_cancel(
    make_env: Any,
) -> None:
    """No runner ever touched this instance: without the move at the job's end its idle
    deadline would count from the launch."""
    env: Env = await make_env(keep_warm="1h")
    job_id = await submit(env)

    async def launched() -> bool:
        return bool(env.cloud.launches)

    await env.until(launched, limit=10)
    await env.clock.advance(20)  # the instance boots for 60 s
    await api.cancel(env.app, id=job_id, by="test")
    job = await env.app.store.get_job(job_id)
    assert job.state is JobState.CANCELLED and job.finished_at is not None

    async def moved() -> bool:
        inst = await env.app.store.get_instance("i1")
        return inst.last_activity == job.finished_at

    await env.until(moved, limit=120)
    inst = await env.app.store.get_instance("i1")
    assert inst.created_at < job.finished_at  # not the launch time any more
    [ev] = [e for e in await env.app.store.events(entity_id="i1") if e.name == "activity"]
    assert ev.details == {"job_id": job_id, "job_state": "cancelled", "by": "job_end"}


async def _second_job_during_the_first_boot(env: Env, after_s: float) -> tuple[str, str]:
    """Submit A; `after_s` seconds after its rental, B; run until both succeeded."""
    first = await submit(env, "one")

    async def launched() -> bool:
        return bool(env.cloud.launches)

    await env.until(launched, limit=5)
    await env.clock.advance(after_s)
    second = await submit(env, "two")

    async def both_done() -> bool:
        return {await env.state(first), await env.state(second)} == {JobState.SUCCEEDED}

    await env.until(both_done)
    return first, second


@pytest.mark.parametrize(("wait_weight", "launches"), [(1.0, 1), (10.0, 2)])
async def test_a_job_arriving_while_the_only_instance_boots_waits_or_rents(
    make_env: Any, wait_weight: float, launches: int
) -> None:
    # Room for two instances. B comes 20 s into A's boot: A's instance is free for B in about
    # 180 - 20 + 60 = 220 s (the assumed cold start, the boot so far, a job). At weight 1
    # that is cheaper than a cold start billed and waited through (360): B waits. At weight
    # 10 waiting costs 2,200 against 1,980 for a rental: B rents.
    env: Env = await make_env(keep_warm="0s", max_instances=2, wait_weight=wait_weight)
    first, second = await _second_job_during_the_first_boot(env, 20)
    assert len(env.cloud.launches) == launches
    j1, j2 = await env.app.store.get_job(first), await env.app.store.get_job(second)
    assert (j1.instance_id == j2.instance_id) is (launches == 1)


async def test_a_job_waiting_on_a_launch_that_fails_gets_the_next_instance(
    make_env: Any,
) -> None:
    # B waits behind A's booting instance, whose SSH never answers: when that instance is
    # ended, neither job is left waiting for it. The wasted boot is kept towards the next
    # cold start of that provider and GPU.
    env: Env = await make_env(ssh_wait="90s", max_attempts=2, max_instances=2, keep_warm="0s")
    env.connector.remote("i1").refuse = True
    first, second = await _second_job_during_the_first_boot(env, 10)
    assert env.cloud.ends[0] == ("i1", TerminationReason.LAUNCH_FAILED)
    assert len(env.cloud.launches) == 2  # i1 (failed) and i2, which ran both jobs
    j1, j2 = await env.app.store.get_job(first), await env.app.store.get_job(second)
    assert j1.instance_id == j2.instance_id == "i2"
    # The retry rented another offer (another GPU); i1's wasted boot waits for the next
    # successful launch of its own kind.
    i1 = await env.app.store.get_instance("i1")
    stats = await env.app.store.get_flag(f"jobs.cold_start:fake:{i1.gpu}")
    # From launch to the timeout: jobs.ssh_wait (90 s) and the polls around it.
    assert stats["n"] == 0 and 90 <= stats["pending"] <= 105


async def test_the_first_jobs_setup_counts_in_the_cold_start(make_env: Any) -> None:
    # The new machine's first job spends 90 s installing the engine and 40 s downloading the
    # model; the second finds both there.
    env: Env = await make_env(keep_warm="10m", max_instances=1)
    env.connector.setup_s = 90.0
    env.connector.download_s = 40.0
    first = await submit(env, "one")

    async def first_done() -> bool:
        return await env.state(first) is JobState.SUCCEEDED

    await env.until(first_done)
    second = await submit(env, "two")  # the warm instance takes it

    async def second_done() -> bool:
        return await env.state(second) is JobState.SUCCEEDED

    await env.until(second_done)
    assert env.cloud.launches == ["fake-offer-1"]
    jobs = [await env.app.store.get_job(j) for j in (first, second)]
    assert [(j.extra["setup_s"], j.extra["download_s"]) for j in jobs] == [(90.0, 40.0), (0, 0)]
    # Boot (the provider's 60 s, and the polls around it) plus the setup and the download,
    # counted once.
    stats = await env.app.store.get_flag("jobs.cold_start:fake:RTX 4090")
    assert stats["n"] == 1 and 190 <= stats["mean"] <= 205
    events = await env.app.store.events(kind=EntityKind.INSTANCE, entity_id="i1")
    assert [e.details["setup_s"] for e in events if e.name == "cold_start_setup"] == [130.0]


async def test_costs_show_what_keep_warm_billed_and_the_waiting_it_saved(make_env: Any) -> None:
    env: Env = await make_env(keep_warm="10m", max_instances=1)
    first = await submit(env, "one")

    async def done(job_id: str) -> bool:
        return await env.state(job_id) is JobState.SUCCEEDED

    await env.until(lambda: done(first))
    await env.clock.advance(100)  # warm and idle for 100 s
    second = await submit(env, "two")  # takes the warm instance: no cold start waited
    await env.until(lambda: done(second))
    assert env.cloud.launches == ["fake-offer-1"]

    async def ended() -> bool:
        return bool(env.cloud.ends)

    await env.until(ended, limit=900)  # the window passes: it ends idle
    events = await env.app.store.events(kind=EntityKind.INSTANCE, name="warm_idle")
    reused, expired = (e.details for e in events)
    cold = (await env.app.store.get_flag("jobs.cold_start:fake:RTX 4090"))["mean"]
    assert reused["job_id"] == second and 100 <= reused["idle_s"] <= 110
    assert reused["saved_wait_s"] == cold  # the cold start it would have waited through
    assert expired["job_id"] is None and expired["saved_wait_s"] == 0.0
    assert 600 <= expired["idle_s"] <= 610
    price = (await env.app.store.get_instance("i1")).price_per_hour
    assert reused["cost"] == pytest.approx(price * reused["idle_s"] / 3600, abs=1e-6)

    shown = await views.costs(env.app)
    [today] = shown["days"]
    assert today["warm_idle"] == pytest.approx(reused["cost"] + expired["cost"], abs=1e-6)
    assert today["wait_saved_s"] == cold and today["warm_reuses"] == 1
    assert shown["warm_idle"] == today["warm_idle"] and shown["wait_saved_s"] == cold


async def test_a_warm_schedule_keeps_the_instance_until_its_window_closes(make_env: Any) -> None:
    # The clock starts at 2026-01-01 00:00 UTC; the window is open until 06:00. With a
    # keep-warm window of 0 the instance would end with its job; the schedule keeps it.
    schedule = [{"days": "daily", "hours": "00:00-06:00", "timezone": "UTC", "min_warm": 1}]
    env: Env = await make_env(keep_warm="0s", max_instances=1, warm_schedule=schedule)
    first = await submit(env, "one")

    async def done() -> bool:
        return await env.state(first) is JobState.SUCCEEDED

    await env.until(done)
    await _settle(env)
    assert env.cloud.ends == []

    closes = datetime(2026, 1, 1, 6, 0, tzinfo=UTC)
    await env.clock.advance((closes - env.clock.now()).total_seconds() - 1)
    await _settle(env)
    assert env.cloud.ends == []  # still warm a second before the window closes

    async def ended() -> bool:
        return bool(env.cloud.ends)

    await env.until(ended, limit=120)
    assert env.cloud.ends == [("i1", TerminationReason.IDLE)]
    assert env.cloud.ended_when["i1"] >= closes
