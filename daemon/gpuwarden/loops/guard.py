"""The guard: ends every instance at its exact deadline, and drives terminations to the end.

Event-driven, no fixed poll, and each pass costs what changed, not the size of the fleet: the
guard keeps a heap of each live instance's next check (its earliest deadline or retry time).
A pass judges only the instances that are due on the heap, that a store event named (any
instance event but progress and retry notes: launches, extensions, activity, strikes, state
changes), whose destroy attempt just ended, or whose job started or ended; it asks
`policy.decide` for their verdict at `now` (the rows come from the store's in-memory view),
commits the intent for those due, earliest deadline first (the destroy calls run as tasks, so
a slow provider never delays another instance's deadline), starts the retries that are due,
and plans the rest again. The first pass, a config reload (new limits move every deadline)
and endings the store could not write judge every live instance. Between passes it sleeps
until the heap's earliest time or an event, and at most BEAT_EVERY so that its heartbeat
stays fresh. An instance whose deadline is 0.3 s away is ended 0.3 s from now.
"""

from __future__ import annotations

import asyncio
import heapq
from datetime import datetime, timedelta

import structlog

from gpuwarden.core import policy
from gpuwarden.core.heartbeat import BEAT_EVERY
from gpuwarden.core.model import (
    CONFIG_RELOADED,
    EntityKind,
    Event,
    Instance,
    InstanceState,
)
from gpuwarden.fleet.app import App
from gpuwarden.fleet.busy import busy_instances, observations

log = structlog.get_logger(__name__)

_QUIET_EVENTS = frozenset({"destroy_retry", "progress"})  # never move a deadline


class Guard:
    name = "guard"

    def __init__(self, app: App) -> None:
        self.app = app
        self.terminator = app.terminator
        self.passes = 0
        self._wake = asyncio.Event()
        # Set while the loop sleeps between passes (tests wait on it instead of on time).
        self.asleep = asyncio.Event()
        self.next_wake: datetime | None = None
        # The plan: instance id -> its next check, and a heap of (time, id) over it (an entry
        # whose time is no longer the plan's is stale and skipped).
        self._plan: dict[str, datetime] = {}
        self._heap: list[tuple[datetime, str]] = []
        self._changed: set[str] = set()  # judge these on the next pass
        self._everything = True  # judge every live instance on the next pass
        self._busy: set[str] = set()  # instances with a job, as of the last pass
        self.judged = 0  # instances judged, over all passes (the benchmark reads it)

    async def start(self) -> None:
        """Nothing to prepare: the first pass runs as soon as the loop starts."""

    def settled(self) -> bool:
        """Asleep with no wake-up pending: no event, and its planned wake-up still ahead (a
        pass that took long may plan one that is already due). Tests wait on this instead of
        on time."""
        due = self.next_wake is not None and self.next_wake <= self.app.clock.now()
        return self.asleep.is_set() and not self._wake.is_set() and not due

    def _on_event(self, event: Event) -> None:
        # Any instance change may move its deadline earlier (a new launch, a strike), and
        # new limits may move every deadline.
        if event.kind is EntityKind.INSTANCE and event.name not in _QUIET_EVENTS:
            self._changed.add(event.entity_id)
            self._wake.set()
        elif event.kind is EntityKind.DAEMON and event.name == CONFIG_RELOADED:
            self._everything = True
            self._wake.set()

    def _on_attempt(self, instance_id: str) -> None:
        # A destroy attempt ended (ours or a control request's): its retry time is set, or
        # it is gone.
        self._changed.add(instance_id)
        self._wake.set()

    async def run(self) -> None:
        app = self.app
        app.heartbeats.register(self.name)
        unsubscribe = app.store.subscribe(self._on_event)
        self.terminator.attempt_listeners.append(self._on_attempt)
        self._everything = True  # a restarted loop judges everything again
        try:
            async with asyncio.TaskGroup() as tasks:
                while not app.stopping.is_set():
                    wake = await self._safe_pass(tasks)
                    app.heartbeats.beat(self.name)
                    self.next_wake = wake
                    self.asleep.set()
                    await app.clock.sleep_until(wake, interrupt=self._wake)
                    self.asleep.clear()
        finally:
            unsubscribe()
            self.terminator.attempt_listeners.remove(self._on_attempt)

    async def _safe_pass(self, tasks: asyncio.TaskGroup) -> datetime:
        """A pass that fails (a database hiccup) is logged and tried again in a second,
        without dropping the destroy attempts in flight."""
        try:
            return await self.pass_once(tasks)
        except Exception:
            log.exception("guard_pass_failed")
            self._everything = True
            return self.app.clock.now() + timedelta(seconds=1)

    def _schedule(self, instance_id: str, at: datetime) -> None:
        if self._plan.get(instance_id) != at:
            self._plan[instance_id] = at
            heapq.heappush(self._heap, (at, instance_id))

    def _to_judge(self, now: datetime, busy: set[str]) -> list[str]:
        """The ids this pass judges, earliest planned first."""
        if self._everything:
            self._everything = False
            self._changed.clear()
            self._plan.clear()
            self._heap = []
            ids = {i.id for i in self.app.store.live.select()}
        else:
            ids, self._changed = self._changed, set()
            ids |= busy ^ self._busy  # a job started or ended on these
            while self._heap and self._heap[0][0] <= now:
                at, iid = heapq.heappop(self._heap)
                if self._plan.get(iid) == at:
                    ids.add(iid)
        self._busy = busy
        for iid in ids:
            self._plan.pop(iid, None)
        return list(ids)

    def _next_planned(self) -> datetime | None:
        while self._heap and self._plan.get(self._heap[0][1]) != self._heap[0][0]:
            heapq.heappop(self._heap)  # stale
        return self._heap[0][0] if self._heap else None

    async def pass_once(self, tasks: asyncio.TaskGroup) -> datetime:
        """Judge the instances due or changed at `now`; returns when the next pass is due."""
        app = self.app
        limits = app.limits()
        now = app.clock.now()
        if self.terminator.unwritten:
            await self.terminator.flush()
            self._everything = True  # the overlay of what it flushed is gone
        # The disk is still full: try again in a second, so a restart is unlikely to lose them.
        retry_soon = bool(self.terminator.unwritten)
        busy = await busy_instances(app) if len(app.store.live) else set()
        due: list[tuple[Instance, policy.Verdict]] = []
        for iid in self._to_judge(now, busy):
            row = app.store.live.get(iid)
            if row is None:
                continue  # ended
            self.judged += 1
            verdict = self._judge(tasks, self.terminator.overlay(row), busy, limits, now)
            if verdict is not None:
                due.append((row, verdict))
        due.sort(key=lambda d: d[1].deadline)  # the most overdue first
        # Together: the store writes the intents that wait for it in one transaction.
        ended = await asyncio.gather(
            *(self._end(tasks, inst, verdict, now) for inst, verdict in due),
            return_exceptions=True,
        )
        for (inst, _), outcome in zip(due, ended, strict=True):
            if isinstance(outcome, BaseException):
                if not isinstance(outcome, Exception):
                    raise outcome  # a cancellation
                log.error("guard_end_failed", instance_id=inst.id, error=repr(outcome))
                self._changed.add(inst.id)  # judged again on the next pass
        self.passes += 1
        wake = now + timedelta(seconds=1 if retry_soon else BEAT_EVERY)
        planned = self._next_planned()
        return wake if planned is None else min(wake, planned)

    def _judge(
        self,
        tasks: asyncio.TaskGroup,
        inst: Instance,
        busy: set[str],
        limits: policy.Limits,
        now: datetime,
    ) -> policy.Verdict | None:
        """One instance: its verdict if it is due; else drive its ending if a retry is due,
        or plan its next check."""
        if inst.state is InstanceState.TERMINATED:
            return None  # confirmed gone; only its record waits for the disk
        if inst.state is InstanceState.TERMINATING:
            at = self.terminator.retry_at(inst, now)
            if at is None:
                return None  # in flight (its end re-plans it) or waiting for its provider id
            if at <= now:
                self._spawn_drive(tasks, inst)
            else:
                self._schedule(inst.id, at)
            return None
        verdict = policy.decide(inst, observations(inst, busy), limits, now)
        if verdict.terminate is None:
            self._schedule(inst.id, verdict.next_check)
            return None
        return verdict

    async def _end(
        self, tasks: asyncio.TaskGroup, inst: Instance, verdict: policy.Verdict, now: datetime
    ) -> None:
        assert verdict.terminate is not None
        lag = round(max(0.0, (now - verdict.deadline).total_seconds()), 3)
        self.app.metrics.guard_lag.observe(lag)
        ended = await self.terminator.begin(
            inst.id,
            verdict.terminate,
            {"why": verdict.why, "deadline": verdict.deadline.isoformat(), "lag_s": lag},
        )
        if ended.reason is verdict.terminate:  # not already ended for another reason
            log.info(
                "deadline_reached",
                instance_id=inst.id,
                provider=inst.provider,
                reason=verdict.terminate.value,
                why=verdict.why,
                lag_s=lag,
            )
        if ended.state is InstanceState.TERMINATING:
            self._spawn_drive(tasks, ended)

    def _spawn_drive(self, tasks: asyncio.TaskGroup, inst: Instance) -> None:
        if not self.terminator.claim(inst):
            return  # in flight, or waiting for the reconciler to find its provider id
        tasks.create_task(self._drive(inst), name=f"destroy-{inst.id}")

    async def _drive(self, inst: Instance) -> None:
        try:
            await self.terminator.drive(inst, claimed=True)
        except Exception:  # a bug must not take the guard down; the retry comes anyway
            log.exception("destroy_attempt_crashed", instance_id=inst.id, provider=inst.provider)
        finally:
            self._wake.set()  # re-plan: a retry time was set or it is gone
