"""The watchdog: an SSH health and activity probe for every running instance.

Every policy.watchdog_interval each RUNNING instance is probed once over SSH with
policy.probe_timeout. Probe times are staggered: an instance's probes fall on fixed slots,
offset from the epoch by a hash of its id over the interval, so a fleet's probes spread out
instead of coming in bursts (and keep their phase across daemon restarts). An instance that
has never been probed (it just started running) is probed at once.

The probe (remote/assets/probe.sh, a fixed script: no user text) refreshes the dead-man
switch's heartbeat file and reports interactive sessions, GPU utilisation and our job runners.

- A failed probe (timeout, refused, auth failure, garbled answer) is one strike: one `strike`
  event, `strikes` and `last_probe_*` updated. policy.watchdog_failures consecutive strikes end
  the instance with reason watchdog through the Terminator.
- A good probe clears the strikes (one `probe_recovered` event when there were any).
- Activity (GPU over policy.gpu_busy_percent, a user session, a live runner) moves
  `last_activity` so the guard's idle rule counts it: an `activity` event, written only when
  it moves last_activity by more than ACTIVITY_STEP (a minute; less for short idle timeouts),
  and the guard is woken.
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any, Protocol

import asyncssh
import structlog

from gpuwarden.core.heartbeat import BEAT_EVERY
from gpuwarden.core.model import EntityKind, Event, Instance, InstanceState, TerminationReason
from gpuwarden.core.policy import strikes_after, struck_out
from gpuwarden.fleet import preemption
from gpuwarden.fleet.app import App
from gpuwarden.fleet.ended import provider_ended
from gpuwarden.fleet.terminator import gone as provider_gone
from gpuwarden.loops.probes import (
    ACTIVITY_STEP,
    ONE_US,
    ProbeFailed,
    ProbeResult,
    activity_step,
    next_probe_at,
    parse_probe,
    probe_offset,
)
from gpuwarden.remote import hostkeys
from gpuwarden.remote import ssh as remote
from gpuwarden.remote.deadman import switch_can_end
from gpuwarden.remote.deploy import deploy_file
from gpuwarden.store import NotFoundError

__all__ = [  # the probe's pure parts live in probes.py; callers and tests import them here
    "ACTIVITY_STEP",
    "ProbeFailed",
    "ProbeResult",
    "Prober",
    "SshProber",
    "Watchdog",
    "activity_step",
    "next_probe_at",
    "parse_probe",
    "probe_offset",
    "probe_script",
]

log = structlog.get_logger(__name__)

PROBE_CONCURRENCY = 64  # probes in flight at once
# A good probe that changes nothing but the probe time is written with the others of this
# span in one transaction: 10,000 instances probed every 5 minutes are 33 probes a second,
# and a transaction (an fsync) each cost more CPU than the probes.
PROBE_WRITE_EVERY = timedelta(seconds=BEAT_EVERY)


@cache
def probe_script() -> str:
    """The fixed probe script (read once)."""
    return deploy_file("probe.sh")


# --- the port and its SSH implementation -----------------------------------------------------


class Prober(Protocol):
    async def probe(self, inst: Instance, timeout: float) -> ProbeResult:
        """Probe one instance; raises ProbeFailed when it does not answer well in time."""
        ...


class SshProber:
    """Probes over SSH with the daemon's key: one connection, one fixed command. The host key
    is pinned to the one the instance showed first; the operators' keys (ssh.authorized_keys)
    are put on it over the same connection whenever it does not have them yet."""

    def __init__(
        self,
        key: Callable[[], asyncssh.SSHKey],
        known_hosts: Path | None = None,
        authorized_keys: Callable[[], Sequence[str]] = tuple,
    ) -> None:
        self._key = key
        self._known_hosts = known_hosts
        self._authorized_keys = authorized_keys

    async def probe(self, inst: Instance, timeout: float) -> ProbeResult:
        if not inst.ssh_host or not inst.ssh_port:
            raise ProbeFailed("no_endpoint", "the instance has no SSH address")
        target = remote.SshTarget(inst.ssh_host, inst.ssh_port, inst.ssh_user)
        try:
            async with asyncio.timeout(timeout):
                conn = await remote.connect(
                    target,
                    self._key(),
                    timeout=timeout,
                    known_hosts=self._known_hosts,
                    host_key=inst.extra.get("host_key"),
                )
                async with conn:
                    res = await remote.run(conn, ["sh", "-c", probe_script()], timeout)
                    digest = await hostkeys.ensure_authorized_keys(
                        conn, list(self._authorized_keys()), inst.extra.get("keys")
                    )
                    host_key = hostkeys.server_host_key(conn)
        except TimeoutError as exc:  # also asyncssh's command timeout
            raise ProbeFailed("timeout", f"no answer within {timeout:g}s") from exc
        except asyncssh.PermissionDenied as exc:
            raise ProbeFailed("auth", str(exc)) from exc
        except ConnectionRefusedError as exc:
            raise ProbeFailed("refused", str(exc)) from exc
        except (OSError, asyncssh.Error) as exc:
            raise ProbeFailed("error", f"{type(exc).__name__}: {exc}") from exc
        if res.exit_status not in (0, None):
            raise ProbeFailed("bad_answer", f"exit {res.exit_status}: {res.stderr.strip()[:200]}")
        return replace(parse_probe(res.stdout), host_key=host_key, keys=digest)


def _app_key(app: App) -> Callable[[], asyncssh.SSHKey]:
    """The daemon's SSH key: the App's (the supervisor loads it), else loaded here once."""
    loaded: list[asyncssh.SSHKey] = []

    def key() -> asyncssh.SSHKey:
        if app.ssh_key is not None:
            return app.ssh_key
        if not loaded:
            loaded.append(remote.daemon_key(app.settings)[0])
        return loaded[0]

    return key


# --- the service -----------------------------------------------------------------------------


class Watchdog:
    name = "watchdog"

    def __init__(self, app: App, prober: Prober | None = None) -> None:
        self.app = app
        self.prober = prober or SshProber(
            _app_key(app), app.settings.ssh.known_hosts, lambda: app.settings.ssh.authorized_keys
        )
        # Each running instance's next probe, and a heap of (time, id) over it (an entry
        # whose time is no longer the plan's is stale).
        self._due: dict[str, datetime] = {}
        self._heap: list[tuple[datetime, str]] = []
        self._arrived: set[str] = set()  # started running since the last tick
        self._synced = False
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._probed: dict[str, datetime] = {}  # good probe times not yet written
        self._written_at: datetime | None = None
        # At most this many probes at once: a restart or a clock jump that makes much of a
        # big fleet due together opens a bounded number of SSH connections.
        self._slots = asyncio.Semaphore(PROBE_CONCURRENCY)
        # Set when an instance starts running, so its first probe does not wait for a beat.
        self._wake = asyncio.Event()
        self._unsubscribe: Callable[[], None] | None = app.store.subscribe(self._on_event)
        if prober is None:
            probe_script()  # fail at start-up, not at the first probe, if it is missing

    def _on_event(self, event: Event) -> None:
        if event.kind is EntityKind.INSTANCE and event.to_state == InstanceState.RUNNING.value:
            self._arrived.add(event.entity_id)
            self._wake.set()

    @property
    def interval(self) -> float:
        return max(1.0, self.app.settings.policy.watchdog_interval.total_seconds())

    async def start(self) -> None:
        """Nothing to prepare: the first pass runs as soon as the loop starts."""

    async def run(self) -> None:
        if self._unsubscribe is None:  # restarted after a failure
            self._unsubscribe = self.app.store.subscribe(self._on_event)
        self._synced = False  # events may have been missed meanwhile
        try:
            while not self.app.stopping.is_set():
                self.app.heartbeats.beat(self.name)
                wake = await self.tick()
                await self.write_probe_times()
                await self.app.clock.sleep_until(wake, interrupt=self._wake)
        finally:
            await self.write_probe_times(force=True)
            self._unsubscribe()
            self._unsubscribe = None
            for task in list(self._tasks.values()):
                task.cancel()
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    async def tick(self) -> datetime:
        """Start the probes that are due; returns when to look again (within BEAT_EVERY).

        The work is what is due, not the fleet: probe times sit on a heap, instances join it
        when they start running (a store event; all RUNNING ones on the first tick) and leave
        it when their turn finds them no longer running."""
        now = self.app.clock.now()
        live = self.app.store.live
        if not self._synced:
            self._synced = True
            self._arrived |= {i.id for i in live.select([InstanceState.RUNNING])}
        arrived, self._arrived = self._arrived, set()
        for iid in arrived:
            inst = live.get(iid)
            if inst is None or inst.state is not InstanceState.RUNNING or iid in self._due:
                continue
            # Never probed (it just came up): at once, to confirm it and start its
            # heartbeat. Probed before (a daemon restart): its own slot, so that a
            # restart does not probe the whole fleet in one burst.
            first = next_probe_at(iid, self.interval, now - ONE_US)
            self._plan(iid, now if inst.last_probe_at is None else first)
        while self._heap and self._heap[0][0] <= now:
            at, iid = heapq.heappop(self._heap)
            if self._due.get(iid) != at:
                continue  # stale
            inst = live.get(iid)
            if inst is None or inst.state is not InstanceState.RUNNING:
                del self._due[iid]
                continue
            self._plan(iid, next_probe_at(iid, self.interval, now))
            busy = self._tasks.get(iid)
            if busy is not None and not busy.done():
                continue  # the last probe is still out: this slot is skipped, not stacked
            task = asyncio.create_task(self._probe_one(iid), name=f"probe-{iid}")
            self._tasks[iid] = task
            task.add_done_callback(self._forget)
        wake = now + timedelta(seconds=BEAT_EVERY)
        return min(wake, self._heap[0][0]) if self._heap else wake

    async def write_probe_times(self, *, force: bool = False) -> None:
        """Write the good probes' times held back (at most PROBE_WRITE_EVERY after the
        probe), in one transaction; those of instances no longer running are dropped."""
        now = self.app.clock.now()
        if (
            not force
            and self._written_at is not None
            and now - self._written_at < PROBE_WRITE_EVERY
        ):
            return
        self._written_at = now
        live = self.app.store.live
        held, self._probed = self._probed, {}
        changes = {
            iid: {"last_probe_at": at}
            for iid, at in held.items()
            if (inst := live.get(iid)) is not None and inst.state is InstanceState.RUNNING
        }
        if not changes:
            return
        try:
            await self.app.store.update_instances(changes)
        except Exception:  # the disk: the next write tries again, unless newer news came
            log.exception("probe_times_not_written", instances=len(changes))
            self._probed = {**held, **self._probed}

    def _plan(self, instance_id: str, at: datetime) -> None:
        self._due[instance_id] = at
        heapq.heappush(self._heap, (at, instance_id))

    def _forget(self, task: asyncio.Task[None]) -> None:
        iid = task.get_name().removeprefix("probe-")
        if self._tasks.get(iid) is task:
            del self._tasks[iid]

    async def probes_done(self) -> None:
        """Wait for the probes in flight (tests use this after `tick`)."""
        await asyncio.gather(*list(self._tasks.values()))

    async def _probe_one(self, instance_id: str) -> None:
        try:
            inst = await self.app.store.get_instance(instance_id)
            if inst.state is not InstanceState.RUNNING:
                return
            timeout = self.app.settings.policy.probe_timeout.total_seconds()
            try:
                async with self._slots:
                    result = await self.prober.probe(inst, timeout)
            except ProbeFailed as exc:
                await self._failed(instance_id, exc)
                return
            await self._passed(instance_id, result)
        except Exception:  # a bug or a store error: log it, the next slot tries again
            log.exception("probe_error", instance_id=instance_id)

    async def _fresh(self, instance_id: str) -> Instance | None:
        """The instance as it is now, if it is still RUNNING (it may have changed during the
        probe: a strike on an instance already ending is noise)."""
        try:
            inst = await self.app.store.get_instance(instance_id)
        except NotFoundError:
            return None
        return inst if inst.state is InstanceState.RUNNING else None

    async def _failed(self, instance_id: str, exc: ProbeFailed) -> None:
        self._probed.pop(instance_id, None)  # this answer is newer
        inst = await self._fresh(instance_id)
        if inst is None:
            return
        # A spot instance that stopped answering may have been outbid: then it is ended
        # as preempted (the same call the reconciler makes), not struck.
        if preemption.is_spot(inst) and await preemption.check(
            self.app, inst, noticed_by="watchdog"
        ):
            return
        limits = self.app.limits()
        limit = limits.watchdog_failures
        strikes = strikes_after(inst, probe_ok=False)
        now = self.app.clock.now()
        details = {"strike": strikes, "of": limit, "error": exc.kind, "message": exc.message}
        await self.app.store.record(
            EntityKind.INSTANCE,
            instance_id,
            "strike",
            details,
            updates={"strikes": strikes, "last_probe_at": now, "last_probe_ok": False},
        )
        log.warning(
            "probe_failed",
            instance_id=instance_id,
            provider=inst.provider,
            strike=strikes,
            of=limit,
            error=exc.kind,
            message=exc.message,
        )
        if struck_out(strikes, limits):
            await self._terminate(inst, strikes, exc)

    async def _terminate(self, inst: Instance, strikes: int, exc: ProbeFailed) -> None:
        if await self._provider_ended_it(inst, strikes):
            return
        reason = TerminationReason.WATCHDOG
        details = {"strikes": strikes, "error": exc.kind}
        log.warning(
            "watchdog_verdict",
            instance_id=inst.id,
            provider=inst.provider,
            reason=reason.value,
            strikes=strikes,
        )
        # The intent is committed first; an instance already ending keeps its first reason.
        await self.app.terminator.end(inst.id, reason, details)

    async def _provider_ended_it(self, inst: Instance, strikes: int) -> bool:
        """Probes fail when the machine is gone: if the provider says it ended it, that is
        the record (vanished, or deadman), not a watchdog verdict. An unclear answer leaves
        the verdict to the watchdog (it ends what may still bill)."""
        provider = self.app.providers.get(inst.provider)
        if provider is None or inst.provider_id is None:
            return False
        try:
            seen = await provider.get(inst.provider_id)
        except Exception:
            return False
        if not provider_gone(seen):
            return False
        why = f"the provider no longer has it ({strikes} failed probes)"
        return await provider_ended(self.app, inst.id, why, self.app.clock.now())

    async def _note_switch(self, inst: Instance, switch: str | None) -> None:
        """Keep what the probe says of the dead-man switch on the instance (extra["deadman"],
        shown by `status`); one `deadman` event per change, and a warning when a switch that
        should be able to end the instance is not armed."""
        if switch is None or switch == inst.extra.get("deadman"):
            return
        await self.app.store.record(
            EntityKind.INSTANCE,
            inst.id,
            "deadman",
            {"switch": switch},
            updates={"extra": {**inst.extra, "deadman": switch}},
        )
        if switch != "armed" and switch_can_end(self.app.settings, inst.provider):
            log.warning(
                "deadman_not_armed", instance_id=inst.id, provider=inst.provider, switch=switch
            )

    async def _note_ssh(self, inst: Instance, result: ProbeResult) -> Instance:
        """On the first good probe, keep the host key the instance showed (trust on first
        use: later connections must see the same one) with an `ssh_ready` event, and rewrite
        the known_hosts file `gpuwarden ssh` checks against; keep which operators' keys are
        on it. Returns the instance as updated."""
        extra = dict(inst.extra)
        if result.keys is not None:
            extra["keys"] = result.keys
        first = result.host_key is not None and "host_key" not in extra
        if first:
            extra["host_key"] = result.host_key
        if extra == inst.extra:
            return inst
        if first and result.host_key is not None:
            details = {"host_key": hostkeys.fingerprint(result.host_key)}
            await self.app.store.record(
                EntityKind.INSTANCE, inst.id, "ssh_ready", details, updates={"extra": extra}
            )
            await self.write_known_hosts()
        else:
            await self.app.store.update_instance(inst.id, extra=extra)
        return await self.app.store.get_instance(inst.id)

    async def write_known_hosts(self) -> None:
        """<state_dir>/known_hosts from the live instances whose host key is known."""
        entries = [
            (i.ssh_host, i.ssh_port, str(i.extra["host_key"]))
            for i in await self.app.store.live_instances()
            if i.ssh_host and i.ssh_port and i.extra.get("host_key")
        ]
        try:
            hostkeys.write_known_hosts(hostkeys.known_hosts_path(self.app.settings), entries)
        except OSError as exc:  # `gpuwarden ssh` cannot check this host; the probe still counts
            log.warning("known_hosts_not_written", error=str(exc))

    async def _passed(self, instance_id: str, result: ProbeResult) -> None:
        inst = await self._fresh(instance_id)
        if inst is None:
            return
        now = self.app.clock.now()
        store = self.app.store
        strikes = strikes_after(inst, probe_ok=True)
        updates: dict[str, Any] = {"strikes": strikes, "last_probe_at": now, "last_probe_ok": True}
        if inst.strikes > 0:
            await store.record(
                EntityKind.INSTANCE,
                instance_id,
                "probe_recovered",
                {"after_strikes": inst.strikes},
                updates=updates,
            )
            log.info(
                "probe_recovered",
                instance_id=instance_id,
                provider=inst.provider,
                after_strikes=inst.strikes,
            )
            updates = {}
        if not result.heartbeat:
            log.warning("heartbeat_not_refreshed", instance_id=instance_id)
        inst = await self._note_ssh(inst, result)
        await self._note_switch(inst, result.switch())
        policy = self.app.settings.policy
        why = result.activity(policy.gpu_busy_percent)
        if why and now - inst.last_activity > activity_step(policy.idle_timeout):
            await store.record(
                EntityKind.INSTANCE,
                instance_id,
                "activity",
                {"source": "probe", "why": why, **result.to_json()},
                updates={**updates, "last_activity": now},
            )
        elif updates and inst.last_probe_ok and inst.strikes == 0:
            self._probed[instance_id] = now  # only the probe time moved: written in a batch
            return
        elif updates:
            await store.update_instance(instance_id, **updates)
        self._probed.pop(instance_id, None)  # written just now, with newer news
