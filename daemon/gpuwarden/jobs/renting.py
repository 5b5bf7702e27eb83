"""Renting and readying an instance for a job, and putting a job back in the queue: the
steps of the jobs loop (service.py) that talk to providers and wait for SSH.

`Renting` holds what those steps share with the loop: the context, the jobs settings, the
launch and end functions (injected, so tests can stand in for the cloud), the runner, and
what each rented machine offers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta

import structlog

from gpuwarden.core import errors
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
from gpuwarden.jobs import spot, weighing
from gpuwarden.jobs.runner import Runner
from gpuwarden.providers.base import InsufficientCredit, Offer, ProviderError, ProviderState
from gpuwarden.store import IllegalTransition

log = structlog.get_logger(__name__)

BACKOFF = timedelta(seconds=30)  # before a job whose launch could not happen is tried again
SPOT_HISTORY = timedelta(days=30)  # the spot terminations the observed preemption rate uses

# The job the rental is for; None for one jobs.warm_schedule rents to keep warm.
LaunchFn = Callable[[App, Offer, str | None], Awaitable[Instance]]
EndFn = Callable[[App, str, TerminationReason], Awaitable[None]]


async def default_launch(app: App, offer: Offer, job_id: str | None) -> Instance:
    from gpuwarden.fleet import launcher

    return await launcher.launch(app, offer, job_id=job_id)


async def default_end(app: App, instance_id: str, reason: TerminationReason) -> None:

    await app.terminator.end(instance_id, reason)


class Renting:
    def __init__(self, app: App, *, launch: LaunchFn, end: EndFn) -> None:
        self.app = app
        self.settings = app.settings.jobs
        self._launch_fn = launch
        self._end_fn = end
        self._caps: dict[str, queue.Capability] = {}
        self._cold_starts: dict[str, float] = {}  # cold_start_key -> the estimate last stored
        self.runner: Runner | None = None
        # The length of a job to expect, for the expected cost of an offer (the jobs loop
        # passes its dispatcher's, learned from recent jobs).
        self.typical_job_s: Callable[[], float] = lambda: weighing.DEFAULT_JOB_S

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
        """The offers to try for the job, by expected cost (spot ones with their bid placed,
        when the job may use spot), or None when no provider answered."""
        use_spot = spot.wants_spot(job, self.settings.interruptible)
        want = queue.requirements(
            job.spec,
            default_gpu_ram_gb=self.settings.gpu_ram_gb,
            min_reliability=self.settings.min_reliability,
            budget_max_price=self.app.settings.budget.max_hourly_price,
            interruptible=use_spot,
            disk_gb=self.settings.disk_gb,
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
        found = spot.with_bids(
            found, spot=use_spot, factor=self.settings.bid_factor, cap=want.max_price
        )
        avoid = job.extra.get("avoid", [])
        ok = queue.rank_offers(found, want, avoid if isinstance(avoid, list) else [])
        if not any(o.interruptible for o in ok):
            return ok
        since = self.app.clock.now() - SPOT_HISTORY
        seen = spot.exposures(t for t, _ in await self.app.store.spot_terminations(since))
        return spot.by_expected_cost(ok, self._cold_start_guess() + self.typical_job_s(), seen)

    async def _adopt(self, job: Job, inst: Instance, offer: Offer) -> None:
        self._caps[inst.id] = queue.Capability(offer.gpu_ram_gb, offer.price_per_hour)
        current = await self.app.store.get_job(job.id)
        offer_info = {
            "provider": offer.provider,
            "offer_id": offer.offer_id,
            "gpu": offer.gpu_name,
            "gpu_ram_gb": offer.gpu_ram_gb,
            "price_per_hour": offer.price_per_hour,
            "spot": offer.interruptible,
        }
        if offer.interruptible:
            offer_info["bid"] = offer.bid
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
                await self._requeue_lost(job.id, inst, "it ended before the job ran")
                return None
            inst = await self._refresh_endpoint(inst)
            if inst.ssh_host and inst.ssh_port and await self._ssh_answers(inst):
                return await self._mark_running(inst, fresh=fresh)
            if clock.monotonic() >= deadline:
                break
            await clock.sleep(self.runner.poll)
        log.warning("job_ssh_timeout", job_id=job.id, instance_id=inst.id, provider=inst.provider)
        if fresh:  # the wasted boot counts towards the next cold start of this machine
            wasted = (clock.now() - inst.created_at).total_seconds()
            await self._remember_cold_start(inst, wasted, failed=True)
        await self._end(inst.id, TerminationReason.LAUNCH_FAILED)
        avoid = [queue.instance_key(inst)]
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
        if fresh:
            seconds = (self.app.clock.now() - inst.created_at).total_seconds()
            self.app.metrics.observe_cold_start(inst.provider, inst.gpu, seconds)
            await self._remember_cold_start(inst, seconds)
        return inst

    async def _remember_cold_start(
        self, inst: Instance, seconds: float, *, failed: bool = False
    ) -> None:
        key = queue.cold_start_key(inst.provider, inst.gpu)
        stats = weighing.cold_start_update(
            await self.app.store.get_flag(key), seconds, failed=failed
        )
        await self.app.store.record(
            EntityKind.INSTANCE,
            inst.id,
            "cold_start",
            {"seconds": round(seconds, 3), "failed": failed, **stats},
        )
        await self.app.store.set_flag(key, stats, reason="cold_start")
        self._cold_starts[key] = weighing.cold_start_mean(stats, queue.DEFAULT_COLD_START_S)

    async def _remember_setup(self, inst: Instance, setup_s: float) -> None:
        """Count the setup a job did on `inst` (the runner installing its engine and
        downloading the model, which happens once per machine) in the cold start of its
        provider and GPU: that time is billed and waited through before the first image, like
        the boot."""
        if setup_s <= 0:
            return
        key = queue.cold_start_key(inst.provider, inst.gpu)
        stats = weighing.cold_start_add_setup(await self.app.store.get_flag(key), setup_s)
        await self.app.store.record(
            EntityKind.INSTANCE, inst.id, "cold_start_setup", {"setup_s": setup_s, **stats}
        )
        await self.app.store.set_flag(key, stats, reason="cold_start")
        self._cold_starts[key] = weighing.cold_start_mean(stats, queue.DEFAULT_COLD_START_S)

    async def _cold_start_s(self, inst: Instance) -> float:
        """The decaying cold-start estimate for the instance's provider and GPU."""
        key = queue.cold_start_key(inst.provider, inst.gpu)
        estimate = weighing.cold_start_mean(
            await self.app.store.get_flag(key), queue.DEFAULT_COLD_START_S
        )
        self._cold_starts[key] = estimate
        return estimate

    def _cold_start_guess(self) -> float:
        """A cold start before the offer is known: the slowest estimate seen (the default
        before any), so that waiting is not chosen on a guess that is too hopeful."""
        return max(self._cold_starts.values(), default=queue.DEFAULT_COLD_START_S)

    # --- after a job ---------------------------------------------------------------------

    async def _end(self, instance_id: str, reason: TerminationReason) -> None:
        try:
            await self._end_fn(self.app, instance_id, reason)
        except Exception as exc:  # the guard and the reconciler still hold it to its deadline
            log.error("job_instance_end_failed", instance_id=instance_id, error=str(exc))

    # --- requeue / fail ------------------------------------------------------------------

    async def _preempted(self, instance_id: str) -> bool:
        inst = await self.app.store.get_instance(instance_id)
        return inst.reason is TerminationReason.PREEMPTED

    async def _requeue_lost(self, job_id: str, inst: Instance, why: str) -> None:
        """The job's instance is gone: queue the job again, at the front of the queue when
        the instance was preempted (a spot instance outbid)."""
        try:
            inst = await self.app.store.get_instance(inst.id)
        except Exception:  # the row is the store's; a failed read is an ordinary loss
            log.debug("job_instance_read_failed", instance_id=inst.id)
        if inst.reason is TerminationReason.PREEMPTED:
            why = f"its spot instance {inst.id} was outbid (preempted)"
            await self._requeue(job_id, why, preempted=True, avoid=[queue.instance_key(inst)])
        else:
            await self._requeue(job_id, f"instance {inst.id}: {why}")

    async def _requeue(
        self,
        job_id: str,
        why: str,
        *,
        bump: bool = True,
        avoid: list[str] | None = None,
        preempted: bool = False,
    ) -> None:
        """Queue the job again (attempt + 1, unless the launch never got to happen), or fail
        it once jobs.max_attempts attempts were made. A terminal job is left alone.

        A preemption counts as an attempt but not towards jobs.max_attempts (it is no fault
        of the job); the job goes to the front of the queue, and after spot.FALLBACK_AFTER
        preemptions it runs on demand, so that preemptions cannot go on for ever."""
        job = await self.app.store.get_job(job_id)
        if job.state.terminal:
            return
        attempt = job.attempt + (1 if bump else 0)
        preemptions = spot.preemptions(job) + (1 if preempted else 0)
        if attempt - preemptions >= self.settings.max_attempts:
            await self._fail(job_id, f"{why} (after {attempt} attempts)")
            return
        drop = ("assigned_at", "offer", "front")
        extra = {k: v for k, v in job.extra.items() if k not in drop}
        if preempted:
            extra |= {"preemptions": preemptions, "front": True}
        if avoid:
            extra["avoid"] = sorted({*extra.get("avoid", []), *avoid})
        if not bump:
            extra["not_before"] = (self.app.clock.now() + BACKOFF).isoformat()
        try:
            await self.app.store.transition_job(
                job_id,
                JobState.QUEUED,
                reason="retry",
                details={"why": why, "attempt": attempt, "preempted": preempted},
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
