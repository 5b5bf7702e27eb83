"""An outbid spot instance, with fakes: whichever of the reconciler and the watchdog notices
it first ends it through the same Terminator call (reason preempted, destroyed at once), and
the jobs loop puts its job back at the front of the queue without using up max_attempts."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from jobs_fakes import FakeConnector, FakeRunnerJob, add_instance, add_job, drive, settings
from test_watchdog import FAIL, START, Rig
from tests.conftest import T0, MakeApp

from gpuwarden.config.settings import Settings
from gpuwarden.core.clock import FakeClock
from gpuwarden.core.model import EntityKind, InstanceState, JobState, TerminationReason
from gpuwarden.fleet import launcher
from gpuwarden.fleet.app import App
from gpuwarden.jobs.service import JobService
from gpuwarden.jobs.spec import remote_dir
from gpuwarden.loops.reconciler import Reconciler
from gpuwarden.providers.base import Offer
from gpuwarden.providers.fake import FakeProvider


def spot(offer: Offer) -> Offer:
    return replace(
        offer,
        interruptible=True,
        min_bid=0.1,
        bid=0.12,
        storage_per_hour=0.01,
        price_per_hour=0.13,
        on_demand_price=offer.price_per_hour,
    )


@pytest.fixture
async def rig(tmp_path: Path, make_app: MakeApp) -> Rig:
    clock = FakeClock(START)
    s = Settings(daemon={"state_dir": str(tmp_path)}, policy={"watchdog_interval": "60s"})
    provider = FakeProvider(clock)
    return Rig(await make_app(s, clock, [provider]), clock, provider)


async def _ended_by(app: App, iid: str) -> dict[str, Any]:
    events = await app.store.events(kind=EntityKind.INSTANCE, entity_id=iid)
    [terminating] = [e for e in events if e.to_state == InstanceState.TERMINATING.value]
    return terminating.details


async def test_the_reconciler_destroys_an_outbid_spot_instance_at_once(
    tmp_path: Path, make_app: MakeApp, clock: FakeClock
) -> None:
    fake = FakeProvider(clock, "fake", boot_delay=timedelta(seconds=10))
    app = await make_app(clock=clock, providers=[fake])
    inst = await launcher.launch(app, spot(fake.offers[0]))
    assert inst.extra["spot"] == {
        "bid": 0.12,
        "min_bid": 0.1,
        "on_demand_price": fake.offers[0].price_per_hour,
    }
    rec = Reconciler(app)
    clock.set(T0 + timedelta(seconds=11))
    await rec.pass_once()
    assert (await app.store.get_instance(inst.id)).state is InstanceState.RUNNING
    assert inst.provider_id is not None
    fake.outbid(inst.provider_id)
    clock.set(T0 + timedelta(seconds=20))
    await rec.pass_once()
    got = await app.store.get_instance(inst.id)
    assert (got.state, got.reason) == (InstanceState.TERMINATED, TerminationReason.PREEMPTED)
    assert fake.bills[inst.provider_id].end == T0 + timedelta(seconds=20)  # destroyed at once
    assert (await _ended_by(app, inst.id))["noticed_by"] == "reconciler"
    [ended] = await app.store.spot_terminations(T0)
    assert ended[0].reason is TerminationReason.PREEMPTED and ended[1]["bid"] == 0.12
    await app.store.close()


async def test_the_watchdog_ends_an_outbid_spot_instance_as_preempted_not_struck(
    rig: Rig,
) -> None:
    inst = await rig.add_running("i1")
    await rig.app.store.update_instance("i1", extra={"spot": {"bid": 0.12}})
    assert inst.provider_id is not None
    rig.provider.outbid(inst.provider_id)
    rig.prober.default = FAIL
    await rig.probe_now("i1")
    got = await rig.app.store.get_instance("i1")
    assert got.reason is TerminationReason.PREEMPTED and got.strikes == 0
    assert got.state is InstanceState.TERMINATED
    assert (await _ended_by(rig.app, "i1"))["noticed_by"] == "watchdog"


async def test_an_on_demand_instance_that_stops_answering_is_struck_as_before(rig: Rig) -> None:
    inst = await rig.add_running("i1")
    assert inst.provider_id is not None
    rig.prober.default = FAIL
    await rig.probe_now("i1")
    got = await rig.app.store.get_instance("i1")
    assert got.strikes == 1 and got.state is InstanceState.RUNNING


async def test_a_preempted_job_goes_to_the_front_without_using_up_max_attempts(
    tmp_path: Path, make_app: MakeApp
) -> None:
    clock = FakeClock()
    app = await make_app(settings(tmp_path, max_attempts=1), clock)
    outbid = await add_instance(app, "i1", offer_id="ask-1", extra={"spot": {"bid": 0.1}})
    lost = await add_instance(app, "i2")
    for inst, reason in ((outbid, TerminationReason.PREEMPTED), (lost, TerminationReason.WATCHDOG)):
        await app.store.transition_instance(inst.id, InstanceState.TERMINATING, reason=reason)
    preempted = await add_job(app, "ja", JobState.RUNNING, instance_id="i1")
    failed = await add_job(app, "jb", JobState.RUNNING, instance_id="i2")
    await JobService(app).start()  # the restart path: both jobs find their instance gone
    job = await app.store.get_job(preempted.id)
    assert (job.state, job.attempt, job.instance_id) == (JobState.QUEUED, 1, None)
    assert job.extra["preemptions"] == 1 and job.extra["front"] is True
    assert job.extra["avoid"] == ["fake:ask-1"]
    assert (await app.store.get_job(failed.id)).state is JobState.FAILED  # 1 attempt of 1
    await app.store.close()


async def test_a_runner_that_dies_with_its_outbid_machine_is_requeued_as_preempted(
    tmp_path: Path, make_app: MakeApp
) -> None:
    """The machine stopped and took the runner with it before SSH dropped: the jobs loop asks
    the provider, ends the instance as preempted and queues the job at the front."""
    clock = FakeClock()
    fake = FakeProvider(clock, "fake")
    app = await make_app(settings(tmp_path), clock, [fake])
    pid = fake.spawn("gpuwarden-main-i1")
    inst = await add_instance(app, "i1", provider_id=pid, extra={"spot": {"bid": 0.1}})
    job = await add_job(app, "ja", JobState.RUNNING, instance_id="i1")
    connector = FakeConnector()
    connector.remote("i1").jobs[remote_dir(job.id)] = FakeRunnerJob(total=3, state="dead")
    fake.outbid(pid)
    service = JobService(app, connector=connector)
    await service.start()
    await drive(clock, service._run(job, inst))
    got = await app.store.get_instance("i1")
    assert got.reason is TerminationReason.PREEMPTED
    assert (await _ended_by(app, "i1"))["noticed_by"] == "jobs"
    requeued = await app.store.get_job(job.id)
    assert requeued.state is JobState.QUEUED and requeued.extra["preemptions"] == 1
