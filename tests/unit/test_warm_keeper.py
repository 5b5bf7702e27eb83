"""jobs.warm_schedule in the jobs loop, on the fake cloud and a FakeClock: rentals when a
window opens and when a kept instance is lost, a budget refusal holding them, and a warm
instance rolled over to a fresh one before its lease ends it; after a restart, the
schedule's warm instance is held again."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any

from jobs_fakes import add_instance
from test_jobs_service import Env, make_env, submit  # noqa: F401

from gpuwarden.core import errors
from gpuwarden.core.model import Instance, InstanceState, JobState, TerminationReason
from gpuwarden.fleet.app import App
from gpuwarden.jobs.warm_keeper import HOLD
from gpuwarden.providers.base import Offer

# The FakeClock starts on Thursday 2026-01-01 00:00 UTC.
OPENS_AT_0010 = {"days": "daily", "hours": "00:10-24:00", "min_warm": 2, "gpu": "4090"}
ALL_DAY = {"days": "daily", "hours": "00:00-24:00", "min_warm": 1}


async def warm_ids(env: Env) -> set[str]:
    live = await env.app.store.live_instances()
    running = {i.id for i in live if i.state is InstanceState.RUNNING}
    return set(env.service._warm.ids()) & running


async def test_the_window_opening_rents_min_warm_and_a_lost_one_is_rented_again(
    make_env: Any,  # noqa: F811
) -> None:
    env: Env = await make_env(warm_schedule=[OPENS_AT_0010], max_instances=3)
    opens = env.clock.now() + timedelta(minutes=10)

    async def two_warm() -> bool:
        return len(await warm_ids(env)) == 2

    await env.until(two_warm, limit=1800)
    assert len(env.cloud.launches) == 2
    rented = [await env.app.store.get_instance(i) for i in sorted(await warm_ids(env))]
    assert all(i.created_at >= opens for i in rented)  # nothing before the window opened
    assert all(i.job_id is None and "4090" in i.gpu for i in rented)  # no job, its class
    # Warm until the window closes (midnight), not for the adaptive window.
    until = {w.until for w in env.service._warm._warm.values()}
    assert until == {datetime(2026, 1, 2, tzinfo=opens.tzinfo)}

    # One is lost (ended outside the jobs loop): the schedule rents a third.
    await env.cloud.end(env.app, rented[0].id, TerminationReason.MANUAL)
    env.app.jobs_wake.set()

    async def back_to_two() -> bool:
        return len(env.cloud.launches) == 3 and len(await warm_ids(env)) == 2

    await env.until(back_to_two, limit=600)

    # A job takes a kept instance (no new rental for it) and it is warm again after.
    job_id = await submit(env)

    async def done() -> bool:
        return (await env.state(job_id)) is JobState.SUCCEEDED

    await env.until(done)
    assert len(env.cloud.launches) == 3


async def test_a_budget_refusal_holds_schedule_rentals(make_env: Any) -> None:  # noqa: F811
    env: Env = await make_env(warm_schedule=[ALL_DAY], start=False)
    tries: list[datetime] = []
    real = env.cloud.launch

    async def refuse_first(app: App, offer: Offer, job_id: str | None) -> Instance:
        tries.append(app.clock.now())
        if len(tries) == 1:
            raise errors.BudgetExceeded("daily limit reached")
        return await real(app, offer, job_id)

    env.service._launch_fn = refuse_first
    await env.service.start()
    env.task = asyncio.create_task(env.service.run())

    async def warm_one() -> bool:
        return len(await warm_ids(env)) == 1

    await env.until(warm_one, limit=1800)
    assert len(tries) == 2
    assert tries[1] - tries[0] >= HOLD  # not retried before the hold passed
    assert tries[1] - tries[0] < HOLD + timedelta(seconds=10)


async def test_a_warm_instance_is_rolled_over_before_its_lease_ends(
    make_env: Any,  # noqa: F811
) -> None:
    env: Env = await make_env(warm_schedule=[ALL_DAY])

    async def warm_one() -> bool:
        return len(await warm_ids(env)) == 1

    await env.until(warm_one, limit=600)
    [old] = await warm_ids(env)
    ends = env.clock.now() + timedelta(minutes=20)
    await env.app.store.update_instance(old, lease_until=ends)

    async def rolled() -> bool:
        return any(iid == old for iid, _ in env.cloud.ends)

    await env.until(rolled, limit=1800)
    assert env.cloud.ends == [(old, TerminationReason.ROLLED_OVER)]
    [new] = await warm_ids(env)
    assert new != old
    fresh = await env.app.store.get_instance(new)
    assert fresh.running_at is not None
    # The fresh one was rented shortly before the end, ran first, and the old one ended
    # after it was warm but before its lease would have ended it.
    assert ends - timedelta(minutes=10) <= fresh.created_at < ends
    assert fresh.running_at <= env.cloud.ended_when[old] < ends


async def test_a_restart_keeps_the_schedules_warm_instance_and_rents_no_other(
    make_env: Any,  # noqa: F811
) -> None:
    env: Env = await make_env(warm_schedule=[ALL_DAY], start=False)
    kept = await add_instance(env.app, "i7", extra={"warm_schedule": {"replaces": None}})
    await add_instance(env.app, "i8", extra={})  # launched by hand: not the schedule's
    await env.service.start()
    env.task = asyncio.create_task(env.service.run())
    assert await warm_ids(env) == {kept.id}
    # Passes go by and nothing is rented: the one kept meets min_warm 1.
    start = env.clock.now()

    async def a_minute_on() -> bool:
        return env.clock.now() - start >= timedelta(minutes=1)

    await env.until(a_minute_on)
    assert env.cloud.launches == []


async def test_a_job_does_not_take_a_warm_instance_about_to_be_rolled_over(
    make_env: Any,  # noqa: F811
) -> None:
    env: Env = await make_env(warm_schedule=[ALL_DAY], max_instances=3)

    async def warm_one() -> bool:
        return len(await warm_ids(env)) == 1

    await env.until(warm_one, limit=600)
    [old] = await warm_ids(env)
    await env.app.store.update_instance(old, lease_until=env.clock.now() + timedelta(minutes=20))

    async def replacing() -> bool:
        return len(env.cloud.launches) == 2

    await env.until(replacing, limit=1800)
    # A minute of life left: less than two typical jobs (60 s each before any was measured).
    await env.app.store.update_instance(old, lease_until=env.clock.now() + timedelta(minutes=1))
    job_id = await submit(env)

    async def done() -> bool:
        return (await env.state(job_id)) is JobState.SUCCEEDED

    await env.until(done)
    job = await env.app.store.get_job(job_id)
    assert job.instance_id is not None and job.instance_id != old


async def test_an_instance_the_schedule_keeps_is_not_left_to_the_idle_timeout(
    make_env: Any,  # noqa: F811
) -> None:
    """Held warm by the schedule for hours, the instance stays active for the guard's idle
    rule (else the guard ends it every idle_timeout and the schedule rents a fresh one), with
    a handful of activity events rather than one per pass."""
    env: Env = await make_env(warm_schedule=[ALL_DAY])

    async def warm_one() -> bool:
        return len(await warm_ids(env)) == 1

    await env.until(warm_one, limit=600)
    [kept] = await warm_ids(env)
    idle = env.app.limits().idle_timeout
    start = env.clock.now()
    worst = timedelta(0)

    async def two_idle_timeouts_on() -> bool:
        nonlocal worst
        inst = await env.app.store.get_instance(kept)
        worst = max(worst, env.clock.now() - inst.last_activity)
        return env.clock.now() - start >= 2 * idle

    await env.until(two_idle_timeouts_on, limit=int(3 * idle.total_seconds()))
    assert worst < idle  # the idle deadline never came
    touches = [
        e
        for e in await env.app.store.events(entity_id=kept)
        if e.name == "activity" and e.details.get("by") == "warm_schedule"
    ]
    assert 2 <= len(touches) <= 6
    assert env.cloud.ends == []
    assert len(env.cloud.launches) == 1
