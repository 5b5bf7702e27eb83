"""The warm pool of the jobs loop: idle instances kept for the next job, until when, and the
idle gaps that keep_warm = "auto" learns its window from.

In memory only (after a restart the jobs loop puts idle instances back from the store and
the gaps are learned again). The choices are pure functions of `weighing`; this class holds
their inputs and reads instance rows to check that a warm instance still lives.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from gpuwarden.core.model import Instance, Job, TerminationReason
from gpuwarden.jobs import decisions as queue
from gpuwarden.jobs import spot, weighing
from gpuwarden.store import NotFoundError, Store


@dataclass
class Warm:
    until: datetime
    reason: TerminationReason  # job_done when the window was 0, else idle
    since: datetime  # when it went idle: the most recently used is reused first


class WarmPool:
    def __init__(self, store: Store, caps: Mapping[str, queue.Capability]) -> None:
        self._store = store
        self._caps = caps  # what each rented machine offers (kept by the provisioner)
        self._warm: dict[str, Warm] = {}
        self._gaps: list[weighing.Gap] = []
        self._idle_since: datetime | None = None

    def __len__(self) -> int:
        return len(self._warm)

    def note_arrival(self, job: Job) -> None:
        """The first job submitted after an instance went idle closes an idle gap."""
        if self._idle_since is not None and job.created_at >= self._idle_since:
            seconds = (job.created_at - self._idle_since).total_seconds()
            self._gaps = weighing.note_gap(self._gaps, weighing.Gap(job.created_at, seconds))
            self._idle_since = None

    def window(
        self,
        setting: Literal["auto"] | timedelta,
        now: datetime,
        cold_start_s: float,
        wait_weight: float,
    ) -> timedelta:
        """The keep-warm window: a fixed one, or for "auto" the one that would have cost
        least over the idle gaps seen (weighing.adaptive_window)."""
        if setting == "auto":
            return timedelta(
                seconds=weighing.adaptive_window(self._gaps, now, cold_start_s, wait_weight)
            )
        assert isinstance(setting, timedelta)
        return setting

    def hold(self, inst: Instance, since: datetime, window: timedelta) -> None:
        """Keep `inst` warm from `since` for `window`; then it is ended with reason idle, or
        job_done when the window is 0."""
        reason = TerminationReason.IDLE if window > timedelta(0) else TerminationReason.JOB_DONE
        self._warm[inst.id] = Warm(since + window, reason, since)
        if self._idle_since is None or since > self._idle_since:
            self._idle_since = since

    async def fit(self, job: Job, default_gpu_ram_gb: float) -> Instance | None:
        """A warm instance that fits the job, the most recently used first (so that the
        others stay idle and expire); instances that ended meanwhile leave the pool."""
        for iid in weighing.most_recent_first({k: w.since for k, w in self._warm.items()}):
            try:
                inst = await self._store.get_instance(iid)
            except NotFoundError:
                self._warm.pop(iid, None)
                continue
            if not inst.state.live:
                self._warm.pop(iid, None)
                continue
            cap = self._caps.get(iid, queue.Capability(None, inst.price_per_hour))
            if queue.fits(
                job.spec, inst, cap, default_gpu_ram_gb, spot_ok=spot.wants_spot(job, True)
            ):
                return inst
        return None

    def take(self, instance_id: str) -> None:
        """The instance leaves the pool (a job took it)."""
        self._warm.pop(instance_id, None)

    def evict_one(self) -> str | None:
        """Any warm instance, out of the pool, to be ended for room (None if empty)."""
        for iid in list(self._warm):
            self._warm.pop(iid)
            return iid
        return None

    def ids(self) -> frozenset[str]:
        return frozenset(self._warm)

    def due(
        self, now: datetime, among: frozenset[str] | None = None
    ) -> list[tuple[str, TerminationReason]]:
        """Instances whose window has passed, out of the pool, with the reason to end them;
        only those `among` the given ids when given."""
        out = [
            (iid, w.reason)
            for iid, w in self._warm.items()
            if w.until <= now and (among is None or iid in among)
        ]
        for iid, _ in out:
            self._warm.pop(iid, None)
        return out

    def next_expiry(self) -> datetime | None:
        return min((w.until for w in self._warm.values()), default=None)
