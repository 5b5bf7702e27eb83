"""A discrete-event replay of job arrivals through the jobs loop's decisions (the same pure
functions of `gpuwarden.jobs.weighing` the daemon calls), on a clock that only jumps.

One job is one arrival of `job_s` seconds. An instance is billed from its launch (boot
included) until it ends; a job waits from its arrival until it starts. Total = billed +
wait_weight * waited. `Policy` says how long an idle instance stays warm (a fixed window or
"auto") and whether the dispatcher weighs waiting against renting (`greedy=False`, the daemon
now) or rents whenever `max_instances` allows and reuses the oldest warm one (`greedy=True`,
the daemon before: kept to compare). "auto" starts from nothing, as on a daemon's first day,
or from what it learned replaying a previous day (`learned`).
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from gpuwarden.jobs import weighing

T0 = datetime(2026, 1, 5, 0, 0, tzinfo=UTC)  # a Monday
DAY = 86_400.0
DEFAULT_COLD_S = 180.0  # what the daemon assumes before it measured a launch


@dataclass(frozen=True)
class Policy:
    name: str
    window: float | None  # None: keep_warm = "auto"
    greedy: bool = False


@dataclass
class _Inst:
    launched: float
    idle_since: float = -1.0
    warm_until: float = -1.0  # > 0 while warm
    ended: float = -1.0


@dataclass(frozen=True)
class Learned:
    """What "auto" knows at the end of a replay: the idle gaps it saw and its cold-start
    estimate (the daemon keeps both across days and restarts, in its database)."""

    gaps: tuple[weighing.Gap, ...] = ()
    cold_stats: dict[str, object] | None = None

    def a_day_earlier(self) -> Learned:
        """The same knowledge, as if learned the day before the next replay (whose clock
        starts again at T0): each gap moves one day back, so it has decayed as it would
        have overnight."""
        day = timedelta(seconds=DAY)
        return Learned(
            tuple(weighing.Gap(g.at - day, g.seconds) for g in self.gaps), self.cold_stats
        )


@dataclass
class Result:
    billed: float = 0.0
    waits: list[float] = field(default_factory=list)
    launches: int = 0
    learned: Learned = field(default_factory=Learned)

    def total(self, wait_weight: float) -> float:
        return self.billed + wait_weight * sum(self.waits)


def _at(t: float) -> datetime:
    return T0 + timedelta(seconds=t)


# One event loop with its handlers beside it: split up, the replay would be harder to follow.
def replay(  # noqa: C901
    arrivals: list[float],
    *,
    job_s: float,
    cold_s: float,
    policy: Policy,
    wait_weight: float = 1.0,
    max_instances: int = 2,
    learned: Learned | None = None,
) -> Result:
    """`learned`: what "auto" starts from (a previous day's `Result.learned`, moved a day
    back); nothing by default, as a daemon on its first day."""
    res = Result()
    insts: list[_Inst] = []
    queue: deque[float] = deque()  # arrival times of jobs waiting for a live instance
    events: list[tuple[float, int, str, int]] = []  # (time, seq, kind, instance index)
    seq = 0
    gaps: list[weighing.Gap] = list(learned.gaps) if learned else []
    idle_start: float | None = None
    cold_stats: dict[str, object] | None = learned.cold_stats if learned else None
    busy_until: dict[int, float] = {}  # instance -> when its job (or boot + job) ends

    def push(t: float, kind: str, i: int) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, i))

    def cold_est() -> float:
        return weighing.cold_start_mean(cold_stats, DEFAULT_COLD_S)

    def window(now: float) -> float:
        if policy.window is not None:
            return policy.window
        return weighing.adaptive_window(gaps, _at(now), cold_est(), wait_weight)

    def start(i: int, now: float, arrived: float) -> None:
        res.waits.append(now - arrived)
        insts[i].warm_until = -1.0
        busy_until[i] = now + job_s
        push(now + job_s, "done", i)

    def free(i: int, now: float) -> None:
        nonlocal idle_start
        busy_until.pop(i, None)
        if queue:
            start(i, now, queue.popleft())
            return
        inst = insts[i]
        inst.idle_since = now
        inst.warm_until = now + window(now)
        idle_start = now
        if inst.warm_until <= now:
            end(i, now)
        else:
            push(inst.warm_until, "expire", i)

    def end(i: int, now: float) -> None:
        inst = insts[i]
        inst.warm_until = -1.0
        inst.ended = now
        res.billed += now - inst.launched

    def arrive(now: float) -> None:
        nonlocal idle_start, cold_stats
        if idle_start is not None:
            gaps[:] = weighing.note_gap(gaps, weighing.Gap(_at(now), now - idle_start))
            idle_start = None
        warm = {str(i): _at(x.idle_since) for i, x in enumerate(insts) if x.warm_until > now}
        if warm:
            order = weighing.most_recent_first(warm)
            pick = int(order[-1] if policy.greedy else order[0])
            start(pick, now, now)
            return
        live = sum(1 for x in insts if x.ended < 0)
        can_rent = live < max_instances
        if policy.greedy:
            rent = can_rent
        else:
            free_in = [b - now for b in busy_until.values()]
            wait = weighing.expected_wait(free_in, len(queue), job_s)
            rent = (
                weighing.choose(wait, cold_est(), wait_weight, can_rent=can_rent).action == "rent"
            )
        if not rent:
            queue.append(now)
            return
        insts.append(_Inst(launched=now))
        i = len(insts) - 1
        res.launches += 1
        cold_stats = weighing.cold_start_update(cold_stats, cold_s)
        res.waits.append(cold_s)
        busy_until[i] = now + cold_s + job_s
        push(now + cold_s + job_s, "done", i)

    for t in arrivals:
        push(t, "arrive", -1)
    while events:
        now, _, kind, i = heapq.heappop(events)
        if kind == "arrive":
            arrive(now)
        elif kind == "done":
            free(i, now)
        elif kind == "expire" and insts[i].warm_until == now:
            end(i, now)
    res.learned = Learned(tuple(gaps), cold_stats)
    return res


# --- the trace suite -----------------------------------------------------------------------


def seed001(rng: random.Random) -> list[float]:
    """100 jobs a day, arrivals uniform over the day."""
    return sorted(rng.uniform(0, DAY) for _ in range(100))


def bursty(rng: random.Random) -> list[float]:
    """10 sessions of about 15 jobs, 20 s to 3 min apart within a session."""
    out: list[float] = []
    for _ in range(10):
        t = rng.uniform(0, DAY - 3600)
        for _ in range(rng.randint(10, 20)):
            out.append(t)
            t += rng.uniform(20, 180)
    return sorted(out)


def sparse(rng: random.Random) -> list[float]:
    """12 jobs a day, uniform."""
    return sorted(rng.uniform(0, DAY) for _ in range(12))


def steady(rng: random.Random) -> list[float]:
    """A job every 2 to 4 minutes for six hours."""
    out: list[float] = []
    t = rng.uniform(0, 240)
    while t < 6 * 3600:
        out.append(t)
        t += rng.uniform(120, 240)
    return out


def diurnal(rng: random.Random) -> list[float]:
    """An office day: about 12 jobs an hour from 09:00 to 18:00 (Poisson), one every two hours
    outside it."""
    out: list[float] = []
    t = 0.0
    while True:
        hour = (t / 3600) % 24
        rate = 12 / 3600 if 9 <= hour < 18 else 0.5 / 3600
        t += rng.expovariate(rate)
        if t >= DAY:
            return out
        out.append(t)


TRACES = {
    "seed001": seed001,
    "bursty": bursty,
    "sparse": sparse,
    "steady": steady,
    "diurnal": diurnal,
}

# Candidate fixed windows for the best one in hindsight: every 10 s to 15 min, then coarser.
HINDSIGHT = [float(s) for s in range(0, 901, 10)] + [1200.0, 1800.0, 2700.0, 3600.0, 7200.0]
