"""The warm pool of the jobs loop: idle instances kept for the next job, until when, and the
idle gaps that keep_warm = "auto" learns its window from.

The pool itself is in memory (after a restart the jobs loop puts idle instances back from
the store). Each idle gap is also an `idle_gap` event (entity `daemon`/`jobs.idle_gaps`), so
that what "auto" learned survives a restart: `restore` reads the newest ones back. The choices
are pure functions of `weighing`; this class holds their inputs and reads instance rows to
check that a warm instance still lives.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from gpuwarden.core.clock import parse_ts
from gpuwarden.core.model import EntityKind, Event, Instance, Job, TerminationReason
from gpuwarden.jobs import decisions as queue
from gpuwarden.jobs import spot, weighing
from gpuwarden.store import NotFoundError, Store

GAPS_ENTITY = "jobs.idle_gaps"  # the daemon entity whose idle_gap events hold the gaps


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

    async def restore(self) -> None:
        """The gaps a previous run learned, from their events (the newest GAP_HISTORY)."""
        events = await self._store.events(
            kind=EntityKind.DAEMON, entity_id=GAPS_ENTITY, newest=True, limit=weighing.GAP_HISTORY
        )
        self._gaps = [gap for e in events if (gap := _gap_of(e)) is not None]

    async def note_arrival(self, job: Job) -> None:
        """The first job submitted after an instance went idle closes an idle gap (kept in
        memory and recorded as an event)."""
        if self._idle_since is not None and job.created_at >= self._idle_since:
            gap = weighing.Gap(job.created_at, (job.created_at - self._idle_since).total_seconds())
            self._gaps = weighing.note_gap(self._gaps, gap)
            self._idle_since = None
            await self._store.record(
                EntityKind.DAEMON,
                GAPS_ENTITY,
                "idle_gap",
                {"at": gap.at.isoformat(), "seconds": round(gap.seconds, 3), "job_id": job.id},
            )

    @property
    def gaps(self) -> tuple[weighing.Gap, ...]:
        return tuple(self._gaps)

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

    async def fit(
        self, job: Job, default_gpu_ram_gb: float, avoid: frozenset[str] = frozenset()
    ) -> Instance | None:
        """A warm instance that fits the job, the most recently used first (so that the
        others stay idle and expire), none of `avoid`; instances that ended meanwhile leave
        the pool."""
        for iid in weighing.most_recent_first({k: w.since for k, w in self._warm.items()}):
            if iid in avoid:
                continue
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

    def since_of(self, instance_id: str) -> datetime | None:
        """When a warm instance went idle (None if it is not in the pool)."""
        warm = self._warm.get(instance_id)
        return warm.since if warm is not None else None

    async def record_idle(
        self,
        instance_id: str,
        since: datetime | None,
        now: datetime,
        *,
        job_id: str | None = None,
        saved_wait_s: float = 0.0,
    ) -> None:
        """Put a warm period on record (a `warm_idle` event, which `costs` sums): the idle
        seconds and what they billed, and, when job `job_id` took the instance, the cold start
        that job did not wait through. A period of no length that no job ended is not one."""
        idle_s = max(0.0, (now - since).total_seconds()) if since is not None else 0.0
        if idle_s <= 0 and job_id is None:
            return
        try:
            price = (await self._store.get_instance(instance_id)).price_per_hour
        except NotFoundError:
            return
        await self._store.record(
            EntityKind.INSTANCE,
            instance_id,
            "warm_idle",
            {
                "idle_s": round(idle_s, 3),
                "cost": round(price * idle_s / 3600.0, 6),
                "job_id": job_id,
                "saved_wait_s": round(max(0.0, saved_wait_s), 3) if job_id else 0.0,
            },
        )

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


def _gap_of(event: Event) -> weighing.Gap | None:
    """The gap an idle_gap event holds; None for one that does not parse (skipped)."""
    at, seconds = event.details.get("at"), event.details.get("seconds")
    if not isinstance(at, str) or isinstance(seconds, bool) or not isinstance(seconds, int | float):
        return None
    try:
        when = parse_ts(at)
    except ValueError:
        return None
    if when is None or not math.isfinite(seconds) or seconds < 0:
        return None
    return weighing.Gap(when, float(seconds))
