"""The "jobs" service: dispatch queued jobs onto instances, recover after a restart, and
give each instance back after its job (reuse, keep warm, or end it).

One loop (`run`) owns a TaskGroup with one task per job being driven. Where things stand is
in the store (job and instance rows, events); what is only in memory here is which instance
is busy with which job, which are warm and until when, and what each rented machine offers.
After a restart `start()` rebuilds all of that from the store (see `_recover`).

Instances per job, in order:
1. a warm instance that fits (no new rental), else the cheapest offer that meets the job,
   across enabled providers, launched through the guard's launch path (NoCapacity or a
   refused launch: the next offer);
2. wait for SSH, at most jobs.ssh_wait: on timeout the instance is ended (launch_failed)
   and the job queued again with attempt + 1, avoiding that offer;
3. the runner (runner.py) drives the job to succeeded / failed / cancelled;
4. after the job: a waiting job that fits takes the instance; else it stays warm for the
   keep-warm window and is then ended (idle), or at once (job_done) when the window is 0.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog

from gpuwarden.core import errors
from gpuwarden.core.heartbeat import BEAT_EVERY
from gpuwarden.core.model import (
    EntityKind,
    Instance,
    InstanceState,
    Job,
    JobState,
    TerminationReason,
)
from gpuwarden.fleet.app import App
from gpuwarden.jobs import decisions as queue
from gpuwarden.jobs.runner import Connector, Outcome, Runner, SshConnector
from gpuwarden.providers.base import InsufficientCredit, Offer, ProviderError, ProviderState
from gpuwarden.store import IllegalTransition, NotFoundError

log = structlog.get_logger(__name__)

PAUSED_FLAG = "queue_paused"
BACKOFF = timedelta(seconds=30)  # before a job whose launch could not happen is tried again
ACTIVE = (JobState.PROVISIONING, JobState.RUNNING, JobState.FETCHING)

LaunchFn = Callable[[App, Offer, str], Awaitable[Instance]]
EndFn = Callable[[App, str, TerminationReason], Awaitable[None]]


async def default_launch(app: App, offer: Offer, job_id: str) -> Instance:
    from gpuwarden.fleet import launcher

    return await launcher.launch(app, offer, job_id=job_id)


async def default_end(app: App, instance_id: str, reason: TerminationReason) -> None:
    from gpuwarden.fleet.terminator import terminator_for

    await terminator_for(app).end(instance_id, reason)


@dataclass
class _Warm:
    until: datetime
    reason: TerminationReason  # job_done when the window was 0, else idle


class JobService:
    name = "jobs"

    def __init__(
        self,
        app: App,
        *,
        connector: Connector | None = None,
        launch: LaunchFn = default_launch,
        end: EndFn = default_end,
    ) -> None:
        self.app = app
        self.settings = app.settings.jobs
        self._connector = connector
        self._launch_fn = launch
        self._end_fn = end
        self._busy: dict[str, str] = {}  # instance id -> job id
        self._warm: dict[str, _Warm] = {}
        self._caps: dict[str, queue.Capability] = {}
        self._launching = 0
        self._recovered: list[tuple[Job, Instance]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._tg: asyncio.TaskGroup | None = None
        self.runner: Runner | None = None
        self._ran = False

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Pick up what a previous run left: jobs in flight and warm instances."""
        self.app.heartbeats.register(self.name)
        self.runner = Runner(
            self.app,
            self._connector or self._ssh_connector(),
            poll=self.settings.progress_interval.total_seconds(),
            reattach=self.settings.ssh_wait.total_seconds(),
        )
        await self._recover()

    def _ssh_connector(self) -> Connector:
        from gpuwarden.remote import ssh as remote

        key = self.app.ssh_key or remote.daemon_key(self.app.settings)[0]
        return SshConnector(
            key,
            self.app.settings.ssh.connect_timeout.total_seconds(),
            self.app.settings.ssh.known_hosts,
        )

    async def run(self) -> None:
        if self.runner is None:
            await self.start()
        elif self._ran:  # restarted after a failure: its tasks are gone, rebuild from the store
            self._busy.clear()
            self._launching = 0
            await self._recover()
        self._ran = True
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            stop_watch = tg.create_task(self._wake_on_stop(), name="jobs-stop-watch")
            for job, inst in self._recovered:
                self._busy[inst.id] = job.id
                self._spawn(self._drive(job, inst), job.id)
            self._recovered = []
            try:
                await self._loop()
            finally:
                # Jobs in flight are left to the next start (their runners are detached).
                stop_watch.cancel()
                for task in list(self._tasks):
                    task.cancel()

    async def _wake_on_stop(self) -> None:
        await self.app.stopping.wait()
        self.app.jobs_wake.set()

    async def _loop(self) -> None:
        clock = self.app.clock
        while not self.app.stopping.is_set():
            self.app.heartbeats.beat(self.name)
            now = clock.now()
            wake = now + timedelta(seconds=BEAT_EVERY)
            if not await self.app.store.get_flag(PAUSED_FLAG, False):
                queued = await self.app.store.jobs([JobState.QUEUED])  # not read while paused
                await self._dispatch(queue.runnable(queued, now))
                backoff_end = queue.next_wake(queued, now)
                if backoff_end is not None:
                    wake = min(wake, backoff_end)
            await self._expire_warm(clock.now())
            if self._warm:
                wake = min(wake, *(w.until for w in self._warm.values()))
            await clock.sleep_until(wake, interrupt=self.app.jobs_wake)

    def _spawn(self, coro: Coroutine[Any, Any, None], job_id: str) -> None:
        assert self._tg is not None
        task = self._tg.create_task(coro, name=f"job-{job_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- dispatch ------------------------------------------------------------------------

    def _in_use(self) -> int:
        return len(self._busy) + len(self._warm) + self._launching

    async def _dispatch(self, jobs: list[Job]) -> None:
        for job in jobs:
            inst = await self._warm_fit(job)
            if inst is not None:
                if await self._assign(job, inst):
                    self._spawn(self._drive(job, inst), job.id)
                continue
            if self._in_use() >= self.settings.max_instances and not await self._free_a_slot():
                return
            if await self._claim(job, None):
                self._launching += 1
                self._spawn(self._drive(job, None), job.id)

    async def _warm_fit(self, job: Job) -> Instance | None:
        for iid in list(self._warm):
            try:
                inst = await self.app.store.get_instance(iid)
            except NotFoundError:
                self._warm.pop(iid, None)
                continue
            if not inst.state.live:
                self._warm.pop(iid, None)
                continue
            cap = self._caps.get(iid, queue.Capability(None, inst.price_per_hour))
            if queue.fits(job.spec, inst, cap, self.settings.gpu_ram_gb):
                return inst
        return None

    async def _free_a_slot(self) -> bool:
        """At capacity with a warm instance no waiting job could use: end it for a new one."""
        for iid in list(self._warm):
            self._warm.pop(iid)
            await self._end(iid, TerminationReason.IDLE)
            return True
        return False

    async def _claim(self, job: Job, inst: Instance | None) -> bool:
        """QUEUED -> PROVISIONING (the api may have cancelled it meanwhile: then False)."""
        fields: dict[str, Any] = {
            "extra": {**job.extra, "assigned_at": self.app.clock.now().isoformat()},
            "progress_step": 0,
            "progress_total": 0,
        }
        if inst is not None:
            fields["instance_id"] = inst.id
        try:
            await self.app.store.transition_job(
                job.id,
                JobState.PROVISIONING,
                details={"instance_id": inst.id if inst else None, "reuse": inst is not None},
                **fields,
            )
        except IllegalTransition:
            return False
        return True

    async def _assign(self, job: Job, inst: Instance) -> bool:
        if not await self._claim(job, inst):
            return False
        self._warm.pop(inst.id, None)
        self._busy[inst.id] = job.id
        await self.app.store.update_instance(inst.id, job_id=job.id)
        log.info("job_reuses_instance", job_id=job.id, instance_id=inst.id)
        return True

    # --- one job -------------------------------------------------------------------------

    async def _drive(self, job: Job, inst: Instance | None) -> None:
        """Launch (unless reusing), wait for SSH, run, then give the instance back."""
        launched = inst is None
        after: Instance | None = None
        try:
            if inst is None:
                try:
                    inst = await self._launch(job)
                finally:
                    self._launching -= 1
                if inst is None:
                    return
                self._busy[inst.id] = job.id
            ready = await self._wait_ready(job, inst, fresh=launched)
            if ready is None:
                return
            after = ready
            await self._run(job, ready)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("job_driver_error", job_id=job.id, error=str(exc))
            await self._requeue(job.id, f"internal error: {type(exc).__name__}: {exc}")
        finally:
            if inst is not None and after is None:
                self._busy.pop(inst.id, None)
        if after is not None:
            # Still counted busy until it is warm: the dispatcher must not see a free slot
            # (and rent anew) in between.
            try:
                await self._after_job(after, job.id)
            finally:
                self._busy.pop(after.id, None)

    async def _run(self, job: Job, inst: Instance) -> None:
        current = await self.app.store.get_job(job.id)
        if current.state.terminal:  # cancelled while the instance booted
            return
        assert self.runner is not None
        outcome = await self.runner.execute(current, inst)
        if outcome is Outcome.DIED:
            await self._requeue(job.id, "the runner died on the instance")
        elif outcome is Outcome.LOST:
            await self._requeue(job.id, "the instance went away or stopped answering")

    async def _launch(self, job: Job) -> Instance | None:
        offers = await self._offers(job)
        if offers is None:
            await self._requeue(job.id, "no provider answered the offer search", bump=False)
            return None
        if not offers:
            await self._fail(job.id, "no offer meets the job (GPU RAM, max price, reliability)")
            return None
        tried: list[str] = []
        for offer in offers:
            if (await self.app.store.get_job(job.id)).state.terminal:
                return None
            try:
                inst = await self._launch_fn(self.app, offer, job.id)
            except (errors.BudgetExceeded, errors.QueuePaused, InsufficientCredit) as exc:
                await self._requeue(job.id, str(exc), bump=False)
                return None
            except asyncio.CancelledError:
                raise
            except (errors.DomainError, ProviderError) as exc:
                log.info(
                    "job_offer_failed",
                    job_id=job.id,
                    provider=offer.provider,
                    offer_id=offer.offer_id,
                    error=str(exc),
                )
                tried.append(queue.offer_key(offer))
                continue
            await self._adopt(job, inst, offer)
            return inst
        await self._requeue(job.id, "every offer refused the launch", avoid=tried)
        return None

    async def _offers(self, job: Job) -> list[Offer] | None:
        want = queue.requirements(
            job.spec,
            default_gpu_ram_gb=self.settings.gpu_ram_gb,
            min_reliability=self.settings.min_reliability,
            budget_max_price=self.app.settings.budget.max_hourly_price,
        )
        providers = list(self.app.providers.values())
        answers = await asyncio.gather(
            *(p.search_offers(want) for p in providers), return_exceptions=True
        )
        found: list[Offer] = []
        answered = False
        for provider, answer in zip(providers, answers, strict=True):
            if isinstance(answer, asyncio.CancelledError):
                raise answer
            if isinstance(answer, BaseException):
                log.warning("job_offer_search_failed", provider=provider.name, error=str(answer))
                continue
            answered = True
            found += answer
        if not answered:
            return None
        avoid = job.extra.get("avoid", [])
        return queue.rank_offers(found, want, avoid if isinstance(avoid, list) else [])

    async def _adopt(self, job: Job, inst: Instance, offer: Offer) -> None:
        self._caps[inst.id] = queue.Capability(offer.gpu_ram_gb, offer.price_per_hour)
        current = await self.app.store.get_job(job.id)
        offer_info = {
            "provider": offer.provider,
            "offer_id": offer.offer_id,
            "gpu": offer.gpu_name,
            "gpu_ram_gb": offer.gpu_ram_gb,
            "price_per_hour": offer.price_per_hour,
        }
        await self.app.store.update_job(
            job.id, instance_id=inst.id, extra={**current.extra, "offer": offer_info}
        )
        if inst.job_id != job.id:
            await self.app.store.update_instance(inst.id, job_id=job.id)

    async def _wait_ready(self, job: Job, inst: Instance, *, fresh: bool) -> Instance | None:
        """Until SSH answers (the instance, RUNNING), or None: gone, or jobs.ssh_wait passed
        (then it is ended with reason launch_failed and the job queued again elsewhere)."""
        clock = self.app.clock
        deadline = clock.monotonic() + self.settings.ssh_wait.total_seconds()
        assert self.runner is not None
        while True:
            inst = await self.app.store.get_instance(inst.id)
            if not inst.state.live or inst.state is InstanceState.TERMINATING:
                await self._requeue(job.id, f"instance {inst.id} ended before the job ran")
                return None
            inst = await self._refresh_endpoint(inst)
            if inst.ssh_host and inst.ssh_port and await self._ssh_answers(inst):
                return await self._mark_running(inst, fresh=fresh)
            if clock.monotonic() >= deadline:
                break
            await clock.sleep(self.runner.poll)
        log.warning("job_ssh_timeout", job_id=job.id, instance_id=inst.id, provider=inst.provider)
        await self._end(inst.id, TerminationReason.LAUNCH_FAILED)
        avoid = [f"{inst.provider}:{inst.offer_id}"]
        await self._requeue(job.id, f"no SSH on {inst.id} within jobs.ssh_wait", avoid=avoid)
        return None

    async def _refresh_endpoint(self, inst: Instance) -> Instance:
        """Ask the provider for the SSH endpoint while our row has none (or is not running)."""
        if inst.state is InstanceState.RUNNING and inst.ssh_host and inst.ssh_port:
            return inst
        provider = self.app.providers.get(inst.provider)
        if provider is None or inst.provider_id is None:
            return inst
        try:
            seen = await provider.get(inst.provider_id)
        except ProviderError as exc:
            log.info("job_provider_get_failed", instance_id=inst.id, error=str(exc))
            return inst
        if seen is None or seen.state is not ProviderState.RUNNING or not seen.ssh_host:
            return inst
        endpoint = (seen.ssh_host, seen.ssh_port, seen.ssh_user)
        if endpoint != (inst.ssh_host, inst.ssh_port, inst.ssh_user):
            inst = await self.app.store.update_instance(
                inst.id, ssh_host=seen.ssh_host, ssh_port=seen.ssh_port, ssh_user=seen.ssh_user
            )
        return inst

    async def _ssh_answers(self, inst: Instance) -> bool:
        assert self.runner is not None
        try:
            conn = await self.runner.connector.connect(inst)
        except asyncio.CancelledError:
            raise
        except Exception:  # not up yet: any failure to connect means "try again"
            return False
        try:
            await conn.close()
        except Exception:  # closing a fresh connection may fail; it answered
            log.debug("job_ssh_close_failed", instance_id=inst.id)
        return True

    async def _mark_running(self, inst: Instance, *, fresh: bool) -> Instance:
        if inst.state in (InstanceState.REQUESTED, InstanceState.PROVISIONING):
            try:
                inst = await self.app.store.transition_instance(
                    inst.id, InstanceState.RUNNING, details={"by": "jobs"}
                )
            except IllegalTransition:
                inst = await self.app.store.get_instance(inst.id)
            self.app.guard_wake.set()
        if fresh:
            seconds = (self.app.clock.now() - inst.created_at).total_seconds()
            await self._remember_cold_start(inst, seconds)
        return inst

    async def _remember_cold_start(self, inst: Instance, seconds: float) -> None:
        key = queue.cold_start_key(inst.provider, inst.gpu)
        stats = queue.add_sample(await self.app.store.get_flag(key), seconds)
        await self.app.store.record(
            EntityKind.INSTANCE, inst.id, "cold_start", {"seconds": round(seconds, 3), **stats}
        )
        await self.app.store.set_flag(key, stats, reason="cold_start")

    # --- after a job ---------------------------------------------------------------------

    async def _after_job(self, inst: Instance, job_id: str) -> None:
        inst = await self.app.store.get_instance(inst.id)
        if inst.state is not InstanceState.RUNNING:
            return
        ended = await self._active_until_job_end(inst, job_id)
        # A waiting job that fits takes it on the next dispatch (at once: we wake the loop);
        # with a window of 0 the instance is ended right after that dispatch. The window,
        # like the idle timer, counts from the end of the job (as after a restart).
        window = await self._keep_warm(inst, ended)
        log.info(
            "instance_warm",
            instance_id=inst.id,
            provider=inst.provider,
            window_s=window.total_seconds(),
        )
        self.app.jobs_wake.set()

    async def _keep_warm(self, inst: Instance, since: datetime) -> timedelta:
        """Hold `inst` warm for the keep-warm window from `since` (returned); then it is
        ended with reason idle, or job_done when the window is 0."""
        stats = await self.app.store.get_flag(queue.cold_start_key(inst.provider, inst.gpu))
        mean = float(stats["mean"]) if isinstance(stats, dict) and "mean" in stats else None
        window = queue.keep_warm_window(self.settings.keep_warm, mean)
        reason = TerminationReason.IDLE if window > timedelta(0) else TerminationReason.JOB_DONE
        self._warm[inst.id] = _Warm(since + window, reason)
        return window

    async def _active_until_job_end(self, inst: Instance, job_id: str) -> datetime:
        """Move the instance's last activity to the end of the job (returned), so that its
        idle deadline counts from there. While the job ran the guard treated it as busy, but
        last_activity only moved with the runner's rate-limited touches (none while booting
        or fetching). A job queued again (its runner died) ends now."""
        job = await self.app.store.get_job(job_id)
        ended = job.finished_at if job.state.terminal and job.finished_at else None
        end = ended or self.app.clock.now()
        if end <= inst.last_activity:
            return end
        await self.app.store.record(
            EntityKind.INSTANCE,
            inst.id,
            "activity",
            {"job_id": job_id, "job_state": job.state.value, "by": "job_end"},
            updates={"last_activity": end},
        )
        self.app.guard_wake.set()
        return end

    async def _expire_warm(self, now: datetime) -> None:
        for iid, warm in list(self._warm.items()):
            if warm.until <= now:
                self._warm.pop(iid, None)
                await self._end(iid, warm.reason)

    async def _end(self, instance_id: str, reason: TerminationReason) -> None:
        try:
            await self._end_fn(self.app, instance_id, reason)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the guard and the reconciler still hold it to its deadline
            log.error("job_instance_end_failed", instance_id=instance_id, error=str(exc))

    # --- requeue / fail ------------------------------------------------------------------

    async def _requeue(
        self, job_id: str, why: str, *, bump: bool = True, avoid: list[str] | None = None
    ) -> None:
        """Queue the job again (attempt + 1, unless the launch never got to happen), or fail
        it once jobs.max_attempts attempts were made. A terminal job is left alone."""
        job = await self.app.store.get_job(job_id)
        if job.state.terminal:
            return
        attempt = job.attempt + (1 if bump else 0)
        if attempt >= self.settings.max_attempts:
            await self._fail(job_id, f"{why} (after {attempt} attempts)")
            return
        extra = {k: v for k, v in job.extra.items() if k not in ("assigned_at", "offer")}
        if avoid:
            extra["avoid"] = sorted({*extra.get("avoid", []), *avoid})
        if not bump:
            extra["not_before"] = (self.app.clock.now() + BACKOFF).isoformat()
        try:
            await self.app.store.transition_job(
                job_id,
                JobState.QUEUED,
                reason="retry",
                details={"why": why, "attempt": attempt},
                attempt=attempt,
                instance_id=None,
                error=why,
                extra=extra,
            )
        except IllegalTransition:
            return
        log.info("job_requeued", job_id=job_id, attempt=attempt, reason=why)
        self.app.jobs_wake.set()

    async def _fail(self, job_id: str, why: str) -> None:
        try:
            await self.app.store.transition_job(job_id, JobState.FAILED, reason="error", error=why)
        except IllegalTransition:
            return
        log.warning("job_failed", job_id=job_id, error=why)

    # --- recovery ------------------------------------------------------------------------

    async def _recover(self) -> None:
        store = self.app.store
        live = await store.live_instances()
        by_job = {i.job_id: i for i in live if i.job_id}
        resumed: set[str] = set()
        for job in await store.jobs(ACTIVE):
            inst: Instance | None = None
            if job.instance_id is not None:
                try:
                    inst = await store.get_instance(job.instance_id)
                except NotFoundError:
                    inst = None
            else:
                inst = by_job.get(job.id)
            if inst is None or not inst.state.live or inst.state is InstanceState.TERMINATING:
                await self._requeue(job.id, "its instance is gone (found after a restart)")
                continue
            self._recovered.append((job, inst))
            resumed.add(inst.id)
            offer = job.extra.get("offer")
            if isinstance(offer, dict):
                self._caps[inst.id] = queue.Capability(
                    offer.get("gpu_ram_gb"), float(offer.get("price_per_hour", 0.0))
                )
            log.info("job_recovered", job_id=job.id, instance_id=inst.id, state=job.state.value)
        await self._recover_warm(live, resumed)

    async def _recover_warm(self, live: list[Instance], resumed: set[str]) -> None:
        """Instances our jobs rented that are idle now: warm again, from their last activity."""
        for inst in live:
            if inst.id in resumed or inst.job_id is None or inst.state is not InstanceState.RUNNING:
                continue
            try:
                job = await self.app.store.get_job(inst.job_id)
            except NotFoundError:
                continue
            if job.state in ACTIVE:
                continue
            await self._keep_warm(inst, inst.last_activity)
