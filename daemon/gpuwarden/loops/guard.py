"""The guard: ends every instance at its exact deadline, and drives terminations to the end.

Event-driven, no fixed poll: each pass loads the live instances, asks `policy.decide` for a
verdict at `now`, commits the intent for those due (the destroy calls run as tasks, so a slow
provider never delays another instance's deadline), starts the retries that are due, then
sleeps until the earliest next deadline or retry time, or until the store records an event
that may move a deadline (any instance event but progress and retry notes: launches,
extensions, activity, strikes, state changes; and a config reload), and at most BEAT_EVERY so
that its heartbeat stays fresh. Store events are the one way to wake it.
An instance whose deadline is 0.3 s away is ended 0.3 s from now.
"""

from __future__ import annotations

import asyncio
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

    async def start(self) -> None:
        """Nothing to prepare: the first pass runs as soon as the loop starts."""

    def settled(self) -> bool:
        """Asleep with no wake-up pending: no event, and its planned wake-up still ahead (a
        pass that took long may plan one that is already due). Tests wait on this instead of
        on time."""
        due = self.next_wake is not None and self.next_wake <= self.app.clock.now()
        return self.asleep.is_set() and not self._wake.is_set() and not due

    def _on_event(self, event: Event) -> None:
        # Any instance change may move a deadline earlier (a new launch, a strike), and so
        # may new limits.
        instance = event.kind is EntityKind.INSTANCE and event.name not in _QUIET_EVENTS
        if instance or (event.kind is EntityKind.DAEMON and event.name == CONFIG_RELOADED):
            self._wake.set()

    async def run(self) -> None:
        app = self.app
        app.heartbeats.register(self.name)
        unsubscribe = app.store.subscribe(self._on_event)
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

    async def _safe_pass(self, tasks: asyncio.TaskGroup) -> datetime:
        """A pass that fails (a database hiccup) is logged and tried again in a second,
        without dropping the destroy attempts in flight."""
        try:
            return await self.pass_once(tasks)
        except Exception:
            log.exception("guard_pass_failed")
            return self.app.clock.now() + timedelta(seconds=1)

    async def pass_once(self, tasks: asyncio.TaskGroup) -> datetime:
        """Judge every live instance at `now`; returns when the next pass is due."""
        app = self.app
        limits = app.limits()
        now = app.clock.now()
        wake = now + timedelta(seconds=BEAT_EVERY)
        if self.terminator.unwritten:
            await self.terminator.flush()
            if self.terminator.unwritten:  # the disk is still full: try again in a second,
                wake = now + timedelta(seconds=1)  # so a restart is unlikely to lose them
        live = [self.terminator.overlay(i) for i in await app.store.live_instances()]
        busy = await busy_instances(app) if live else set()
        for inst in live:
            if inst.state is InstanceState.TERMINATED:
                continue  # confirmed gone; only its record waits for the disk
            if inst.state is InstanceState.TERMINATING:
                at = self.terminator.retry_at(inst, now)
                if at is None:
                    continue
                if at <= now:
                    self._spawn_drive(tasks, inst)
                else:
                    wake = min(wake, at)
                continue
            verdict = policy.decide(inst, observations(inst, busy), limits, now)
            if verdict.terminate is None:
                wake = min(wake, verdict.next_check)
                continue
            lag = round(max(0.0, (now - verdict.deadline).total_seconds()), 3)
            app.metrics.guard_lag.observe(lag)
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
        self.passes += 1
        return wake

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
