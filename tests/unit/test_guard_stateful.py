"""A hypothesis state machine over the whole cost guard: FakeProvider + FakeClock + a real
Store, with the real Guard and Reconciler loops running as tasks.

Rules: launches (some with provider faults: a 5xx that created nothing, a 5xx after the
instance was created, an error that carries an id), extensions, activity, manual destroys,
time passing, provider faults on destroy/get/list (5xx, a destroy that does nothing once,
listing lag), daemon crashes at each step of launch and termination followed by a restart
(the in-memory services dropped, the store reopened, new Guard/Reconciler/Terminator).

Invariant, after every step: every instance the provider bills is destroyed by

    max(its deadline, when the provider first lists it) + BOUND

where its deadline is the earliest of idle/lease/hard cap of our row (or, for an instance we
have no row for yet, the moment it becomes listable), and BOUND = poll_interval + the
backoff of the injected destroy failures (FAULT_BOUND). At the end (after a long quiet
period): nothing bills, every billed instance has exactly one row with exactly one
termination event and one termination record, with the right reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from guard_support import settings
from hypothesis import HealthCheck
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from tests.conftest import T0, eventually, open_app

from gpuwarden.control import instances as api
from gpuwarden.core import errors, policy
from gpuwarden.core.clock import FakeClock
from gpuwarden.core.model import (
    Instance,
    InstanceState,
    instance_label,
)
from gpuwarden.core.model import (
    TerminationReason as R,
)
from gpuwarden.fleet import launcher
from gpuwarden.fleet.app import App
from gpuwarden.fleet.limits import limits_from
from gpuwarden.loops.guard import Guard
from gpuwarden.loops.reconciler import Reconciler
from gpuwarden.providers.base import LaunchSpec
from gpuwarden.providers.fake import FakeProvider

# Durations scaled down (the rules are the same at any scale) so that an example is fast.
POLL = timedelta(seconds=10)
FAULT_BOUND = timedelta(seconds=1 + 2 + 4 + 8 + 16)  # at most 5 failed attempts in a row
BOUND = POLL + FAULT_BOUND
CONF: dict[str, Any] = dict(
    idle_timeout="20s",
    lease_min="60s",
    lease_default="90s",
    lease_max="180s",
    hard_cap="200s",
    poll_interval="10s",
    vanish_grace="20s",
)
TIME_REASONS = {R.IDLE, R.LEASE_EXPIRED, R.HARD_TIMEOUT}


class GuardMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.dir = Path(tempfile.mkdtemp(prefix="guard-sm-"))
        self.clock = FakeClock(T0)
        self.fake = FakeProvider(self.clock, "fake")
        self.conf = settings(self.dir, **CONF)
        self.limits = limits_from(self.conf)
        self.expect: dict[str, set[R]] = {}  # instance id -> acceptable reasons
        self.uncertain: set[str] = set()  # launches whose outcome was unknown
        self.lag_seen: timedelta = timedelta(0)
        self.tasks: list[asyncio.Task[None]] = []
        self.opened = contextlib.AsyncExitStack()  # the App of the current "daemon"
        self.app: App = self.run(self._boot())

    # --- plumbing -------------------------------------------------------------------

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    async def _boot(self) -> App:
        app = await self.opened.enter_async_context(open_app(self.conf, self.clock, [self.fake]))
        self.guard = Guard(app)
        self.reconciler = Reconciler(app)
        await self.reconciler.start()
        self.tasks = [
            asyncio.create_task(self.guard.run()),
            asyncio.create_task(self.reconciler.run()),
        ]
        self.app = app
        await self._quiet()
        return app

    async def _stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await self.opened.aclose()

    async def _quiet(self) -> None:
        term = self.app.terminator
        await eventually(
            lambda: self.guard.settled() and self.reconciler.asleep.is_set() and not term.busy,
            timeout=10,
            interval=0.001,
        )

    async def _advance(self, seconds: float) -> None:
        """Step time to each pending wake-up in turn, as a live daemon would see it."""
        target = self.clock.now() + timedelta(seconds=seconds)
        while True:
            await self._quiet()
            wake = self.clock.next_wake()
            if wake is None or wake > target:
                break
            await self.clock.advance((wake - self.clock.now()).total_seconds())
        await self.clock.advance((target - self.clock.now()).total_seconds())
        await self._quiet()

    async def _restart(self) -> None:
        await self._stop()
        await self._boot()

    def teardown(self) -> None:
        try:
            self.run(self._finish())
        finally:
            self.run(self._stop())
            self.loop.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    # --- rules: launches ------------------------------------------------------------

    async def _launch(self, offer: int, hours: float | None) -> str | None:
        before = {i.id for i in await self.app.store.instances()}
        try:
            inst = await launcher.launch(self.app, self.fake.offers[offer], hours=hours)
        except errors.DomainError:
            inst = None
        after = await self.app.store.instances()
        new = [i for i in after if i.id not in before]
        for i in new:
            self.expect.setdefault(i.id, set())
        return inst.id if inst else (new[0].id if new else None)

    @rule(offer=st.integers(0, 2), hours=st.sampled_from([None, 60 / 3600, 120 / 3600]))
    def launch(self, offer: int, hours: float | None) -> None:
        self.run(self._launch(offer, hours))

    @rule(kind=st.sampled_from(["5xx", "5xx_after_create", "created_with_error"]))
    def launch_with_fault(self, kind: str) -> None:
        f = self.fake.faults
        if kind == "5xx":
            f.fail_next["launch"] = 1
        elif kind == "5xx_after_create":
            f.transient_after_create_next = 1
        else:
            f.created_with_error_next = 1
        iid = self.run(self._launch(0, None))
        if iid is None:
            return
        if kind == "created_with_error":
            self.expect[iid] = {R.LAUNCH_FAILED}
        else:
            self.uncertain.add(iid)

    # --- rules: the owner -----------------------------------------------------------

    def _live_ids(self) -> list[str]:
        rows = self.run(self.app.store.live_instances())
        return [i.id for i in rows if i.state is not InstanceState.TERMINATING]

    @precondition(lambda self: bool(self._live_ids()))
    @rule(data=st.data(), hours=st.sampled_from([10 / 3600, 30 / 3600, 60 / 3600]))
    def extend(self, data: st.DataObject, hours: float) -> None:
        iid = data.draw(st.sampled_from(self._live_ids()))
        with contextlib.suppress(errors.DomainError):
            self.run(api.extend(self.app, id=iid, hours=hours, by="test"))

    @precondition(lambda self: bool(self._live_ids()))
    @rule(data=st.data())
    def activity(self, data: st.DataObject) -> None:
        iid = data.draw(st.sampled_from(self._live_ids()))
        with contextlib.suppress(errors.DomainError):
            self.run(api.activity(self.app, id=iid, by="test"))

    @precondition(lambda self: bool(self._live_ids()))
    @rule(data=st.data())
    def destroy(self, data: st.DataObject) -> None:
        iid = data.draw(st.sampled_from(self._live_ids()))
        row = self.run(self.app.store.get_instance(iid))
        if row.state is InstanceState.TERMINATING or not row.state.live:
            return
        self.expect[iid] = {R.MANUAL}
        self.run(api.destroy(self.app, id=iid, by="test"))

    # --- rules: time and faults -----------------------------------------------------

    @rule(seconds=st.sampled_from([0.5, 1, 3, 10, 30, 60]))
    def advance(self, seconds: float) -> None:
        self.run(self._advance(seconds))

    def _clean(self) -> bool:
        """Faults are armed only while no destroy is being retried, so that a burst of
        them is finite (FAULT_BOUND); an endless run of failures has no bound."""
        return not self.app.terminator.retrying

    @precondition(_clean)
    @rule(method=st.sampled_from(["destroy", "get", "list_instances"]), n=st.integers(1, 2))
    def provider_5xx(self, method: str, n: int) -> None:
        self.fake.faults.fail_next[method] = n

    @precondition(_clean)
    @rule()
    def destroy_does_nothing_once(self) -> None:
        self.fake.faults.destroy_noop_next = 1

    @rule(lag=st.sampled_from([0, 5, 15]))
    def listing_lag(self, lag: int) -> None:
        self.fake.faults.listing_lag = timedelta(seconds=lag)
        self.lag_seen = max(self.lag_seen, self.fake.faults.listing_lag)

    # --- rules: crashes -------------------------------------------------------------

    @rule()
    def crash_and_restart(self) -> None:
        self.run(self._restart())

    @rule(point=st.sampled_from(["after_intent", "after_provider_launch"]))
    def crash_during_launch(self, point: str) -> None:
        """The state a SIGKILL leaves at each launch step, then a restart."""

        async def go() -> None:
            now = self.clock.now()
            iid = launcher.new_instance_id()
            offer = self.fake.offers[0]
            row = Instance(
                id=iid,
                provider="fake",
                label=instance_label(self.app.installation, iid),
                state=InstanceState.REQUESTED,
                created_at=now,
                lease_until=now + self.limits.lease_default,
                last_activity=now,
                price_per_hour=offer.price_per_hour,
                gpu=offer.gpu_name,
                billing=offer.billing,
            )
            await self.app.store.insert_instance(row)
            self.expect[iid] = set()
            self.uncertain.add(iid)
            if point == "after_provider_launch":
                await self.fake.launch(offer, LaunchSpec(label=row.label, image="x"))
            await self._restart()

        self.run(go())

    @precondition(lambda self: bool(self._live_ids()))
    @rule(data=st.data())
    def crash_after_terminating_commit(self, data: st.DataObject) -> None:
        iid = data.draw(st.sampled_from(self._live_ids()))

        async def go() -> None:
            row = await self.app.store.get_instance(iid)
            if row.state is InstanceState.TERMINATING:
                return
            self.expect[iid] = {R.MANUAL}
            await self.app.terminator.begin(iid, R.MANUAL)
            await self._restart()

        self.run(go())

    # --- the invariant --------------------------------------------------------------

    def _allowed_end(self, row: Instance | None, start: datetime) -> datetime:
        visible = start + self.lag_seen
        if row is None:
            return visible + BOUND
        deadline, _ = policy.earliest_deadline(row, policy.Observations(), self.limits, start)
        if row.state is InstanceState.TERMINATED and row.terminating_at is not None:
            deadline = min(deadline, row.terminating_at)
        return max(deadline, visible) + BOUND

    @invariant()
    def nothing_bills_past_its_deadline_plus_bound(self) -> None:
        now = self.clock.now()
        for pid, bill in self.fake.bills.items():
            row = self.run(self.app.store.find_instance("fake", pid))
            end = bill.end or now
            allowed = self._allowed_end(row, bill.start)
            assert end <= allowed, (pid, row, bill, allowed)

    # --- the end --------------------------------------------------------------------

    async def _finish(self) -> None:
        self.fake.faults.fail_next.clear()
        self.fake.faults.destroy_noop_next = 0
        await self._advance(260)  # past every hard cap, with reconciler passes in between
        assert self.fake.live() == [], self.fake.live()
        rows = await self.app.store.instances()
        assert all(not r.state.live for r in rows), [r for r in rows if r.state.live]
        terms = {t.instance_id: t for t in await self.app.store.terminations(T0)}
        for pid in self.fake.bills:
            row = await self.app.store.find_instance("fake", pid)
            assert row is not None, f"billed instance {pid} has no row"
            assert row.state is InstanceState.TERMINATED
            events = await self.app.store.events(entity_id=row.id)
            ended = [e for e in events if e.to_state == InstanceState.TERMINATED.value]
            assert len(ended) == 1, events
            assert row.id in terms
            assert row.reason is not None
            self._check_reason(row)

    def _check_reason(self, row: Instance) -> None:
        expected = self.expect.get(row.id)
        if row.reason is R.ORPHAN:
            assert row.id in self.uncertain or expected is None, row
            return
        if expected:
            assert row.reason in expected, (row, expected)
            return
        assert row.reason in TIME_REASONS, row
        _, first = policy.earliest_deadline(
            row, policy.Observations(), self.limits, row.terminating_at or row.created_at
        )
        assert row.reason is first, (row, first)


GuardMachine.TestCase.settings = hsettings(
    max_examples=25,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
# About 20 s of hypothesis: in `make test`, kept out of `make fast` (under a minute).
TestGuardMachine = pytest.mark.slow(GuardMachine.TestCase)
