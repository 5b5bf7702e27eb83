"""The "jobs" service: dispatch queued jobs onto instances, recover after a restart, and
give each instance back after its job (reuse, keep warm, or end it).

One loop (`run`) owns a TaskGroup with one task per job being driven. Where things stand is
in the store (job and instance rows, events); what is only in memory here is which instance
is busy with which job, which are warm and until when, what each rented machine offers, the
idle gaps keep_warm "auto" learns from and the recent job lengths.
After a restart `start()` rebuilds all of that from the store (see `_recover`).

Instances per job, in order:
1. a warm instance that fits (the most recently used; no new rental); else, if a live
   instance (booting or busy) will be free for it sooner than a cold start is worth
   (weighing.choose, with jobs.wait_weight), the job waits for it; else the cheapest offer
   that meets the job, across enabled providers, launched through the guard's launch path
   (NoCapacity or a refused launch: the next offer);
2. wait for SSH, at most jobs.ssh_wait: on timeout the instance is ended (launch_failed)
   and the job queued again with attempt + 1, avoiding that offer;
3. the runner (runner.py) drives the job to succeeded / failed / cancelled;
4. after the job: a waiting job that fits takes the instance; else it stays warm for the
   keep-warm window (fixed, or weighing.adaptive_window for "auto") and is then ended
   (idle), or at once (job_done) when the window is 0.

Each pass also lets `jobs.warm_schedule` rent with no job (warm_keeper.py): up to
`min_warm` per open window, and a fresh instance for a warm one near its hard cap or lease.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from datetime import datetime, timedelta
from typing import Any

import structlog

from gpuwarden.core.heartbeat import BEAT_EVERY
from gpuwarden.core.model import (
    QUEUE_PAUSED_FLAG,
    EntityKind,
    Event,
    Instance,
    InstanceState,
    Job,
    JobState,
    TerminationReason,
)
from gpuwarden.fleet import preemption
from gpuwarden.fleet.app import App
from gpuwarden.jobs import decisions as queue
from gpuwarden.jobs import weighing
from gpuwarden.jobs.dispatcher import Dispatcher
from gpuwarden.jobs.renting import EndFn, LaunchFn, default_end, default_launch
from gpuwarden.jobs.runner import Connector, Outcome, Runner, SshConnector
from gpuwarden.jobs.warm_keeper import WarmKeeping
from gpuwarden.jobs.warm_pool import WarmPool
from gpuwarden.store import IllegalTransition, NotFoundError

log = structlog.get_logger(__name__)

ACTIVE = (JobState.PROVISIONING, JobState.RUNNING, JobState.FETCHING)
DISPATCH_CHUNK = 100  # queued jobs weighed between two yields to the event loop


class JobService(WarmKeeping):
    name = "jobs"

    def __init__(
        self,
        app: App,
        *,
        connector: Connector | None = None,
        launch: LaunchFn = default_launch,
        end: EndFn = default_end,
    ) -> None:
        super().__init__(app, launch=launch, end=end)
        self._connector = connector
        self._busy: dict[str, str] = {}  # instance id -> job id
        self._launching = 0
        self._warm = WarmPool(app.store, self._caps)
        self._dispatcher = Dispatcher(
            app.store, lambda: self.settings, self._busy, self._caps, self._cold_start_guess
        )
        self.typical_job_s = self._dispatcher.typical_job_s
        self._recovered: list[tuple[Job, Instance]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._tg: asyncio.TaskGroup | None = None
        self._ran = False
        self._queue: tuple[int, list[Job]] | None = None  # (store.jobs_version, the queue)
        self._init_keeping()

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
            self._dispatcher.reset()
            self._launching = 0
            self._init_keeping()
            await self._recover()
        self._ran = True
        unsubscribe = self.app.store.subscribe(self._on_event)
        try:
            await self._run_tasks()
        finally:
            unsubscribe()

    def _on_event(self, event: Event) -> None:
        # An instance of ours (rented for a job, busy or warm) that ended frees capacity for
        # the queue. The end of any other instance changes nothing the queue counts, so it
        # does not cost a pass over the queue: a burst of deadlines across a fleet would.
        ended = event.kind is EntityKind.INSTANCE and event.to_state == InstanceState.TERMINATED
        ours = "job_id" in event.details or event.entity_id in self._busy
        if ended and (ours or event.entity_id in self._warm.ids()):
            self.app.jobs_wake.set()

    async def _run_tasks(self) -> None:
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
            # Only what this pass's dispatch could see may expire in it: an instance a job
            # left while the pass ran (a window of 0 is due at once) waits for the next pass,
            # whose dispatch gives a waiting job the chance to take it first.
            seen = self._warm.ids()
            if not await self.app.store.get_flag(QUEUE_PAUSED_FLAG, False):
                queued = await self._queued()  # not read while paused
                await self._dispatch(queue.runnable(queued, now))
                backoff_end = queue.next_wake(queued, now)
                if backoff_end is not None:
                    wake = min(wake, backoff_end)
            await self._expire_warm(clock.now(), seen)
            await self._keep_schedule(clock.now())
            expiry = self._warm.next_expiry()
            if expiry is not None:
                wake = min(wake, expiry)
            await clock.sleep_until(wake, interrupt=self.app.jobs_wake)

    async def _queued(self) -> list[Job]:
        """The queue as last read, read again only after a write to the jobs table: a pass
        every few seconds with nothing changed would parse a thousand rows each time."""
        version = self.app.store.jobs_version
        if self._queue is None or self._queue[0] != version:
            self._queue = (version, await self.app.store.jobs([JobState.QUEUED]))
        return self._queue[1]

    def _spawn(self, coro: Coroutine[Any, Any, None], job_id: str) -> None:
        assert self._tg is not None
        task = self._tg.create_task(coro, name=f"job-{job_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- dispatch ------------------------------------------------------------------------

    def _in_use(self) -> int:
        return len(self._busy) + len(self._warm) + self._launching

    async def _dispatch(self, jobs: list[Job]) -> None:
        waiting = 0  # jobs of this pass left queued for a live instance
        ending = await self._ending_soon(self.app.clock.now()) if jobs else frozenset()
        for n, job in enumerate(jobs):
            if n % DISPATCH_CHUNK == DISPATCH_CHUNK - 1:
                await asyncio.sleep(0)  # a thousand queued jobs: let a due deadline go first
            await self._warm.note_arrival(job)
            inst = await self._warm.fit(job, self.settings.gpu_ram_gb, ending)
            if inst is not None:
                if await self._assign(job, inst):
                    self._spawn(self._drive(job, inst), job.id)
                continue
            can_rent = self._in_use() < self.settings.max_instances or len(self._warm) > 0
            now = self.app.clock.now()
            choice = await self._dispatcher.choose(job, now, ahead=waiting, can_rent=can_rent)
            if choice.action == "wait":
                # A live instance that fits takes it when it is free (its end wakes the loop).
                waiting += 1
                continue
            if self._in_use() >= self.settings.max_instances and not await self._free_a_slot():
                return
            if await self._claim(job, None):
                self._launching += 1
                self._dispatcher.renting(job, now)
                self._spawn(self._drive(job, None), job.id)

    async def _free_a_slot(self) -> bool:
        """At capacity with a warm instance no waiting job could use: end it for a new one."""
        sinces = {iid: self._warm.since_of(iid) for iid in self._warm.ids()}
        iid = self._warm.evict_one()
        if iid is None:
            return False
        await self._warm.record_idle(iid, sinces.get(iid), self.app.clock.now())
        await self._end(iid, TerminationReason.IDLE)
        return True

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
        since = self._warm.since_of(inst.id)
        self._warm.take(inst.id)
        saved = await self._cold_start_s(inst)  # what it would have waited for a new one
        await self._warm.record_idle(
            inst.id, since, self.app.clock.now(), job_id=job.id, saved_wait_s=saved
        )
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
            try:
                ready = await self._wait_ready(job, inst, fresh=launched)
            finally:
                self._dispatcher.ready(job.id)
            if ready is None:
                return
            after = ready
            await self._run(job, ready)
        except Exception as exc:
            log.exception("job_driver_error", job_id=job.id, error=str(exc))
            await self._requeue(job.id, f"internal error: {type(exc).__name__}: {exc}")
        finally:
            self._dispatcher.ready(job.id)  # also when the launch failed
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
        if outcome is Outcome.SUCCEEDED:
            done = await self.app.store.get_job(job.id)
            # Installing the engine and downloading the model: the machine's first use.
            first_use = sum(float(done.extra.get(k) or 0.0) for k in ("setup_s", "download_s"))
            await self._remember_setup(inst, first_use)
        elif outcome in (Outcome.DIED, Outcome.LOST):
            # A spot machine that was outbid kills the runner and drops SSH, in either order:
            # ask before taking it for a fault (the same end the reconciler would make).
            fresh = await self.app.store.get_instance(inst.id)
            if preemption.is_spot(fresh):
                await preemption.check(self.app, fresh, noticed_by="jobs")
            if outcome is Outcome.DIED and not await self._preempted(inst.id):
                await self._requeue(job.id, "the runner died on the instance")
            else:
                await self._requeue_lost(job.id, inst, "it went away or stopped answering")

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
        ended with reason idle, or job_done when the window is 0. Inside a `warm_schedule`
        window that wants it, it stays at least until that window closes (the guard still
        ends it at its lease, hard cap or budget)."""
        now = self.app.clock.now()
        window = self._warm.window(
            self.settings.keep_warm,
            now,
            await self._cold_start_s(inst),
            self.settings.wait_weight,
        )
        if self.settings.warm_schedule:
            kept = (self._warm.ids() | self._busy.keys()) - {inst.id} - self._being_replaced()
            others = [i.gpu for i in await self.app.store.live_instances() if i.id in kept]
            closes = weighing.scheduled_until(self.settings.warm_schedule, inst.gpu, others, now)
            if closes is not None and closes - since > window:
                window = closes - since
                self._note_kept(inst.id, closes)
                log.info("instance_kept_by_schedule", instance_id=inst.id, until=closes.isoformat())
        self._warm.hold(inst, since, window)
        return window

    async def _active_until_job_end(self, inst: Instance, job_id: str) -> datetime:
        """Move the instance's last activity to the end of the job (returned), so that its
        idle deadline counts from there. While the job ran the guard treated it as busy, but
        last_activity only moved with the runner's rate-limited touches (none while booting
        or fetching). A job queued again (its runner died) ends now."""
        job = await self.app.store.get_job(job_id)
        ended = job.finished_at if job.state.terminal and job.finished_at else None
        self._dispatcher.finished(job)
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
        return end

    async def _expire_warm(self, now: datetime, among: frozenset[str] | None = None) -> None:
        sinces = {iid: self._warm.since_of(iid) for iid in self._warm.ids()}
        for iid, reason in self._warm.due(now, among):
            await self._warm.record_idle(iid, sinces.get(iid), now)
            await self._end(iid, reason)

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
            if inst is None:
                await self._requeue(job.id, "its instance is gone (found after a restart)")
                continue
            if not inst.state.live or inst.state is InstanceState.TERMINATING:
                await self._requeue_lost(job.id, inst, "gone (found after a restart)")
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
        await self._recover_schedule(live)
        await self._warm.restore()

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
