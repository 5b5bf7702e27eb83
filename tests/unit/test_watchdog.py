"""The watchdog with a fake prober, a fake clock and a real store: strikes, recovery,
watchdog terminations, activity and staggering."""

from __future__ import annotations

import asyncio
import itertools
import shutil
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog.testing
from tests.conftest import MakeApp

from gpuwarden.config.settings import Settings
from gpuwarden.core.clock import FakeClock
from gpuwarden.core.heartbeat import BEAT_EVERY
from gpuwarden.core.model import (
    EntityKind,
    Instance,
    InstanceState,
    TerminationReason,
    instance_label,
)
from gpuwarden.fleet.app import App
from gpuwarden.loops.watchdog import (
    ProbeFailed,
    ProbeResult,
    Watchdog,
    next_probe_at,
    parse_probe,
    probe_offset,
    probe_script,
)
from gpuwarden.providers.fake import FakeProvider

START = datetime(2026, 1, 1, tzinfo=UTC)


class FakeProber:
    """Answers from a script: each call pops the next outcome (a ProbeResult, or a
    ProbeFailed to raise); when the script is empty it answers `default`."""

    def __init__(self) -> None:
        self.script: list[ProbeResult | ProbeFailed] = []
        self.default: ProbeResult | ProbeFailed = ProbeResult()
        self.calls: list[tuple[str, datetime]] = []
        self.clock: FakeClock | None = None

    async def probe(self, inst: Instance, timeout: float) -> ProbeResult:
        assert self.clock is not None
        self.calls.append((inst.id, self.clock.now()))
        outcome = self.script.pop(0) if self.script else self.default
        if isinstance(outcome, ProbeFailed):
            raise outcome
        return outcome


class Rig:
    def __init__(self, app: App, clock: FakeClock, provider: FakeProvider) -> None:
        self.app = app
        self.clock = clock
        self.provider = provider
        self.prober = FakeProber()
        self.prober.clock = clock
        self.wd = Watchdog(app, self.prober)

    async def add_running(
        self,
        iid: str,
        *,
        last_activity: datetime | None = None,
        last_probe_at: datetime | None = None,
        provider: str = "fake",
    ) -> Instance:
        label = instance_label("main", iid)
        pid = self.provider.spawn(label)
        now = self.clock.now()
        inst = Instance(
            id=iid,
            provider=provider,
            label=label,
            state=InstanceState.RUNNING,
            created_at=now,
            lease_until=now + timedelta(hours=4),
            last_activity=last_activity or now,
            price_per_hour=1.0,
            provider_id=pid,
            provider_started_at=now,
            ssh_host="127.0.0.1",
            ssh_port=22,
            running_at=now,
            last_probe_at=last_probe_at,
        )
        await self.app.store.insert_instance(inst)
        return inst

    async def probe_now(self, iid: str) -> None:
        """Jump to the instance's next probe slot and run that one probe to completion."""
        due = next_probe_at(iid, self.wd.interval, self.clock.now())
        await self.clock.advance((due - self.clock.now()).total_seconds())
        before = len(self.prober.calls)
        await self.wd.tick()
        await self.wd.probes_done()
        assert len(self.prober.calls) == before + 1

    async def names(self, iid: str) -> list[str]:
        evs = await self.app.store.events(kind=EntityKind.INSTANCE, entity_id=iid)
        return [e.name if e.name != "state" else f"state:{e.to_state}" for e in evs]


@pytest.fixture
async def rig(tmp_path: Path, make_app: MakeApp) -> Rig:
    clock = FakeClock(START)
    settings = Settings(
        daemon={"state_dir": str(tmp_path)},
        policy={"watchdog_interval": "60s", "watchdog_failures": 2, "gpu_busy_percent": 10},
    )
    provider = FakeProvider(clock)
    return Rig(await make_app(settings, clock, [provider]), clock, provider)


FAIL = ProbeFailed("refused", "connection refused")


async def test_two_strikes_end_the_instance_with_reason_watchdog(rig: Rig) -> None:
    await rig.add_running("i1")
    rig.prober.default = FAIL
    await rig.probe_now("i1")
    inst = await rig.app.store.get_instance("i1")
    assert inst.state is InstanceState.RUNNING
    assert (inst.strikes, inst.last_probe_ok) == (1, False)
    assert inst.last_probe_at == rig.clock.now()

    await rig.probe_now("i1")
    inst = await rig.app.store.get_instance("i1")
    assert inst.state is InstanceState.TERMINATED
    assert inst.reason is TerminationReason.WATCHDOG
    assert inst.strikes == 2
    assert rig.provider.calls_to("destroy") == [(inst.provider_id,)]
    names = await rig.names("i1")
    assert names == [
        "state:running",
        "strike",
        "strike",
        "state:terminating",
        "state:terminated",
    ]
    strikes = [e for e in await rig.app.store.events(entity_id="i1") if e.name == "strike"]
    assert [e.details["strike"] for e in strikes] == [1, 2]
    assert strikes[0].details["error"] == "refused"
    terms = await rig.app.store.terminations(START)
    assert [(t.instance_id, t.reason) for t in terms] == [("i1", TerminationReason.WATCHDOG)]


async def test_fail_pass_fail_does_not_kill(rig: Rig) -> None:
    await rig.add_running("i1")
    rig.prober.script = [FAIL, ProbeResult(), FAIL]
    for _ in range(3):
        await rig.probe_now("i1")
    inst = await rig.app.store.get_instance("i1")
    assert inst.state is InstanceState.RUNNING
    assert (inst.strikes, inst.last_probe_ok) == (1, False)
    assert await rig.names("i1") == ["state:running", "strike", "probe_recovered", "strike"]
    assert rig.provider.calls_to("destroy") == []


async def test_one_event_per_strike_and_per_recovery(rig: Rig) -> None:
    """Good probes after a recovery, and good probes with no strikes, write no events."""
    await rig.add_running("i1")
    rig.prober.script = [ProbeResult(), FAIL, ProbeResult(), ProbeResult(), ProbeResult()]
    for _ in range(5):
        await rig.probe_now("i1")
    assert await rig.names("i1") == ["state:running", "strike", "probe_recovered"]
    recovered = [e for e in await rig.app.store.events(entity_id="i1") if e.name != "state"][1]
    assert recovered.details == {"after_strikes": 1}
    await rig.wd.write_probe_times(force=True)  # the routine probe time is held back
    inst = await rig.app.store.get_instance("i1")
    assert (inst.strikes, inst.last_probe_ok, inst.last_probe_at) == (0, True, rig.clock.now())


async def test_routine_probe_times_are_written_together(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A good probe after a good one moves only the probe time: held back and written with
    the others in one transaction, and never over a newer answer."""
    ids = {"i1", "i2", "i3"}
    for iid in ids:
        await rig.add_running(iid)
    store = rig.app.store
    writes: list[set[str]] = []
    batch = store.update_instances

    async def counted(changes: Any) -> Any:
        writes.append(set(changes))
        return await batch(changes)

    monkeypatch.setattr(store, "update_instances", counted)

    async def one_round() -> dict[str, datetime]:
        await rig.clock.advance(rig.wd.interval)  # every instance's slot, once
        before = len(rig.prober.calls)
        await rig.wd.tick()
        await rig.wd.probes_done()
        return dict(rig.prober.calls[before:])

    async def stored() -> dict[str, tuple[datetime | None, bool | None]]:
        return {i.id: (i.last_probe_at, i.last_probe_ok) for i in await store.instances()}

    await rig.wd.tick()  # never probed: at once, and written at once
    await rig.wd.probes_done()
    firsts = await stored()
    assert set(firsts) == ids and all(at is not None for at, _ in firsts.values())
    probed = await one_round()
    assert set(probed) == ids and await stored() == firsts  # held back
    writes.clear()
    await rig.wd.write_probe_times(force=True)
    assert writes == [ids]
    assert await stored() == {iid: (at, True) for iid, at in probed.items()}
    assert {i.id: i.last_probe_at for i in store.live.select()} == probed
    await one_round()  # held back again
    rig.prober.default = FAIL
    struck = await one_round()  # strikes: written at once, the held-back times dropped
    writes.clear()
    await rig.wd.write_probe_times(force=True)
    assert writes == []
    assert await stored() == {iid: (at, False) for iid, at in struck.items()}


async def test_three_strikes_when_configured(rig: Rig) -> None:
    rig.app.settings = rig.app.settings.model_copy(
        update={"policy": rig.app.settings.policy.model_copy(update={"watchdog_failures": 3})}
    )
    await rig.add_running("i1")
    rig.prober.default = FAIL
    await rig.probe_now("i1")
    await rig.probe_now("i1")
    assert (await rig.app.store.get_instance("i1")).state is InstanceState.RUNNING
    await rig.probe_now("i1")
    assert (await rig.app.store.get_instance("i1")).reason is TerminationReason.WATCHDOG


async def test_activity_moves_last_activity_and_is_recorded(rig: Rig) -> None:
    await rig.add_running("i1", last_activity=START - timedelta(minutes=10))
    rig.prober.default = ProbeResult(sessions=1)
    await rig.probe_now("i1")
    inst = await rig.app.store.get_instance("i1")
    assert inst.last_activity == rig.clock.now()
    acts = [e for e in await rig.app.store.events(entity_id="i1") if e.name == "activity"]
    assert len(acts) == 1
    assert acts[0].details["why"] == ["session"]
    assert acts[0].details["sessions"] == 1


async def test_activity_is_rate_limited_to_moves_over_a_minute(rig: Rig) -> None:
    rig.app.settings = rig.app.settings.model_copy(
        update={
            "policy": rig.app.settings.policy.model_copy(
                update={"watchdog_interval": timedelta(seconds=20)}
            )
        }
    )
    await rig.add_running("i1", last_activity=START - timedelta(hours=1))
    rig.prober.default = ProbeResult(runners=1)
    for _ in range(6):  # two minutes of probes every 20 s
        await rig.probe_now("i1")
    acts = [e for e in await rig.app.store.events(entity_id="i1") if e.name == "activity"]
    assert 2 <= len(acts) <= 3  # one per minute or so, not one per probe
    assert acts[0].details["why"] == ["runner"]


@pytest.mark.parametrize(
    ("result", "busy"),
    [
        (ProbeResult(gpu_util=55.0), True),
        (ProbeResult(gpu_util=10.0), False),  # at the threshold is not over it
        (ProbeResult(gpu_util=None), False),
        (ProbeResult(sessions=2), True),
        (ProbeResult(runners=1), True),
        (ProbeResult(), False),
    ],
)
async def test_what_counts_as_activity(rig: Rig, result: ProbeResult, busy: bool) -> None:
    earlier = START - timedelta(hours=1)
    await rig.add_running("i1", last_activity=earlier)
    rig.prober.default = result
    await rig.probe_now("i1")
    inst = await rig.app.store.get_instance("i1")
    assert (inst.last_activity != earlier) is busy
    assert inst.last_probe_ok is True


async def test_idle_probe_does_not_touch_last_activity(rig: Rig) -> None:
    earlier = START - timedelta(hours=1)
    await rig.add_running("i1", last_activity=earlier)
    await rig.probe_now("i1")
    assert (await rig.app.store.get_instance("i1")).last_activity == earlier
    assert await rig.names("i1") == ["state:running"]


async def test_instances_that_are_not_running_are_not_probed(rig: Rig) -> None:
    await rig.add_running("i1")
    await rig.app.store.transition_instance(
        "i1", InstanceState.TERMINATING, reason=TerminationReason.MANUAL
    )
    await rig.clock.advance(120)
    await rig.wd.tick()
    await rig.wd.probes_done()
    assert rig.prober.calls == []


async def test_a_strike_on_an_instance_that_started_ending_is_not_recorded(rig: Rig) -> None:
    await rig.add_running("i1")

    class EndsDuringProbe(FakeProber):
        async def probe(self, inst: Instance, timeout: float) -> ProbeResult:
            await rig.app.store.transition_instance(
                inst.id, InstanceState.TERMINATING, reason=TerminationReason.MANUAL
            )
            raise FAIL

    rig.wd.prober = EndsDuringProbe()
    await rig.clock.advance(120)
    await rig.wd.tick()
    await rig.wd.probes_done()
    assert "strike" not in await rig.names("i1")


def test_staggering_spreads_probe_times_over_the_interval() -> None:
    interval = 300.0
    offsets = sorted(probe_offset(f"inst{i:04d}", interval) for i in range(200))
    assert all(0 <= o < interval for o in offsets)
    buckets = [0] * 10
    for o in offsets:
        buckets[int(o // 30)] += 1
    assert min(buckets) >= 8 and max(buckets) <= 35, buckets  # ~20 each: no burst
    gaps = [b - a for a, b in itertools.pairwise(offsets)]
    assert max(gaps) < 30


def test_probe_slots_keep_their_phase() -> None:
    t0 = START + timedelta(seconds=17)
    first = next_probe_at("abc", 60, t0)
    assert t0 < first <= t0 + timedelta(seconds=60)
    second = next_probe_at("abc", 60, first)
    assert second - first == timedelta(seconds=60)
    # the same slot whatever moment inside the interval we ask from
    assert next_probe_at("abc", 60, first - timedelta(seconds=1)) == first
    assert probe_offset("abc", 60) == probe_offset("abc", 60)
    assert probe_offset("abc", 60) != probe_offset("abd", 60)


async def test_tick_probes_each_instance_once_per_interval_at_its_own_time(rig: Rig) -> None:
    """After a daemon restart (instances probed before), each keeps its own slot."""
    for i in range(5):
        await rig.add_running(f"i{i}", last_probe_at=START - timedelta(minutes=3))
    for _ in range(int(3 * 60 / BEAT_EVERY)):  # three intervals, beat by beat
        wake = await rig.wd.tick()
        assert wake <= rig.clock.now() + timedelta(seconds=BEAT_EVERY)
        await rig.wd.probes_done()
        await rig.clock.advance((wake - rig.clock.now()).total_seconds())
    per = {f"i{i}": [t for iid, t in rig.prober.calls if iid == f"i{i}"] for i in range(5)}
    for iid, times in per.items():
        assert len(times) in (2, 3), (iid, times)
        assert all(b - a == timedelta(seconds=60) for a, b in itertools.pairwise(times))
    assert len({times[0] for times in per.values()}) == 5  # each at its own moment


async def test_a_new_instance_is_probed_at_once_then_on_its_slots(rig: Rig) -> None:
    await rig.add_running("new")
    await rig.wd.tick()
    await rig.wd.probes_done()
    assert rig.prober.calls == [("new", START)]
    wake = await rig.wd.tick()  # nothing more until its slot
    await rig.wd.probes_done()
    assert len(rig.prober.calls) == 1
    assert wake <= next_probe_at("new", 60, START)


async def test_an_instance_starting_to_run_wakes_the_loop(rig: Rig) -> None:
    task = asyncio.create_task(rig.wd.run())
    try:
        await asyncio.wait_for(_until(lambda: rig.clock.sleepers >= 1), 5)
        await rig.add_running("fresh")  # the store event wakes the sleeping loop
        await asyncio.wait_for(_until(lambda: len(rig.prober.calls) == 1), 5)
        assert rig.prober.calls == [("fresh", START)]  # no fake time had to pass
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_run_beats_and_probes_on_the_fake_clock(rig: Rig) -> None:
    await rig.add_running("i1")
    rig.app.heartbeats.register("watchdog")
    task = asyncio.create_task(rig.wd.run())
    try:
        for _ in range(30):  # 150 s of fake time, one beat at a time
            await asyncio.wait_for(_until(lambda: rig.clock.sleepers >= 1), 5)
            await rig.wd.probes_done()  # its writes land before time moves on
            await rig.clock.advance(BEAT_EVERY)
            assert rig.app.heartbeats.ages()["watchdog"] <= BEAT_EVERY
        await asyncio.wait_for(_until(lambda: len(rig.prober.calls) >= 2), 5)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert task.cancelled()


async def _until(cond: Callable[[], bool]) -> None:
    """Poll a condition that depends on the store's worker thread (bounded by the caller)."""
    while not cond():
        await asyncio.sleep(0.01)


def test_parse_probe() -> None:
    out = (
        "Welcome!\n"
        '{"heartbeat": true, "sessions": 2, "gpu_util": 87, "runners": 1, "deadman": true}\n'
    )
    assert parse_probe(out) == ProbeResult(
        sessions=2, gpu_util=87.0, runners=1, heartbeat=True, deadman=True
    )
    with pytest.raises(ProbeFailed) as err:
        parse_probe("sh: 1: syntax error\n")
    assert err.value.kind == "bad_answer"
    with pytest.raises(ProbeFailed):
        parse_probe("")


def test_probe_script_is_fixed_posix_sh() -> None:
    script = probe_script()
    assert script.startswith("#!/bin/sh")
    sh = shutil.which("dash") or "sh"
    assert subprocess.run([sh, "-n", "-c", script], check=False).returncode == 0


def test_parse_probe_reads_whether_the_switch_can_act() -> None:
    line = '{"heartbeat": true, "sessions": 0, "gpu_util": null, "runners": 0, "deadman": %s, '
    armed = parse_probe(line % "true" + '"deadman_state": "armed"}')
    assert (armed.deadman_state, armed.switch()) == ("armed", "armed")
    unable = parse_probe(line % "true" + '"deadman_state": "unable"}')
    assert unable.switch() == "unable"
    assert parse_probe(line % "false" + '"deadman_state": "armed"}').switch() == "absent"
    assert parse_probe(line % "true" + '"deadman_state": "bogus"}').switch() == "running"
    assert parse_probe('{"heartbeat": true}').switch() is None  # an older probe: not known


async def test_the_switch_state_is_kept_per_instance_and_a_disarmed_one_warns(rig: Rig) -> None:
    await rig.add_running("i1", provider="sim-vast")  # its switch should be able to end it
    rig.prober.default = ProbeResult(deadman=True, deadman_state="armed")
    with structlog.testing.capture_logs() as logs:
        await rig.probe_now("i1")
        await rig.probe_now("i1")  # unchanged: no second event
        assert (await rig.app.store.get_instance("i1")).extra["deadman"] == "armed"
        assert not [e for e in logs if e["event"] == "deadman_not_armed"]
        rig.prober.default = ProbeResult(deadman=True, deadman_state="unable")
        await rig.probe_now("i1")
    assert (await rig.app.store.get_instance("i1")).extra["deadman"] == "unable"
    assert (await rig.names("i1")).count("deadman") == 2
    [warning] = [e for e in logs if e["event"] == "deadman_not_armed"]
    assert (warning["instance_id"], warning["switch"]) == ("i1", "unable")


async def test_a_switch_that_cannot_end_by_design_is_shown_without_a_warning(rig: Rig) -> None:
    # Lambda without policy.lambda_deadman_api_key: the switch only warns on the instance.
    await rig.add_running("i1", provider="sim-lambda")
    rig.prober.default = ProbeResult(deadman=True, deadman_state="unable")
    with structlog.testing.capture_logs() as logs:
        await rig.probe_now("i1")
    assert (await rig.app.store.get_instance("i1")).extra["deadman"] == "unable"
    assert not [e for e in logs if e["event"] == "deadman_not_armed"]
