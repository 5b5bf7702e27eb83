"""Pure decisions that weigh billed GPU seconds against the seconds users wait. No I/O and no
clock reads: the history and `now` come in as arguments.

Both costs are counted in one total, `billed seconds + wait_weight * waiting seconds`
(`jobs.wait_weight`, 1.0 by default: a second of waiting is worth a second of GPU; 0 counts
dollars only). A cold start costs both: it is billed (Vast bills from launch, boot included)
and the job waits through it, so one cold start costs `cold * (1 + wait_weight)`.

- `most_recent_first`: the warm instance a job reuses (the most recently used);
- `choose`: a job arrives and no warm instance fits: queue behind a live instance (booting or
  busy) or rent a new one, whichever costs less in that total;
- `expected_wait` / `remaining_run_s`: when a live instance will be free for the job;
- `adaptive_window`: how long an idle instance stays warm under `keep_warm = "auto"`, chosen by
  replaying the recent idle gaps (time from an instance going idle to the next arrival)
  against every candidate window, older gaps counting less (exponential decay), with gaps
  longer than any seen priced in, the winner stretched past the cliff of a missed gap and a
  young history drawn towards a first window;
- `scheduled_until`: how long `jobs.warm_schedule` keeps an instance going idle warm;
- `cold_start_update` / `cold_start_add_setup` / `cold_start_mean`: the decaying cold-start
  estimate per provider and GPU, which charges failed launches to the next successful one and
  counts the setup a new instance's first job did (installing the runner's engine).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from gpuwarden.config.schedule import WarmWindow

GAP_HALF_LIFE_S = 6 * 3600.0  # an idle gap six hours old counts half as much as a fresh one
GAP_HISTORY = 200  # idle gaps kept (the oldest go first)
COLD_START_ALPHA = 0.3  # weight of a new cold-start measurement in the decaying mean
DEFAULT_JOB_S = 60.0  # a job's length before any job was measured
# The best window is always exactly one of the gaps seen; the next gap is as likely to be a
# little longer, so the window is stretched by this much. This and the four below were tuned
# on the trace suite in tests/bench (see adaptive_window for what they do, and the README's
# keep-warm section for the seeds each was chosen on and how it does on others).
WINDOW_MARGIN = 1.25
# ... and by this share of a cold start's cost, times the squared share of the gaps the window
# covers: a window just short of a session's longest gap misses it, and every job arriving
# during the new rental's boot waits through it, while a window a little too long costs
# only those seconds at the session's end (see adaptive_window).
CLIFF_SHARE = 0.1
FIRST_WINDOW_SHARE = 0.5  # the window before any gap, as a share of a cold start's cost
UNSEEN_PER_COLD_S = 1 / 100  # pseudo-gaps longer than any seen, per second of cold cost
PRIOR_WEIGHT = 3.0  # pseudo-gaps drawing a young history's window towards the first one
PRIOR_SHARE_POWER = 2.0  # ... scaled by the share of the gaps it covers to this power


@dataclass(frozen=True, slots=True)
class Choice:
    """What the dispatcher does with a job no warm instance takes."""

    action: Literal["rent", "wait"]
    wait_s: float  # the expected wait if it queues (inf when nothing live will take it)
    cost_wait: float  # the expected total of queueing, in weighted seconds
    cost_rent: float  # the expected total of renting


def cold_start_cost(cold_start_s: float, wait_weight: float) -> float:
    """What one cold start costs in the total: billed while it boots, and waited through."""
    return max(0.0, cold_start_s) * (1.0 + wait_weight)


def choose(wait_s: float, cold_start_s: float, wait_weight: float, *, can_rent: bool) -> Choice:
    """Queue behind a live instance, or rent?

    Queueing costs the wait (the instance it waits for is billed anyway). Renting costs a cold
    start, billed and waited through. Ties go to waiting (no new rental), and so does
    `wait_weight = 0`; when the cap (`max_instances`) allows no rental the job waits; when
    nothing live will take it, it rents.
    """
    cost_wait = wait_weight * wait_s if math.isfinite(wait_s) else math.inf
    cost_rent = cold_start_cost(cold_start_s, wait_weight)
    if not can_rent or cost_wait <= cost_rent:
        return Choice("wait", wait_s, cost_wait, cost_rent)
    return Choice("rent", wait_s, cost_wait, cost_rent)


def most_recent_first(idle_since: Mapping[str, datetime]) -> list[str]:
    """Warm instances in the order a job should try them: the most recently used first, so
    that the others stay idle and expire (ids break ties so the order is total)."""
    return sorted(idle_since, key=lambda k: (-idle_since[k].timestamp(), k))


def expected_wait(free_in: Iterable[float], ahead: int, job_s: float) -> float:
    """Seconds until a live instance takes the next job, with `ahead` jobs already queued for
    the same instances: each of those takes the earliest free instance for `job_s`.

    `free_in` holds, per live instance that fits, the seconds until it is free (booting: its
    remaining boot plus the job it was rented for; busy: the remaining run). inf if none.

    Linear in the live instances, not in `ahead`: once every instance is free within one job
    of the earliest, the next len(heap) jobs take one each, in order, so whole rounds are
    counted at once (a dispatch pass asks this for each of a thousand queued jobs)."""
    heap = sorted(max(0.0, f) for f in free_in)  # sorted: a heap already
    if not heap:
        return math.inf
    job_s, ahead = max(0.0, job_s), max(0, ahead)
    if job_s == 0.0:
        return heap[0]
    top = heap[-1]
    while ahead > 0:
        if ahead >= len(heap) and top - heap[0] <= job_s:
            rounds = ahead // len(heap)
            heap = [f + rounds * job_s for f in heap]  # the order, so the heap, holds
            top += rounds * job_s
            ahead -= rounds * len(heap)
            continue
        top = max(top, heap[0] + job_s)
        heapq.heapreplace(heap, heap[0] + job_s)
        ahead -= 1
    return heap[0]


def typical_job_s(recent: Sequence[float]) -> float:
    """The job length to expect: the median of recent ones (a default before any)."""
    if not recent:
        return DEFAULT_JOB_S
    ordered = sorted(recent)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def remaining_run_s(elapsed_s: float, step: int, total: int, recent: Sequence[float]) -> float:
    """Seconds left in a running job: from its progress when it reported some (the rate so far
    extrapolated), else the typical job length minus what already ran."""
    elapsed_s = max(0.0, elapsed_s)
    if total > 0 and 0 < step <= total:
        return elapsed_s * (total - step) / step
    return max(0.0, typical_job_s(recent) - elapsed_s)


@dataclass(frozen=True, slots=True)
class Gap:
    """An idle gap: an instance went idle at `at` - `seconds`; the next job came at `at`."""

    at: datetime
    seconds: float


def window_cost(gaps: Sequence[tuple[float, float]], window_s: float, cold_cost: float) -> float:
    """The weighted total of keeping warm for `window_s` over (gap seconds, weight) pairs: a
    gap within the window was billed idle; a longer one billed the window, then a cold start."""
    total = 0.0
    for g, w in gaps:
        total += w * (g if g <= window_s else window_s + cold_cost)
    return total


def adaptive_window(
    gaps: Iterable[Gap],
    now: datetime,
    cold_start_s: float,
    wait_weight: float,
    *,
    half_life_s: float = GAP_HALF_LIFE_S,
    margin: float = WINDOW_MARGIN,
    cliff_share: float = CLIFF_SHARE,
    first_share: float = FIRST_WINDOW_SHARE,
    unseen_per_s: float = UNSEEN_PER_COLD_S,
    prior_weight: float = PRIOR_WEIGHT,
) -> float:
    """The keep-warm window (seconds) that would have cost least over the recent idle gaps.

    Each gap is weighted by 0.5 ** (age / half_life). The cost of a window T over the gaps
    is sum_{g <= T} w g + sum_{g > T} w (T + cold_cost), plus `unseen` x T: a gap longer than
    any seen (the pattern changes: the evening comes, a session ends) would strand the
    window, and the longer the cold start the longer the windows it strands, so `unseen` is
    `unseen_per_s` x cold_cost pseudo-gaps, but never more than the (decayed) weight of the
    gaps seen: a young history is not outvoted by them. That cost is piecewise linear and
    rises between observed gaps, so the best is 0 or one of the gaps: the candidates are
    those, checked in one sorted pass, and the winner is stretched by `margin` (the next gap
    is as likely to be a little longer than any seen) plus `cliff_share` x cold_cost x (the
    share of the gaps it covers)^2. The cost of a window is a cliff just under a session's
    longest gap: one gap missed is a cold start that the jobs arriving during the boot all
    wait through (more than one cold start's cost), while a few seconds too many cost only
    those seconds when the session ends. A window covering nearly every gap (a dense
    session) is stretched past the cliff by a tenth of a cold start's cost; one covering few
    (sparse traffic, where a window bridges the odd short gap) is hardly stretched.

    Few gaps say little. Before any, the window is `first_share` of a cold start's cost
    (half the ski-rental window: a first long wait is the cheaper mistake on sparse traffic).
    Then a nonzero choice is drawn towards the longer of that and itself, with a weight of
    `prior_weight` x (the share of the gaps it covers) pseudo-gaps: a first session of short
    gaps does not cut the window to the shortest few it saw, while one short gap among long
    ones does not hold an idle instance for long.
    """
    cold_cost = cold_start_cost(cold_start_s, wait_weight)
    first = cold_cost * first_share
    weighted = sorted(
        (max(0.0, g.seconds), math.pow(0.5, max(0.0, (now - g.at).total_seconds()) / half_life_s))
        for g in gaps
    )
    if not weighted:
        return first
    total = sum(w for _, w in weighted)
    # Never more pseudo-gaps than (decayed) gaps seen: after n gaps of one pattern the chance
    # that the next outlasts them all is about 1 / (n + 1), so a first gap or two must not
    # be outvoted by a penalty sized for a long history.
    unseen = min(unseen_per_s * cold_cost, total)
    above = total  # weight of gaps longer than T
    below_cost = 0.0
    best_t, best, best_covered = 0.0, above * cold_cost, 0.0
    i = 0
    while i < len(weighted):
        t = weighted[i][0]
        while i < len(weighted) and weighted[i][0] == t:
            below_cost += weighted[i][1] * t
            above -= weighted[i][1]
            i += 1
        cost = below_cost + above * (t + cold_cost) + unseen * t
        if cost < best - 1e-9:
            best_t, best, best_covered = t, cost, total - above
    if best_t <= 0:
        return 0.0
    covered = best_covered / total
    window = best_t * margin + cliff_share * cold_cost * covered * covered
    prior = prior_weight * math.pow(covered, PRIOR_SHARE_POWER)
    return (total * window + prior * max(first, window)) / (total + prior)


def scheduled_until(
    windows: Sequence[WarmWindow], gpu: str, others: Sequence[str], now: datetime
) -> datetime | None:
    """Until when `jobs.warm_schedule` keeps an instance of `gpu` going idle at `now` warm:
    the latest close among the open windows of its class that still want more instances than
    the `others` of the class already kept (busy or warm; their GPU names). None: the
    schedule does not hold it, and the keep-warm window alone applies."""
    until: datetime | None = None
    for window in windows:
        closes = window.end_if_open(now) if window.covers(gpu) else None
        if closes is None:
            continue
        if sum(1 for g in others if window.covers(g)) >= window.min_warm:
            continue
        until = closes if until is None or closes > until else until
    return until


def note_gap(gaps: Sequence[Gap], gap: Gap, keep: int = GAP_HISTORY) -> list[Gap]:
    """The history with one more gap, the oldest dropped beyond `keep`."""
    return [*gaps, gap][-keep:]


def cold_start_update(
    stats: Mapping[str, Any] | None,
    seconds: float,
    *,
    failed: bool = False,
    alpha: float = COLD_START_ALPHA,
) -> dict[str, Any]:
    """The decaying cold-start estimate {"n", "mean", "pending"} after one more launch.

    A successful launch of `seconds` (intent to ready, setup included when known) moves the
    mean by `alpha` towards it plus the time failed launches wasted since the last success
    (`pending`): from the user's side a failed launch is part of the cold start. The first
    sample replaces the default outright. A failed launch only adds to `pending`.
    """
    n = int(stats.get("n", 0)) if stats else 0
    mean = float(stats.get("mean", 0.0)) if stats else 0.0
    pending = float(stats.get("pending", 0.0)) if stats else 0.0
    if failed:
        return {"n": n, "mean": round(mean, 3), "pending": round(pending + max(0.0, seconds), 3)}
    sample = max(0.0, seconds) + pending
    mean = sample if n == 0 else mean + alpha * (sample - mean)
    return {"n": n + 1, "mean": round(mean, 3), "pending": 0.0}


def cold_start_add_setup(
    stats: Mapping[str, Any] | None, setup_s: float, *, alpha: float = COLD_START_ALPHA
) -> dict[str, Any]:
    """The estimate after adding the setup an instance's first job did (installing the
    runner's engine, measured on the instance) to the launch last sampled: what
    `cold_start_update` would have given had the setup been known then. With no successful
    launch sampled yet it waits in `pending` for the next one."""
    n = int(stats.get("n", 0)) if stats else 0
    mean = float(stats.get("mean", 0.0)) if stats else 0.0
    pending = float(stats.get("pending", 0.0)) if stats else 0.0
    extra = max(0.0, setup_s)
    if n == 0:
        return {"n": 0, "mean": round(mean, 3), "pending": round(pending + extra, 3)}
    mean += extra if n == 1 else alpha * extra
    return {"n": n, "mean": round(mean, 3), "pending": round(pending, 3)}


def cold_start_mean(stats: object, default_s: float) -> float:
    """The estimate from a stored {"mean", ...} (the default before any measurement)."""
    if isinstance(stats, Mapping) and int(stats.get("n", 0)) > 0 and "mean" in stats:
        return float(stats["mean"])
    return default_s
