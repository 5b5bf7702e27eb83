"""The warm pool: most recently used first, windows, expiry, and learning idle gaps."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from jobs_fakes import add_instance, add_job, settings
from tests.conftest import MakeApp

from gpuwarden.core.clock import FakeClock
from gpuwarden.core.model import EntityKind, InstanceState, TerminationReason
from gpuwarden.jobs.warm_pool import GAPS_ENTITY, WarmPool


async def test_the_pool_reuses_the_most_recent_learns_gaps_and_expires(
    tmp_path: Path, make_app: MakeApp
) -> None:
    clock = FakeClock()
    app = await make_app(settings(tmp_path), clock)
    pool = WarmPool(app.store, {})
    t0 = clock.now()
    a = await add_instance(app, "ia")
    b = await add_instance(app, "ib")
    gone = await add_instance(app, "ic", state=InstanceState.TERMINATED)
    pool.hold(a, t0, timedelta(seconds=100))
    pool.hold(b, t0 + timedelta(seconds=30), timedelta(seconds=100))
    pool.hold(gone, t0 + timedelta(seconds=60), timedelta(seconds=100))
    job = await add_job(app, "j1")
    # The ended one leaves the pool; of the live ones the most recently used comes first.
    picked = await pool.fit(job, 8.0)
    assert picked is not None and picked.id == "ib"
    assert len(pool) == 2
    # No gap seen: "auto" is half the ski-rental window (half of a cold start billed and
    # waited through).
    assert pool.window("auto", t0, 60.0, 1.0) == timedelta(seconds=60)
    assert pool.window(timedelta(minutes=5), t0, 60.0, 1.0) == timedelta(minutes=5)
    # A job submitted at 70 s, 10 s after the last instance went idle (at 60 s): one gap of
    # 10 s, so "auto" covers it, stretched by a quarter (12.5 s) and, covering every gap
    # seen, by a tenth of a cold start's cost (12 s), and, with one gap only, drawn towards
    # the first window: (1 x 24.5 + 3 x 60) / 4.
    await clock.advance(70)
    await pool.note_arrival(await add_job(app, "j2"))
    assert pool.window("auto", clock.now(), 60.0, 1.0) == timedelta(seconds=51.125)
    # Only the first job after going idle closes a gap: a second one changes nothing.
    await pool.note_arrival(await add_job(app, "j3"))
    assert pool.window("auto", clock.now(), 60.0, 1.0) == timedelta(seconds=51.125)
    assert pool.next_expiry() == t0 + timedelta(seconds=100)
    assert pool.due(t0 + timedelta(seconds=99)) == []
    assert pool.due(t0 + timedelta(seconds=100)) == [("ia", TerminationReason.IDLE)]
    pool.take("ib")
    assert len(pool) == 0 and pool.evict_one() is None
    pool.hold(a, t0, timedelta(0))
    assert pool.due(t0) == [("ia", TerminationReason.JOB_DONE)]


async def test_only_what_a_pass_could_see_expires_in_it(tmp_path: Path, make_app: MakeApp) -> None:
    """An instance a job left while the loop's pass ran is not ended by that pass, even with
    a window of 0: the next pass's dispatch lets a waiting job take it first."""
    clock = FakeClock()
    app = await make_app(settings(tmp_path), clock)
    pool = WarmPool(app.store, {})
    seen = pool.ids()  # the pass begins: the pool is empty
    pool.hold(await add_instance(app, "ia"), clock.now(), timedelta(0))  # a job ended meanwhile
    assert pool.due(clock.now(), seen) == []
    assert pool.due(clock.now(), pool.ids()) == [("ia", TerminationReason.JOB_DONE)]


async def test_the_gaps_learned_survive_a_restart(tmp_path: Path, make_app: MakeApp) -> None:
    """Each idle gap is on record; a new pool on the same store (a restarted daemon) reads
    them back, so "auto" keeps its window instead of starting over from the ski-rental one."""
    clock = FakeClock()
    app = await make_app(settings(tmp_path), clock)
    pool = WarmPool(app.store, {})
    inst = await add_instance(app, "ia")
    for n, gap in enumerate((40.0, 55.0, 30.0)):
        pool.hold(inst, clock.now(), timedelta(minutes=5))
        await clock.advance(gap)
        await pool.note_arrival(await add_job(app, f"j{n}"))
        pool.take("ia")
    learned = pool.window("auto", clock.now(), 60.0, 1.0)
    # A garbled record (hand-edited, or from a future version) is skipped, not fatal.
    await app.store.record(EntityKind.DAEMON, GAPS_ENTITY, "idle_gap", {"at": 5, "seconds": "x"})

    restarted = WarmPool(app.store, {})
    assert restarted.window("auto", clock.now(), 60.0, 1.0) != learned  # nothing learned yet
    await restarted.restore()
    assert restarted.gaps == pool.gaps
    assert [g.seconds for g in restarted.gaps] == [40.0, 55.0, 30.0]
    assert restarted.window("auto", clock.now(), 60.0, 1.0) == learned
