"""The reconciler: makes the database agree with what each provider is really running.

At start-up (before READY) and then every policy.poll_interval (every BOOT_POLL while an
instance is being launched, so that it is used soon after it boots), for each provider:
- list the instances whose label starts with `gpuwarden-<installation>-`;
- adopt what matches a REQUESTED intent (a crash or an unclear answer hid the provider id);
- destroy what matches nothing live (reason orphan; a row is inserted so the orphan has a
  termination record);
- copy the provider's state into ours (pending -> provisioning, running -> running with the
  SSH endpoint and the provider's start time);
- confirm TERMINATING instances that are no longer listed, with `get()`;
- mark an instance vanished (the provider ended it) only after two consecutive misses past
  policy.vanish_grace since its creation, and after `get()` agrees (listings lag); the
  reason is `deadman` instead when the instance's dead-man switch had cause to end it by the
  time it was first missed (policy.vanish_reason: silent for deadman_timeout, or past
  hard_cap + deadman_margin), typically found by the first pass after a daemon restart;
- mark a REQUESTED intent launch_failed after two misses past the grace period;
- end a spot instance the provider shows outbid at once (reason preempted, fleet/preemption.py).
A provider whose listing fails is skipped for this pass (and logged), never read as
"nothing exists". Then the account: credit under budget.credit_floor, or InsufficientCredit
from any call, ends everything and pauses the queue; recorded spend past a budget limit
ends everything with reason budget. Last, the state dir's free space (a warning while it is
under daemon.low_disk_mb).
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any

import structlog

from gpuwarden.core.clock import format_ts
from gpuwarden.core.heartbeat import BEAT_EVERY
from gpuwarden.core.model import (
    EntityKind,
    Event,
    Instance,
    InstanceState,
    TerminationReason,
    label_prefix,
)
from gpuwarden.fleet import budget, preemption
from gpuwarden.fleet.app import App
from gpuwarden.fleet.ended import provider_ended
from gpuwarden.fleet.launcher import record_provider_id, running_fields
from gpuwarden.fleet.terminator import gone
from gpuwarden.providers.base import (
    InsufficientCredit,
    Provider,
    ProviderInstance,
    ProviderState,
)
from gpuwarden.store import IllegalTransition, NotFoundError
from gpuwarden.system.disk import LowDiskWarning

log = structlog.get_logger(__name__)

MISSES_TO_VANISH = 2
BOOT_POLL = timedelta(seconds=3)  # the listing's pace while an instance is booting
LISTED_CHUNK = 250  # listed instances reconciled between two yields to the event loop
_STATE_OF = {ProviderState.PENDING: InstanceState.PROVISIONING}


class Reconciler:
    name = "reconciler"

    def __init__(self, app: App) -> None:
        self.app = app
        self.terminator = app.terminator
        self.passes = 0
        self.asleep = asyncio.Event()  # set while the loop sleeps (tests wait on it)
        self._misses: dict[str, int] = {}  # instance id -> consecutive misses past grace
        self._first_missed: dict[str, datetime] = {}  # instance id -> first of those misses
        self._list_failing: set[str] = set()  # providers whose last listing failed
        self._launched = asyncio.Event()  # a launch began: look sooner (BOOT_POLL)
        self.disk = LowDiskWarning()  # checked once a pass: the state dir's free space

    async def start(self) -> None:
        """One full pass before READY, so a restart finds what a crash hid at once."""
        await self.pass_once()

    async def run(self) -> None:
        app = self.app
        app.heartbeats.register(self.name)
        last_pass = app.clock.now()
        unsubscribe = app.store.subscribe(self._on_event)
        try:
            while not app.stopping.is_set():
                # Computed each time round: a launch since the last pass shortens the wait.
                next_pass = last_pass + await self._interval()
                if app.clock.now() >= next_pass:
                    await self._safe_pass()
                    last_pass = app.clock.now()
                    next_pass = last_pass + await self._interval()
                app.heartbeats.beat(self.name)
                beat = app.clock.now() + timedelta(seconds=BEAT_EVERY)
                self.asleep.set()
                await app.clock.sleep_until(min(next_pass, beat), interrupt=self._launched)
                self.asleep.clear()
        finally:
            unsubscribe()

    def _on_event(self, event: Event) -> None:
        if event.kind is EntityKind.INSTANCE and event.to_state == InstanceState.REQUESTED.value:
            self._launched.set()

    async def _interval(self) -> timedelta:
        """policy.poll_interval, or BOOT_POLL while an instance is being launched: its SSH
        address comes only from a listing, and an instance is not running (nor probed) before
        that, so a booted instance would otherwise wait a whole poll to be used."""
        interval = self.app.settings.policy.poll_interval
        try:
            booting = await self.app.store.instances(
                [InstanceState.REQUESTED, InstanceState.PROVISIONING]
            )
        except Exception:  # the store's trouble is the pass's to report, not the pacing's
            return interval
        return min(interval, BOOT_POLL) if booting else interval

    async def _safe_pass(self) -> None:
        try:
            await self.pass_once()
        except Exception:  # a bug in one pass must not stop the next
            log.exception("reconcile_pass_failed")

    async def pass_once(self) -> None:
        prefix = label_prefix(self.app.installation)
        for name, provider in list(self.app.providers.items()):
            try:
                listed = await provider.list_instances(prefix)
            except InsufficientCredit as exc:
                await budget.credit_stop(self.app, provider=name, why=str(exc))
                continue
            except Exception as exc:
                self._list_failed(name, exc)
                continue
            if name in self._list_failing:
                self._list_failing.discard(name)
                log.info("provider_list_recovered", provider=name)
            await self._reconcile(name, provider, listed, prefix)
            await self._account(name, provider)
        await self._budget()
        daemon = self.app.settings.daemon
        self.disk.check(daemon.state_dir, int(daemon.low_disk_mb * 1e6), self.app.clock.monotonic())
        self.passes += 1

    def _list_failed(self, name: str, exc: Exception) -> None:
        if name not in self._list_failing:  # log state changes, not repeats
            self._list_failing.add(name)
            log.warning("provider_list_failed", provider=name, error=f"{type(exc).__name__}: {exc}")

    # --- one provider ---------------------------------------------------------------

    async def _reconcile(
        self, name: str, provider: Provider, listed: list[ProviderInstance], prefix: str
    ) -> None:
        ours = [i for i in await self.app.store.live_instances() if i.provider == name]
        by_pid = {i.provider_id: i for i in ours if i.provider_id is not None}
        by_id = {i.id: i for i in ours}
        matched: set[str] = set()
        for n, seen in enumerate(listed):
            if n % LISTED_CHUNK == LISTED_CHUNK - 1:
                await asyncio.sleep(0)  # thousands listed: let a due deadline go first
            inst = by_pid.get(seen.provider_id)
            if inst is None:
                named = by_id.get(seen.label.removeprefix(prefix))
                if named is not None and named.provider_id is None:
                    matched.add(named.id)  # its label is listed: not a miss, whatever follows
                inst = await self._unmatched(seen, by_id, prefix)
            if inst is not None:
                matched.add(inst.id)
                self._forget_misses(inst.id)
                await self._sync(inst, seen)
        now = self.app.clock.now()
        for inst in ours:
            if inst.id not in matched and inst.id not in self.app.launching:
                await self._missing(inst, provider, now)

    async def _unmatched(
        self, seen: ProviderInstance, by_id: dict[str, Instance], prefix: str
    ) -> Instance | None:
        """A listed instance whose provider id we do not hold for a live row. Returns the
        live row it now belongs to, or None when it was destroyed as an orphan or is a
        stale listing of one we already ended."""
        iid = seen.label.removeprefix(prefix) if seen.label.startswith(prefix) else None
        inst = by_id.get(iid) if iid else None
        if inst is not None and inst.provider_id is None and iid not in self.app.launching:
            await self._adopt(inst, seen)
            return None
        if iid in self.app.launching:
            return None  # the launch call will record it
        known = await self.app.store.find_instance(seen.provider, seen.provider_id)
        if known is not None and not known.state.live:
            # Ended by us and confirmed; the listing lags or the destroy was lost. Destroy
            # again (idempotent), without a second termination record.
            if not gone(seen) and seen.state is not ProviderState.TERMINATING:
                log.warning(
                    "ended_instance_still_listed",
                    instance_id=known.id,
                    provider=known.provider,
                    provider_id=seen.provider_id,
                )
                await self._destroy_quietly(seen)
            return None
        if gone(seen):
            return None
        await self.terminator.orphan(seen, instance_id=iid)
        return None

    async def _adopt(self, inst: Instance, seen: ProviderInstance) -> None:
        """Record the provider id on an intent whose launch outcome was unknown, then end
        it (reason orphan): nobody waits for it any more (the launch call returned an
        error, or died with the previous daemon), so every minute it runs is waste."""
        log.warning(
            "instance_adopted",
            instance_id=inst.id,
            provider=inst.provider,
            provider_id=seen.provider_id,
            state=inst.state.value,
            reason=TerminationReason.ORPHAN.value,
        )
        details = {"provider_id": seen.provider_id, "why": "adopted: its launch was abandoned"}
        if inst.state is InstanceState.REQUESTED:
            try:
                ended = await self.app.store.transition_instance(
                    inst.id,
                    InstanceState.TERMINATING,
                    reason=TerminationReason.ORPHAN,
                    details=details,
                    provider_id=seen.provider_id,
                    provider_started_at=seen.started_at,
                )
            except (IllegalTransition, NotFoundError):
                return  # changed under us; the next pass sees the new state
            await self.terminator.drive(ended)
        else:  # TERMINATING without an id: keep its reason, destroy by the id found
            await record_provider_id(self.app, inst.id, seen.provider_id, seen)

    async def _destroy_quietly(self, seen: ProviderInstance) -> None:
        provider = self.app.providers.get(seen.provider)
        if provider is None:
            return
        try:
            await provider.destroy(seen.provider_id)
        except Exception as exc:
            log.warning("destroy_failed", provider=seen.provider, error=str(exc))

    async def _sync(self, inst: Instance, seen: ProviderInstance) -> None:
        """Copy the provider's view into ours."""
        store = self.app.store
        try:
            if inst.state is InstanceState.TERMINATING:
                if gone(seen):
                    await self.terminator.confirmed(inst, {"confirmed_by": "listing"})
                return
            if gone(seen) or seen.state is ProviderState.TERMINATING:
                await self._vanished(inst, f"provider lists it as {seen.state.value}")
                return
            if await preemption.end_if_preempted(self.app, inst, seen, noticed_by="reconciler"):
                return
            fields: dict[str, Any] = {}
            if seen.started_at is not None and inst.provider_started_at != seen.started_at:
                fields["provider_started_at"] = seen.started_at
            if seen.state is ProviderState.RUNNING:
                endpoint = running_fields(seen)
                if inst.state is not InstanceState.RUNNING:
                    await store.transition_instance(
                        inst.id, InstanceState.RUNNING, details=endpoint, **endpoint, **fields
                    )
                    log.info("instance_running", instance_id=inst.id, provider=inst.provider)
                    return
                fields |= {k: v for k, v in endpoint.items() if getattr(inst, k) != v}
            if fields:
                # An event, not a silent update: the provider's start time may move the hard
                # cap, and the event is what wakes the guard.
                await store.record(
                    EntityKind.INSTANCE,
                    inst.id,
                    "provider_updated",
                    {k: format_ts(v) if isinstance(v, datetime) else v for k, v in fields.items()},
                    updates=fields,
                )
        except (IllegalTransition, NotFoundError):
            return  # changed under us; the next pass sees the new state

    async def _missing(self, inst: Instance, provider: Provider, now: datetime) -> None:
        limits = self.app.limits()
        if inst.state is InstanceState.TERMINATING and inst.provider_id is not None:
            await self._confirm_if_gone(inst, inst.provider_id, provider, now)
            return
        if now < inst.created_at + limits.vanish_grace:
            return  # too young: listings lag
        misses = self._misses.get(inst.id, 0) + 1
        self._misses[inst.id] = misses
        self._first_missed.setdefault(inst.id, now)
        if misses < MISSES_TO_VANISH:
            return
        if inst.provider_id is None:
            await self._never_found(inst)
            return
        try:
            seen = await provider.get(inst.provider_id)
        except Exception:
            return
        if gone(seen):
            await self._vanished(inst, f"not listed in {misses} passes")
        else:
            self._forget_misses(inst.id)  # the listing lags; get() still sees it

    def _forget_misses(self, instance_id: str) -> None:
        self._misses.pop(instance_id, None)
        self._first_missed.pop(instance_id, None)

    async def _confirm_if_gone(
        self, inst: Instance, provider_id: str, provider: Provider, now: datetime
    ) -> None:
        """A TERMINATING instance no longer listed: TERMINATED once `get()` agrees."""
        if self.terminator.retry_at(inst, now) is None:
            return  # an attempt is in flight; it confirms by itself
        try:
            seen = await provider.get(provider_id)
        except Exception:
            return  # the guard's retries go on
        if gone(seen):
            await self.terminator.confirmed(inst, {"confirmed_by": "reconciler"})

    async def _never_found(self, inst: Instance) -> None:
        """An intent without a provider id that no listing shows: nothing was created."""
        self._forget_misses(inst.id)
        try:
            if inst.state is InstanceState.REQUESTED:
                await self.app.store.transition_instance(
                    inst.id,
                    InstanceState.LAUNCH_FAILED,
                    reason=TerminationReason.LAUNCH_FAILED,
                    details={"why": "the provider never listed it"},
                )
                log.warning(
                    "launch_failed",
                    instance_id=inst.id,
                    provider=inst.provider,
                    reason=TerminationReason.LAUNCH_FAILED.value,
                )
            elif inst.state is InstanceState.TERMINATING:  # ended before it was found
                # Nothing was created (the daemon died before the provider call, say): the
                # record says so, not the reason it was being ended for, and costs $0.
                await self.terminator.confirmed(
                    inst,
                    {"why": "the provider never listed it", "ending": inst.reason},
                    reason=TerminationReason.LAUNCH_FAILED,
                )
        except (IllegalTransition, NotFoundError):
            return

    async def _vanished(self, inst: Instance, why: str) -> None:
        """The provider no longer runs it and we did not end it (fleet/ended.py)."""
        first_missed = self._first_missed.get(inst.id, self.app.clock.now())
        self._forget_misses(inst.id)
        await provider_ended(self.app, inst.id, why, first_missed)

    # --- money ----------------------------------------------------------------------

    async def _account(self, name: str, provider: Provider) -> None:
        floor = self.app.settings.budget.credit_floor
        try:
            account = await provider.account()
        except InsufficientCredit as exc:
            await budget.credit_stop(self.app, provider=name, why=str(exc))
            return
        except Exception as exc:
            log.debug("account_read_failed", provider=name, error=str(exc))
            return
        if account.credit is not None:
            self.app.credit[name] = account.credit
        if account.credit is not None and account.credit < floor:
            await budget.credit_stop(
                self.app,
                provider=name,
                why=f"credit ${account.credit:.2f} is under the floor ${floor:.2f}",
            )

    async def _budget(self) -> None:
        st = await budget.state(self.app, self.app.clock.now())
        window = budget.passed_limit(st)
        if window is not None:
            await budget.budget_stop(self.app, window)
