"""The dispatcher's view of the live instances: when each one that is booting or busy will be
free, and from that whether a job no warm instance takes waits for one or rents.

The choice is `weighing.choose` (billed seconds + jobs.wait_weight x waiting seconds); this
class holds its inputs: which jobs are being rented for and since when, which instance is
busy with which job (shared with the jobs loop), and the recent job lengths.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from datetime import datetime

from gpuwarden.config.settings import JobsSettings
from gpuwarden.core.model import Job, JobState
from gpuwarden.jobs import decisions as queue
from gpuwarden.jobs import spot, weighing
from gpuwarden.store import NotFoundError, Store

RECENT_JOBS = 20  # job lengths kept to estimate how long a running job has left


class Dispatcher:
    def __init__(
        self,
        store: Store,
        settings: Callable[[], JobsSettings],
        busy: Mapping[str, str],
        caps: Mapping[str, queue.Capability],
        cold_start_guess: Callable[[], float],
    ) -> None:
        self._store = store
        self._settings = settings
        self._busy = busy  # instance id -> job id (owned by the jobs loop)
        self._caps = caps
        self._cold_start_guess = cold_start_guess
        self._booting: dict[str, tuple[datetime, Job]] = {}  # job id -> (launch start, job)
        self._durations: deque[float] = deque(maxlen=RECENT_JOBS)

    def renting(self, job: Job, now: datetime) -> None:
        self._booting[job.id] = (now, job)

    def ready(self, job_id: str) -> None:
        """The instance rented for the job answers SSH (or never will)."""
        self._booting.pop(job_id, None)

    def reset(self) -> None:
        """The jobs loop restarted: the rentals in flight went with its tasks."""
        self._booting.clear()

    def finished(self, job: Job) -> None:
        """Learn a succeeded job's length."""
        if job.state is JobState.SUCCEEDED and job.started_at and job.finished_at:
            self._durations.append((job.finished_at - job.started_at).total_seconds())

    def typical_job_s(self) -> float:
        return weighing.typical_job_s(list(self._durations))

    async def choose(
        self, job: Job, now: datetime, *, ahead: int, can_rent: bool
    ) -> weighing.Choice:
        """Wait for a live instance (with `ahead` jobs already waiting) or rent?"""
        cold = self._cold_start_guess()
        wait_s = await self.expected_wait(job, now, ahead)
        return weighing.choose(wait_s, cold, self._settings().wait_weight, can_rent=can_rent)

    async def expected_wait(self, job: Job, now: datetime, ahead: int) -> float:
        """Seconds until a live instance that fits is free for `job` (inf if none): a booting
        one after its remaining boot and the job it was rented for, a busy one after the
        remaining run (from progress, else the recent job lengths)."""
        recent = list(self._durations)
        typical = weighing.typical_job_s(recent)
        free_in: list[float] = []
        for launched, booting_job in self._booting.values():
            if self._covers(booting_job, job):
                elapsed = (now - launched).total_seconds()
                free_in.append(self._cold_start_guess() - elapsed + typical)
        spot_ok = spot.wants_spot(job, True)  # the job's, the same for every instance
        for iid, jid in list(self._busy.items()):
            if jid in self._booting:
                continue
            try:
                inst = await self._store.get_instance(iid)
                running = await self._store.get_job(jid)
            except NotFoundError:
                continue
            cap = self._caps.get(iid, queue.Capability(None, inst.price_per_hour))
            if not queue.fits(job.spec, inst, cap, self._settings().gpu_ram_gb, spot_ok=spot_ok):
                continue
            elapsed = (now - (running.started_at or now)).total_seconds()
            free_in.append(
                weighing.remaining_run_s(
                    elapsed, running.progress_step, running.progress_total, recent
                )
            )
        return weighing.expected_wait(free_in, ahead, typical)

    def _covers(self, rented_for: Job, job: Job) -> bool:
        """Will the machine being rented for `rented_for` fit `job` too? Only when `job`
        asks no more GPU RAM, sets no price limit of its own (the offer is not known yet), and
        may run on spot if that machine may be spot."""
        default = self._settings().gpu_ram_gb
        need = job.spec.gpu_ram_gb if job.spec.gpu_ram_gb is not None else default
        have = rented_for.spec.gpu_ram_gb if rented_for.spec.gpu_ram_gb is not None else default
        # A job kept off spot waits only for a machine rented off spot too.
        market_ok = spot.wants_spot(job, True) or not spot.wants_spot(rented_for, True)
        return need <= have and job.spec.max_price is None and market_ok
