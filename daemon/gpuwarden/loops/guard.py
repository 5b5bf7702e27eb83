"""The guard: ends every instance at its exact deadline, and drives terminations to the end.

Event-driven, no fixed poll: each pass loads the live instances, asks `policy.decide` for a
verdict at `now`, commits the intent for those due (the destroy calls run as tasks, so a slow
provider never delays another instance's deadline), starts the retries that are due, then
sleeps until the earliest next deadline or retry time, or until `app.guard_wake` (set by
launches, extensions, activity and any instance event), and at most BEAT_EVERY so that its
heartbeat stays fresh. An instance whose deadline is 0.3 s away is ended 0.3 s from now.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

import structlog

from gpuwarden.core import policy
from gpuwarden.core.heartbeat import BEAT_EVERY
from gpuwarden.core.model import EntityKind, Event, Instance, InstanceState, JobState
from gpuwarden.fleet.app import App
from gpuwarden.fleet.budget import limits_of
from gpuwarden.fleet.terminator import Terminator, terminator_for

log = structlog.get_logger(__name__)

# Jobs in these states hold their instance busy (activity at `now`).
BUSY_JOB_STATES = (JobState.PROVISIONING, JobState.RUNNING, JobState.FETCHING)
_QUIET_EVENTS = frozenset({"destroy_retry", "progress"})  # never move a deadline


async def busy_instances(app: App) -> set[str]:
    """Instances with a job on them (the jobs service owns those rows; we only read)."""
    jobs = await app.store.jobs(BUSY_JOB_STATES)
    return {j.instance_id for j in jobs if j.instance_id}


def observations(inst: Instance, busy: set[str]) -> policy.Observations:
    return policy.Observations(busy=inst.id in busy)


class Guard:
    name = "guard"

    def __init__(self, app: App, terminator: Terminator | None = None) -> None:
        self.app = app
        self.terminator = terminator or terminator_for(app)
        self.passes = 0
        # Set while the loop sleeps between passes (tests wait on it instead of on time).
        self.asleep = asyncio.Event()
        self.next_wake: datetime | None = None

    def _on_event(self, event: Event) -> None:
        # Any instance change may move a deadline earlier (a new launch, a strike).
        if event.kind is EntityKind.INSTANCE and event.name not in _QUIET_EVENTS:
            self.app.guard_wake.set()

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
                    await app.clock.sleep_until(wake, interrupt=app.guard_wake)
                    self.asleep.clear()
        finally:
            unsubscribe()

    async def _safe_pass(self, tasks: asyncio.TaskGroup) -> datetime:
        """A pass that fails (a database hiccup) is logged and tried again in a second,
        without dropping the destroy attempts in flight."""
        try:
            return await self.pass_once(tasks)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("guard_pass_failed")
            return self.app.clock.now() + timedelta(seconds=1)

    async def pass_once(self, tasks: asyncio.TaskGroup) -> datetime:
        """Judge every live instance at `now`; returns when the next pass is due."""
        app = self.app
        limits = limits_of(app)
        now = app.clock.now()
        wake = now + timedelta(seconds=BEAT_EVERY)
        live = await app.store.live_instances()
        busy = await busy_instances(app) if live else set()
        for inst in live:
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
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug must not take the guard down; the retry comes anyway
            log.exception("destroy_attempt_crashed", instance_id=inst.id, provider=inst.provider)
        finally:
            self.app.guard_wake.set()  # re-plan: a retry time was set or it is gone
