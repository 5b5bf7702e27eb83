"""Table tests of the pure waiting-versus-renting and keep-warm decisions (fixed times)."""

from __future__ import annotations

import heapq
import math
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpuwarden.jobs import weighing as w

T0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("wait_s", "cold", "weight", "can_rent", "action"),
    [
        # The only instance boots with 40 s left, a cold start is 180 s: wait for it.
        (40.0, 180.0, 1.0, True, "wait"),
        # Remaining boot shorter than a cold start, dollars only: wait.
        (170.0, 180.0, 0.0, True, "wait"),
        # Waiting 400 s costs 400; renting costs 180 billed + 180 waited = 360: rent.
        (400.0, 180.0, 1.0, True, "rent"),
        # Exactly the cold-start cost: a tie keeps the fleet small.
        (360.0, 180.0, 1.0, True, "wait"),
        # Waiting weighs 3x: 130 s of waiting (390) is dearer than 60 s billed + 180 waited.
        (130.0, 60.0, 3.0, True, "rent"),
        # Dollars only never rents while something live will take the job...
        (10_000.0, 60.0, 0.0, True, "wait"),
        # ...but nothing live: rent.
        (math.inf, 60.0, 0.0, True, "rent"),
        (math.inf, 60.0, 1.0, True, "rent"),
        # At the cap (max_instances) renting is not an option.
        (10_000.0, 60.0, 1.0, False, "wait"),
    ],
)
def test_choose_weighs_waiting_against_renting(
    wait_s: float, cold: float, weight: float, can_rent: bool, action: str
) -> None:
    choice = w.choose(wait_s, cold, weight, can_rent=can_rent)
    assert choice.action == action
    assert choice.cost_rent == pytest.approx(cold * (1 + weight))


def test_a_job_arriving_while_the_only_instance_boots_waits_when_the_boot_is_nearly_done() -> None:
    # Rented at 09:00 for job A with a 180 s cold start; job B arrives at 09:02 (120 s in).
    # The instance is free for B after its remaining boot (60 s) plus A (60 s): 120 s < 180 s.
    launched, arrival, cold, job_s = T0, T0 + timedelta(seconds=120), 180.0, 60.0
    remaining_boot = cold - (arrival - launched).total_seconds()
    wait = w.expected_wait([remaining_boot + job_s], ahead=0, job_s=job_s)
    assert wait == 120.0
    assert w.choose(wait, cold, 1.0, can_rent=True).action == "wait"
    # Just after launch the instance is free in 180 + 60 = 240 s: still cheaper than 360.
    assert w.choose(240.0, cold, 1.0, can_rent=True).action == "wait"
    # With jobs queued ahead for it, each adds a job's length: 2 ahead -> 360 (a tie: wait),
    # 3 ahead -> 420 (rent).
    assert w.expected_wait([240.0], ahead=2, job_s=job_s) == 360.0
    assert w.choose(360.0, cold, 1.0, can_rent=True).action == "wait"
    wait3 = w.expected_wait([240.0], ahead=3, job_s=job_s)
    assert wait3 == 420.0
    assert w.choose(wait3, cold, 1.0, can_rent=True).action == "rent"


@pytest.mark.parametrize(
    ("free_in", "ahead", "job_s", "wait"),
    [
        ([], 0, 60.0, math.inf),
        ([30.0], 0, 60.0, 30.0),
        ([30.0, 10.0], 0, 60.0, 10.0),
        ([30.0, 10.0], 1, 60.0, 30.0),  # the job ahead takes the one free in 10 s
        ([30.0, 10.0], 2, 60.0, 70.0),  # then the one free in 30 s; ours: 10 + 60
        ([-5.0], 0, 60.0, 0.0),  # overdue counts as free now
    ],
)
def test_expected_wait(free_in: list[float], ahead: int, job_s: float, wait: float) -> None:
    assert w.expected_wait(free_in, ahead, job_s) == wait


def _one_job_at_a_time(free_in: list[float], ahead: int, job_s: float) -> float:
    heap = [max(0.0, f) for f in free_in]
    heapq.heapify(heap)
    for _ in range(ahead):
        heapq.heapreplace(heap, heap[0] + max(0.0, job_s))
    return heap[0]


@given(
    st.lists(st.floats(-100.0, 5000.0), min_size=1, max_size=12),
    st.integers(0, 400),
    st.floats(0.0, 900.0),
)
def test_expected_wait_counts_whole_rounds_as_one_job_at_a_time(
    free_in: list[float], ahead: int, job_s: float
) -> None:
    """Skipping whole rounds gives what handing the jobs ahead out one by one gives."""
    got = w.expected_wait(free_in, ahead, job_s)
    assert got == pytest.approx(_one_job_at_a_time(free_in, ahead, job_s), rel=1e-9, abs=1e-6)


def test_expected_wait_behind_a_long_queue_is_exact() -> None:
    # 3 instances, 1,000 jobs ahead: 333 rounds and one more job.
    assert w.expected_wait([10.0, 20.0, 30.0], 1000, 60.0) == 20.0 + 333 * 60.0


@pytest.mark.parametrize(
    ("elapsed", "step", "total", "recent", "left"),
    [
        (10.0, 1, 4, [], 30.0),  # a quarter done in 10 s: 30 s to go
        (30.0, 4, 4, [60.0], 0.0),
        (20.0, 0, 0, [60.0, 100.0, 80.0], 60.0),  # no progress yet: median 80 - 20
        (20.0, 0, 0, [], w.DEFAULT_JOB_S - 20.0),
        (500.0, 0, 0, [60.0], 0.0),  # overran the typical length: free any moment
    ],
)
def test_remaining_run(
    elapsed: float, step: int, total: int, recent: list[float], left: float
) -> None:
    assert w.remaining_run_s(elapsed, step, total, recent) == pytest.approx(left)


def _gaps(*seconds: float, every: float = 600.0) -> list[w.Gap]:
    """Gaps observed one after another, the last at T0."""
    n = len(seconds)
    return [w.Gap(T0 - timedelta(seconds=every * (n - 1 - i)), s) for i, s in enumerate(seconds)]


@pytest.mark.parametrize(
    ("gaps", "cold", "weight", "window"),
    [
        # No history: half the ski-rental window (half of what a cold start costs).
        ([], 180.0, 1.0, 180.0),
        ([], 60.0, 0.0, 30.0),
        (_gaps(7200.0, 5400.0, 9000.0), 60.0, 1.0, 0.0),  # sparse: end at once
        # Bursty: cover every gap, stretched by the margin (120 * 1.25 = 150) and, covering
        # them all, past the cliff by a tenth of a cold start's cost (36 s): 186, longer
        # than the first window (180), so the young history's pull leaves it there.
        (_gaps(90.0, 120.0, 100.0, 80.0), 180.0, 1.0, pytest.approx(186.0)),
        # Mostly short gaps and one long one: cover the short ones only (40 * 1.25 = 50, plus
        # 12 s x the share covered squared, drawn a little towards 60).
        (_gaps(30.0, 40.0, 35.0, 3600.0), 60.0, 1.0, pytest.approx(57.629, abs=1e-3)),
        # Short gaps that are still dearer to bridge than a cold start: end at once.
        (_gaps(500.0, 600.0, 550.0), 60.0, 1.0, 0.0),
    ],
)
def test_adaptive_window_table(
    gaps: list[w.Gap], cold: float, weight: float, window: object
) -> None:
    assert w.adaptive_window(gaps, T0, cold, weight) == window


def test_adaptive_window_is_the_cheapest_candidate() -> None:
    gaps = _gaps(30.0, 400.0, 45.0, 1200.0, 200.0, 60.0, 5000.0, 90.0, every=900.0)
    cold_cost = w.cold_start_cost(120.0, 1.0)
    weighted = [(g.seconds, 0.5 ** ((T0 - g.at).total_seconds() / w.GAP_HALF_LIFE_S)) for g in gaps]
    # The sweep alone: no stretches, no penalty for gaps unseen, no pull towards a first window.
    got = w.adaptive_window(
        gaps, T0, 120.0, 1.0, margin=1.0, unseen_per_s=0, prior_weight=0, cliff_share=0
    )
    candidates = [0.0, *(g.seconds for g in gaps), 10.0, 100.0, 1000.0, 3000.0]
    best = min(w.window_cost(weighted, t, cold_cost) for t in candidates)
    assert w.window_cost(weighted, got, cold_cost) == pytest.approx(best)


def test_old_gaps_fade() -> None:
    # Yesterday was bursty (short gaps); today's gaps are long. Long ones win once the old
    # ones have faded, though they are fewer.
    old = [w.Gap(T0 - timedelta(hours=30), 60.0) for _ in range(6)]
    new = [w.Gap(T0 - timedelta(minutes=m), 4000.0) for m in (10, 60, 120)]
    assert w.adaptive_window(old + new, T0, 60.0, 1.0) == 0.0
    # Counted alike (no decay), the six short ones would win: 60 * 1.25 + 12 * (6/9)^2.
    assert w.adaptive_window(old + new, T0, 60.0, 1.0, half_life_s=1e12) == pytest.approx(
        75.0 + 12.0 * (6 / 9) ** 2
    )


def test_note_gap_keeps_the_newest() -> None:
    hist: list[w.Gap] = []
    for i in range(5):
        hist = w.note_gap(hist, w.Gap(T0 + timedelta(seconds=i), float(i)), keep=3)
    assert [g.seconds for g in hist] == [2.0, 3.0, 4.0]


def test_cold_start_estimate_decays_and_counts_failed_launches() -> None:
    stats = w.cold_start_update(None, 100.0)
    assert stats == {"n": 1, "mean": 100.0, "pending": 0.0}
    stats = w.cold_start_update(stats, 200.0)
    assert stats["mean"] == pytest.approx(130.0)  # 100 + 0.3 * (200 - 100)
    # A launch that failed after 300 s is charged to the next success (100 + 300 = 400).
    stats = w.cold_start_update(stats, 300.0, failed=True)
    assert stats["n"] == 2 and stats["mean"] == pytest.approx(130.0)
    stats = w.cold_start_update(stats, 100.0)
    assert stats["mean"] == pytest.approx(130.0 + 0.3 * (400.0 - 130.0))
    assert stats["pending"] == 0.0
    # Many fast launches: the old slow ones are forgotten (a plain mean never would).
    for _ in range(20):
        stats = w.cold_start_update(stats, 50.0)
    assert stats["mean"] == pytest.approx(50.0, abs=1.0)


def test_a_first_jobs_setup_counts_as_if_it_was_part_of_the_launch() -> None:
    # One launch so far: the setup adds to it outright, as a first sample of boot + setup would.
    first = w.cold_start_update(None, 60.0)
    assert w.cold_start_add_setup(first, 90.0) == w.cold_start_update(None, 150.0)
    # Later launches: the setup moves the mean as much as a sample longer by it would have.
    later = w.cold_start_update(first, 100.0)
    assert w.cold_start_add_setup(later, 90.0) == w.cold_start_update(first, 190.0)
    # No successful launch sampled yet: it waits, like a failed launch's boot, for the next.
    waiting = w.cold_start_add_setup(None, 90.0)
    assert waiting == {"n": 0, "mean": 0.0, "pending": 90.0}
    assert w.cold_start_update(waiting, 60.0)["mean"] == pytest.approx(150.0)
    assert w.cold_start_add_setup(later, -5.0) == later  # no setup, nothing moves


def test_cold_start_mean_reads_old_and_missing_flags() -> None:
    assert w.cold_start_mean(None, 180.0) == 180.0
    assert w.cold_start_mean({"n": 3, "mean": 42.0}, 180.0) == 42.0  # the old running mean
    assert w.cold_start_mean({"n": 0, "mean": 0.0, "pending": 90.0}, 180.0) == 180.0
    assert w.cold_start_mean("junk", 180.0) == 180.0


def test_the_most_recently_used_warm_instance_goes_first() -> None:
    idle = {"a": T0, "b": T0 + timedelta(seconds=30), "c": T0 - timedelta(seconds=5)}
    assert w.most_recent_first(idle) == ["b", "a", "c"]
    assert w.most_recent_first({"y": T0, "x": T0}) == ["x", "y"]


def test_a_gap_longer_than_any_seen_is_priced_in() -> None:
    """Exponential gaps a little shorter than a cold start costs: covering even the longest
    seen would pay on those gaps alone, but a window that long is stranded when the pattern
    changes (the evening, a session's end). The penalty for gaps unseen keeps it shorter."""
    gaps = _gaps(20.0, 150.0, 300.0, 45.0, 600.0, 90.0, 240.0, 1100.0, 60.0, 400.0, every=300)
    bare = w.adaptive_window(gaps, T0, 300.0, 1.0, unseen_per_s=0, prior_weight=0, cliff_share=0)
    priced = w.adaptive_window(gaps, T0, 300.0, 1.0, prior_weight=0, cliff_share=0)
    assert bare == 1100.0 * w.WINDOW_MARGIN
    assert priced == 90.0 * w.WINDOW_MARGIN


def test_one_short_gap_among_long_ones_is_not_held_long() -> None:
    # The pull towards the first window is weighted by the share of gaps the choice covers.
    # A 10-minute cold start: covering the one 60 s gap pays (60 * 1.25 = 75 s, plus a tenth
    # of the cold cost x (1/5)^2 = 4.8 s past the cliff), and the first window (600 s) pulls
    # it only by (1/5)^2 of the prior weight.
    few = _gaps(60.0, 7200.0, 9000.0, 5400.0, 8000.0)
    window = w.adaptive_window(few, T0, 600.0, 1.0, unseen_per_s=0)
    assert 79.8 < window < 95.0


def test_a_first_gap_is_not_outvoted_by_the_penalty_for_gaps_unseen() -> None:
    """A 3-minute cold start costs 360 s, so the penalty is 3.6 pseudo-gaps; after one gap of
    100 s they would cut the window to 0 (every next job of the session a cold start). They
    are capped at the weight of the gaps seen (1): covering the gap costs 100 + 1 x 100 =
    200 < 360, stretched to 125 s and past the cliff by 36 s (it covers every gap seen),
    then drawn towards the first window (180 s) by 3 pseudo-gaps: (161 + 3 x 180) / 4."""
    one = _gaps(100.0)
    assert w.adaptive_window(one, T0, 180.0, 1.0) == pytest.approx(175.25)
    # The cap follows the decay: the same gap a day old weighs 1/16, and so may the penalty.
    day_old = [w.Gap(T0 - timedelta(hours=24), 100.0)]
    assert w.adaptive_window(day_old, T0, 180.0, 1.0) == pytest.approx(
        (161.0 / 16 + 3 * 180.0) / (1 / 16 + 3)
    )
    # With a long history the full penalty applies again (the test above: 90 s, not 1100 s).
    many = _gaps(20.0, 150.0, 300.0, 45.0, 600.0, 90.0, 240.0, 1100.0, 60.0, 400.0, every=300)
    assert (
        w.adaptive_window(many, T0, 300.0, 1.0, prior_weight=0, cliff_share=0)
        == 90.0 * w.WINDOW_MARGIN
    )


def test_a_window_covering_a_dense_session_is_stretched_past_the_cliff() -> None:
    """A session's gaps reach 120 s at most, with a 3-minute cold start. The margin alone
    (150 s) misses a gap of 160 s (two sessions a minute apart, say), and the jobs arriving
    during the rental's boot then all wait through it: the window also gets a tenth of a
    cold start's cost (36 s) when it covers every gap, so it bridges such a gap. Covering
    one gap in five (sparse traffic) it gets 1/25 of that."""
    session = _gaps(*(20.0 + 10.0 * (i % 11) for i in range(30)), every=120.0)
    window = w.adaptive_window(session, T0, 180.0, 1.0)
    assert window == pytest.approx(120.0 * w.WINDOW_MARGIN + 36.0)
    assert window > 160.0
    assert w.adaptive_window(session, T0, 180.0, 1.0, cliff_share=0) < 160.0
    sparse = _gaps(60.0, 7200.0, 9000.0, 5400.0, 8000.0)

    def flat(cliff: float) -> float:  # five gaps alike: no decay, no penalty, no prior
        return w.adaptive_window(
            sparse,
            T0,
            600.0,
            1.0,
            unseen_per_s=0,
            prior_weight=0,
            half_life_s=1e12,
            cliff_share=cliff,
        )

    stretch = flat(w.CLIFF_SHARE) - flat(0.0)
    assert stretch == pytest.approx(0.1 * 1200.0 / 25)
