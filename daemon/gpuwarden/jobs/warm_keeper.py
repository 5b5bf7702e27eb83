"""The jobs loop's side of `jobs.warm_schedule` that needs no job: rent instances so that each
open window keeps `min_warm` of its class warm, and roll a warm instance over to a fresh one
before its hard cap or lease would end it (warm_plan holds the pure decisions).

A schedule rental goes through the same offer search (on demand, the configured GPU RAM,
price caps and reliability, the window's GPU class) and the same launch path as a job's, so
the budget checks and the guard's deadlines apply to it. Once SSH answers it joins the warm
pool like an instance whose job ended. A budget refusal or a round of refused offers holds
further schedule rentals for `HOLD`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Coroutine
from datetime import datetime, timedelta
from typing import Any

import structlog

from gpuwarden.core import errors, policy
from gpuwarden.core.model import (
    EntityKind,
    Instance,
    InstanceState,
    JobSpec,
    TerminationReason,
)
from gpuwarden.jobs import decisions as queue
from gpuwarden.jobs import warm_plan
from gpuwarden.jobs.renting import Renting
from gpuwarden.jobs.warm_pool import WarmPool
from gpuwarden.providers.base import InsufficientCredit, Offer, ProviderError
from gpuwarden.store import NotFoundError

log = structlog.get_logger(__name__)

MARK = "warm_schedule"  # the key in a schedule-rented instance's extra
HOLD = timedelta(minutes=5)  # no schedule rental after a refused one, for this long
LEAD_COLD_STARTS = 2.0  # a rollover starts this many cold starts before the old one's end


class WarmKeeping(Renting):
    """Mixed into the jobs service, which provides the pool, the counts and the spawning."""

    _warm: WarmPool
    _busy: dict[str, str]
    _launching: int

    def _init_keeping(self) -> None:
        self._pending: list[warm_plan.Rental] = []
        self._replaces: dict[str, str | None] = {}  # schedule-rented id -> the one it replaces
        self._booting: set[str] = set()  # schedule-rented, SSH not answering yet
        self._held_until: datetime | None = None
        self._kept_until: dict[str, datetime] = {}  # warm by the schedule, until its close

    def _in_use(self) -> int:
        raise NotImplementedError

    def _spawn(self, coro: Coroutine[Any, Any, None], job_id: str) -> None:
        raise NotImplementedError

    async def _keep_warm(self, inst: Instance, since: datetime) -> timedelta:
        raise NotImplementedError

    async def _recover_schedule(self, live: list[Instance]) -> None:
        """After a restart: the schedule's running instances with no job, warm again from
        their last activity (one still booting is left to the guard's deadlines)."""
        for inst in live:
            mark = inst.extra.get(MARK)
            if inst.job_id is not None or not isinstance(mark, dict):
                continue
            if inst.state is not InstanceState.RUNNING or inst.id in self._warm.ids():
                continue
            replaces = mark.get("replaces")
            self._replaces[inst.id] = replaces if isinstance(replaces, str) else None
            ram = mark.get("gpu_ram_gb")
            ram_gb = float(ram) if isinstance(ram, int | float) else None
            self._caps[inst.id] = queue.Capability(ram_gb, inst.price_per_hour)
            await self._keep_warm(inst, inst.last_activity)

    async def _ending_soon(self, now: datetime) -> frozenset[str]:
        """Warm instances being rolled over whose end (hard cap or lease) comes before two
        typical jobs could run: a job taking one would be cut off by the guard mid-job."""
        limits = self.app.limits()
        room = timedelta(seconds=2 * self.typical_job_s())
        out: set[str] = set()
        for old in self._being_replaced():
            try:
                inst = await self.app.store.get_instance(old)
            except NotFoundError:
                continue
            if min(policy.hard_deadline(inst, limits), inst.lease_until) - now < room:
                out.add(old)
        return frozenset(out)

    def _being_replaced(self) -> set[str]:
        """Warm instances a fresh one is being rented or was rented for (not counted as kept
        by the schedule)."""
        olds = [*self._replaces.values(), *(r.replaces for r in self._pending)]
        return {old for old in olds if old is not None}

    def _note_kept(self, instance_id: str, closes: datetime) -> None:
        """The schedule holds this warm instance until its window `closes`."""
        self._kept_until[instance_id] = closes

    async def _keep_awake(self, now: datetime) -> None:
        """An instance the schedule holds warm is active for the idle timeout: the schedule is
        the operator asking for it to wait. Without this the guard would end it after
        `policy.idle_timeout` (30 min by default) and the schedule would rent a fresh one, a
        cold start each half hour. Its lease, hard cap and the budget still apply. Written as
        an `activity` event, shortly before the idle deadline, so a pass every BEAT_EVERY
        seconds keeps it and the event log does not fill."""
        idle = self.app.limits().idle_timeout
        ahead = min(timedelta(minutes=5), idle / 2)
        warm = self._warm.ids()
        for iid, closes in list(self._kept_until.items()):
            if iid not in warm or closes <= now:
                del self._kept_until[iid]
                continue
            try:
                inst = await self.app.store.get_instance(iid)
            except NotFoundError:
                del self._kept_until[iid]
                continue
            if inst.last_activity + idle - now > ahead:
                continue
            await self.app.store.record(
                EntityKind.INSTANCE,
                iid,
                "activity",
                {"by": "warm_schedule", "until": closes.isoformat()},
                updates={"last_activity": now},
            )

    async def _keep_schedule(self, now: datetime) -> None:
        """End old instances whose replacement is warm, then start what the schedule lacks."""
        if not self.settings.warm_schedule:
            return
        await self._keep_awake(now)
        held = await self._held(now)
        for old in warm_plan.retire(held):
            since = self._warm.since_of(old)
            self._warm.take(old)
            for new, replaced in list(self._replaces.items()):
                if replaced == old:
                    self._replaces[new] = None
            await self._warm.record_idle(old, since, now)
            log.info("instance_rolled_over", instance_id=old)
            await self._end(old, TerminationReason.ROLLED_OVER)
            held = [h for h in held if h.id != old]
        lead = timedelta(seconds=LEAD_COLD_STARTS * self._cold_start_guess())
        wanted = warm_plan.rentals(
            self.settings.warm_schedule,
            held,
            self._pending,
            now,
            room=self.settings.max_instances - self._in_use(),
            lead=lead,
            refused_until=self._held_until,
        )
        for rental in wanted:
            self._pending.append(rental)
            self._launching += 1
            self._spawn(self._rent_for_schedule(rental), "warm-schedule")

    async def _held(self, now: datetime) -> list[warm_plan.Held]:
        mine = self._warm.ids() | self._busy.keys() | self._booting
        limits = self.app.limits()
        live = {i.id: i for i in await self.app.store.live_instances() if i.id in mine}
        for iid in [k for k in self._replaces if k not in live]:
            del self._replaces[iid]  # lost: the schedule rents anew if it still wants one
        warm = self._warm.ids()
        return [
            warm_plan.Held(
                i.id,
                i.gpu,
                min(policy.hard_deadline(i, limits), i.lease_until),
                idle=i.id in warm and i.state is InstanceState.RUNNING,
                replaces=self._replaces.get(i.id),
            )
            for i in live.values()
        ]

    async def _rent_for_schedule(self, rental: warm_plan.Rental) -> None:
        """Rent, wait for SSH, then hold warm. Counted as launching (against max_instances)
        until it is warm or gone; an error is logged and the schedule tries again later."""
        inst: Instance | None = None
        try:
            try:
                inst = await self._launch_for_schedule(rental)
            finally:
                self._pending.remove(rental)  # counted as live (or booting) from here
            if inst is None:
                return
            self._replaces[inst.id] = rental.replaces
            self._booting.add(inst.id)
            ready = await self._ready_for_schedule(inst)
            if ready is not None:
                await self._keep_warm(ready, self.app.clock.now())
        except Exception as exc:
            log.exception("warm_schedule_error", error=str(exc))
            self._held_until = self.app.clock.now() + HOLD
        finally:
            if inst is not None:
                self._booting.discard(inst.id)
            self._launching -= 1
            self.app.jobs_wake.set()  # retire an old instance, or rent again for a lost one

    async def _schedule_offers(self, gpu: str | None) -> list[Offer]:
        want = queue.requirements(
            JobSpec(prompt=""),
            default_gpu_ram_gb=self.settings.gpu_ram_gb,
            min_reliability=self.settings.min_reliability,
            budget_max_price=self.app.settings.budget.max_hourly_price,
            disk_gb=self.settings.disk_gb,
        )
        want = dataclasses.replace(want, gpu_name=gpu)
        found: list[Offer] = []
        for provider in self.app.providers.values():
            try:
                found += await provider.search_offers(want)
            except ProviderError as exc:
                log.warning("warm_offer_search_failed", provider=provider.name, error=str(exc))
        return queue.rank_offers(found, want)

    async def _launch_for_schedule(self, rental: warm_plan.Rental) -> Instance | None:
        """The cheapest offer of the window's class that the launch path accepts, or None
        (then schedule rentals hold for HOLD)."""
        for offer in await self._schedule_offers(rental.gpu):
            try:
                inst = await self._launch_fn(self.app, offer, None)
            except (errors.BudgetExceeded, errors.QueuePaused, InsufficientCredit) as exc:
                log.info("warm_schedule_refused", error=str(exc))
                break
            except (errors.DomainError, ProviderError) as exc:
                log.info("warm_offer_failed", offer_id=offer.offer_id, error=str(exc))
                continue
            self._caps[inst.id] = queue.Capability(offer.gpu_ram_gb, offer.price_per_hour)
            # Marked, so that a restarted daemon counts it again (see _recover_schedule).
            mark = {MARK: {"replaces": rental.replaces, "gpu_ram_gb": offer.gpu_ram_gb}}
            inst = await self.app.store.update_instance(inst.id, extra={**inst.extra, **mark})
            log.info("warm_schedule_rented", instance_id=inst.id, replaces=rental.replaces)
            return inst
        self._held_until = self.app.clock.now() + HOLD
        return None

    async def _ready_for_schedule(self, inst: Instance) -> Instance | None:
        """Until SSH answers (the instance, RUNNING), or None: it ended, or jobs.ssh_wait
        passed (then it is ended with reason launch_failed)."""
        clock = self.app.clock
        deadline = clock.monotonic() + self.settings.ssh_wait.total_seconds()
        assert self.runner is not None
        while clock.monotonic() < deadline:
            inst = await self.app.store.get_instance(inst.id)
            if not inst.state.live or inst.state is InstanceState.TERMINATING:
                return None
            inst = await self._refresh_endpoint(inst)
            if inst.ssh_host and inst.ssh_port and await self._ssh_answers(inst):
                return await self._mark_running(inst, fresh=True)
            await clock.sleep(self.runner.poll)
        wasted = (clock.now() - inst.created_at).total_seconds()
        await self._remember_cold_start(inst, wasted, failed=True)
        await self._end(inst.id, TerminationReason.LAUNCH_FAILED)
        return None
