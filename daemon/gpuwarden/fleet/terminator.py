"""Ending instances: commit the intent, call destroy, confirm, retry for as long as it takes.

`end()` commits TERMINATING with the reason first (the intent is on record before any call),
then makes one destroy attempt. `drive()` is one attempt: destroy, then confirm with `get()`;
the instance becomes TERMINATED only when the provider no longer knows it or says it is
terminated. A failed or unconfirmed attempt is retried with capped exponential backoff
(1 s, 2 s, 4 s ... 60 s) forever: a leaked GPU costs more than a few extra API calls.

The retry schedule is kept in memory (the supervisor builds one Terminator per process);
the attempt count is persisted in `Instance.extra["destroy_attempts"]`. After a restart every
TERMINATING instance is due at once. Escalations are logged once each (warning on the first
failures, error after ESCALATE_AFTER attempts or ESCALATE_AGE), and recorded as
`destroy_retry` events only when the level changes.

An instance with no provider id (its launch outcome is unknown) cannot be destroyed by id:
the reconciler adopts it when the provider lists our label, then it is destroyed here.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import structlog

from gpuwarden.core import policy
from gpuwarden.core.clock import Clock
from gpuwarden.core.model import Billing, EntityKind, Instance, InstanceState, TerminationReason
from gpuwarden.providers.base import Provider, ProviderInstance, ProviderState
from gpuwarden.store import IllegalTransition, NotFoundError, Store, StoreWriteFailed
from gpuwarden.system import crashpoints

log = structlog.get_logger(__name__)

BACKOFF_MIN = 1.0  # seconds
BACKOFF_MAX = 60.0
ESCALATE_AFTER = 10  # attempts before a failing destroy is logged at error level
ESCALATE_AGE = timedelta(minutes=5)
_WARNING, _ERROR = 1, 2
_LEVEL_NAMES = {_WARNING: "warning", _ERROR: "error"}
_GONE = frozenset({InstanceState.TERMINATED, InstanceState.LAUNCH_FAILED})


def backoff(attempts: int) -> float:
    """Seconds before retry number `attempts` (1-based): 1, 2, 4, ... capped at 60."""
    return float(min(BACKOFF_MAX, BACKOFF_MIN * 2.0 ** max(0, attempts - 1)))


@dataclass
class _Unwritten:
    """An ending decided (and maybe confirmed) that the store could not yet write."""

    reason: TerminationReason
    details: dict[str, Any]
    at: datetime
    confirmed_at: datetime | None = None


@dataclass
class _Retry:
    attempts: int
    at: datetime  # next attempt due
    level: int = 0  # 0 quiet, 1 warning, 2 error


class Terminator:
    """One per process: its retry schedule must not be split. Every state change it makes is
    a store event, which is what wakes the guard and the jobs loop."""

    def __init__(self, store: Store, clock: Clock, providers: Mapping[str, Provider]) -> None:
        self.store = store
        self.clock = clock
        self.providers = providers
        self._retry: dict[str, _Retry] = {}
        # Ending a GPU on time comes before writing it down: when the store cannot write
        # (a full disk), the ending goes ahead from memory and is written when it can be.
        self._unwritten: dict[str, _Unwritten] = {}
        self._inflight: set[str] = set()
        # Called with an instance id when an attempt on it ends (its retry time is set, or
        # it is gone): the guard plans that instance again, whoever made the attempt.
        self.attempt_listeners: list[Callable[[str], None]] = []
        # Failed destroy attempts since start, by provider (for /metrics).
        self.retries: dict[str, int] = {}

    # --- the schedule ---------------------------------------------------------------

    def retry_at(self, inst: Instance, now: datetime) -> datetime | None:
        """When `drive(inst)` is next due; None while an attempt is in flight or while the
        instance has no provider id (the reconciler must find it first)."""
        if inst.id in self._inflight or inst.provider_id is None:
            return None
        r = self._retry.get(inst.id)
        return now if r is None else r.at

    @property
    def busy(self) -> bool:
        """True while a destroy attempt is in flight."""
        return bool(self._inflight)

    @property
    def retrying(self) -> bool:
        """True while some destroy waits for a retry."""
        return bool(self._retry)

    def attempts(self, instance_id: str) -> int:
        r = self._retry.get(instance_id)
        return 0 if r is None else r.attempts

    # --- ending ---------------------------------------------------------------------

    async def begin(
        self,
        instance_id: str,
        reason: TerminationReason,
        details: Mapping[str, Any] | None = None,
    ) -> Instance:
        """Commit TERMINATING with `reason` (the intent). Idempotent: an instance already
        terminating keeps its first reason; an ended one is returned unchanged."""
        inst = await self.store.get_instance(instance_id)
        if inst.id in self._unwritten:
            return self.overlay(inst)
        if inst.state is InstanceState.TERMINATING or inst.state in _GONE:
            return inst
        try:
            inst = await self.store.transition_instance(
                instance_id, InstanceState.TERMINATING, reason=reason, details=details
            )
        except IllegalTransition:  # raced with another ender: theirs stands
            return await self.store.get_instance(instance_id)
        except StoreWriteFailed as exc:
            self._unwritten[inst.id] = _Unwritten(reason, dict(details or {}), self.clock.now())
            log.error(
                "termination_intent_unwritten",
                instance_id=inst.id,
                provider=inst.provider,
                reason=reason.value,
                error=str(exc),
            )
            return self.overlay(inst)
        log.info(
            "instance_terminating",
            instance_id=inst.id,
            provider=inst.provider,
            provider_id=inst.provider_id,
            reason=reason.value,
        )
        crashpoints.hit("after_terminating_commit")
        return inst

    async def end(
        self,
        instance_id: str,
        reason: TerminationReason,
        details: Mapping[str, Any] | None = None,
    ) -> Instance:
        """Commit the intent, then make one destroy attempt. Returns the instance as it
        stands afterwards (TERMINATED when the provider confirmed at once)."""
        inst = await self.begin(instance_id, reason, details)
        due = self.retry_at(inst, self.clock.now())
        # Already failing? Its backoff stands: a repeated request is not a new attempt.
        if inst.state is InstanceState.TERMINATING and due is not None and due <= self.clock.now():
            await self.drive(inst)
            # As the Terminator knows it: on a full disk the row has not caught up yet.
            inst = self.overlay(await self.store.get_instance(instance_id))
        return inst

    def claim(self, inst: Instance) -> bool:
        """Mark an attempt as in flight before its task starts (so a second pass of the
        guard does not start another). False when one is in flight or cannot be made."""
        if inst.provider_id is None or inst.id in self._inflight:
            return False
        self._inflight.add(inst.id)
        return True

    async def drive(self, inst: Instance, *, claimed: bool = False) -> bool:
        """One attempt: destroy, confirm, and on success go TERMINATED. True when done.
        Never raises for provider trouble (it schedules a retry instead). `claimed`: the
        caller already holds the in-flight mark from `claim()`."""
        if not claimed and not self.claim(inst):
            return False
        assert inst.provider_id is not None
        try:
            return await self._attempt(inst, inst.provider_id)
        finally:
            self._inflight.discard(inst.id)
            for listener in list(self.attempt_listeners):
                listener(inst.id)

    async def _attempt(self, inst: Instance, provider_id: str) -> bool:
        provider = self.providers.get(inst.provider)
        if provider is None:
            await self._failed(inst, f"provider {inst.provider!r} is not configured")
            return False
        try:
            await provider.destroy(provider_id)
            crashpoints.hit("after_destroy_call")
            seen = await provider.get(provider_id)
        except Exception as exc:  # any failure: retry later, never give up
            await self._failed(inst, f"{type(exc).__name__}: {exc}")
            return False
        if not gone(seen):
            assert seen is not None
            await self._failed(inst, f"still listed as {seen.state.value} after destroy")
            return False
        return await self.confirmed(inst)

    async def confirmed(
        self,
        inst: Instance,
        details: Mapping[str, Any] | None = None,
        *,
        reason: TerminationReason | None = None,
    ) -> bool:
        """The provider no longer has it: TERMINATED (writes the termination record), with
        `reason` in place of the one it was ended for when given."""
        self._retry.pop(inst.id, None)
        pending = self._unwritten.get(inst.id)
        if pending is not None:
            pending.confirmed_at = self.clock.now()
            log.info(
                "instance_terminated", instance_id=inst.id, provider=inst.provider, unwritten=True
            )
            await self.flush()
            return True
        try:
            done = await self.store.transition_instance(
                inst.id, InstanceState.TERMINATED, reason=reason, details=details
            )
        except IllegalTransition:  # someone else confirmed first
            return True
        log.info(
            "instance_terminated",
            instance_id=done.id,
            provider=done.provider,
            provider_id=done.provider_id,
            reason=done.reason.value if done.reason else None,
            cost=round(self._cost(done), 4),
        )
        return True

    # --- endings the store could not write yet ------------------------------------------

    def overlay(self, inst: Instance) -> Instance:
        """`inst` as the Terminator knows it: an ending it could not write yet shows as
        TERMINATING (or TERMINATED once confirmed), whatever the row still says."""
        pending = self._unwritten.get(inst.id)
        if pending is None or inst.state in _GONE:
            return inst
        if pending.confirmed_at is not None:
            return replace(inst, state=InstanceState.TERMINATED, terminated_at=pending.confirmed_at)
        return replace(
            inst, state=InstanceState.TERMINATING, reason=pending.reason, terminating_at=pending.at
        )

    @property
    def unwritten(self) -> int:
        return len(self._unwritten)

    async def flush(self) -> None:
        """Write the endings kept in memory, oldest first; stop at the first that still
        cannot be written (the disk is still full)."""
        for iid, pending in list(self._unwritten.items()):
            try:
                await self._write_late(iid, pending)
            except StoreWriteFailed:
                return
            except (IllegalTransition, NotFoundError):
                pass  # another writer recorded its end meanwhile
            self._unwritten.pop(iid, None)
            log.warning("termination_written_late", instance_id=iid, reason=pending.reason.value)

    async def _write_late(self, iid: str, pending: _Unwritten) -> None:
        inst = await self.store.get_instance(iid)
        late = {**pending.details, "written_late": True}
        if inst.state is not InstanceState.TERMINATING and inst.state not in _GONE:
            inst = await self.store.transition_instance(
                iid,
                InstanceState.TERMINATING,
                reason=pending.reason,
                details=late,
                terminating_at=pending.at,
            )
        if pending.confirmed_at is not None and inst.state not in _GONE:
            await self.store.transition_instance(
                iid, InstanceState.TERMINATED, details=late, terminated_at=pending.confirmed_at
            )

    @staticmethod
    def _cost(inst: Instance) -> float:
        return policy.termination_of(inst, inst.terminated_at or inst.created_at).cost

    async def _failed(self, inst: Instance, error: str) -> None:
        now = self.clock.now()
        r = self._retry.get(inst.id)
        if r is None:
            r = _Retry(attempts=int(inst.extra.get("destroy_attempts", 0)), at=now)
            self._retry[inst.id] = r
        r.attempts += 1
        r.at = now + timedelta(seconds=backoff(r.attempts))
        self.retries[inst.provider] = self.retries.get(inst.provider, 0) + 1
        since = inst.terminating_at or now
        level = _ERROR if r.attempts >= ESCALATE_AFTER or now - since >= ESCALATE_AGE else _WARNING
        extra = {**inst.extra, "destroy_attempts": r.attempts}
        fields = {
            "instance_id": inst.id,
            "provider": inst.provider,
            "provider_id": inst.provider_id,
            "attempts": r.attempts,
            "retry_in_s": backoff(r.attempts),
            "error": error,
        }
        if level != r.level:
            r.level = level
            if level == _ERROR:
                log.error("destroy_retry", **fields)
            else:
                log.warning("destroy_retry", **fields)
            details = {k: v for k, v in fields.items() if k != "instance_id"}
            details["level"] = _LEVEL_NAMES[level]
            await self._quiet(
                self.store.record(
                    EntityKind.INSTANCE, inst.id, "destroy_retry", details, updates={"extra": extra}
                )
            )
        else:
            log.debug("destroy_retry", **fields)
            await self._quiet(self.store.update_instance(inst.id, extra=extra))

    @staticmethod
    async def _quiet(write: Any) -> None:
        """A bookkeeping write that must not stop the retries if it fails."""
        try:
            await write
        except Exception as exc:
            log.warning("destroy_bookkeeping_failed", error=str(exc))

    # --- orphans --------------------------------------------------------------------

    async def orphan(self, seen: ProviderInstance, *, instance_id: str | None = None) -> Instance:
        """Track a labelled provider instance that matches nothing live: insert it as
        TERMINATING with reason orphan (so it has a termination record), then destroy it."""
        store = self.store
        now = self.clock.now()
        iid, label = await self._free_identity(seen, instance_id)
        row = Instance(
            id=iid,
            provider=seen.provider,
            label=label,
            state=InstanceState.TERMINATING,
            created_at=seen.started_at or now,
            lease_until=now,
            last_activity=now,
            price_per_hour=seen.price_per_hour,
            gpu=seen.gpu_name,
            num_gpus=seen.num_gpus,
            region=seen.region,
            provider_id=seen.provider_id,
            provider_started_at=seen.started_at,
            terminating_at=now,
            reason=TerminationReason.ORPHAN,
            billing=self._billing_of(seen.provider),
        )
        await store.insert_instance(
            row, details={"reason": "orphan", "provider_id": seen.provider_id}
        )
        await store.record(
            EntityKind.INSTANCE,
            iid,
            "orphan_found",
            {"provider": seen.provider, "provider_id": seen.provider_id, "label": seen.label},
            reason=TerminationReason.ORPHAN.value,
        )
        log.warning(
            "orphan_found",
            instance_id=iid,
            provider=seen.provider,
            provider_id=seen.provider_id,
            label=seen.label,
            reason=TerminationReason.ORPHAN.value,
        )
        await self.drive(row)
        return await store.get_instance(iid)

    def _billing_of(self, provider: str) -> Billing:
        p = self.providers.get(provider)
        return p.billing if p is not None else Billing.PER_SECOND

    async def _free_identity(
        self, seen: ProviderInstance, instance_id: str | None
    ) -> tuple[str, str]:
        """Our id and label for an orphan row: the ones its label names when free (labels
        of plain rows always name their own id), otherwise a fresh id and a unique label."""
        if instance_id is not None:
            try:
                await self.store.get_instance(instance_id)
            except NotFoundError:
                return instance_id, seen.label
        return secrets.token_hex(4), f"{seen.label}/{seen.provider}/{seen.provider_id}"


def gone(seen: ProviderInstance | None) -> bool:
    """The provider confirms an instance no longer exists (or is terminated)."""
    return seen is None or seen.state is ProviderState.TERMINATED
