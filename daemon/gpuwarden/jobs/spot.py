"""Pure decisions about spot (interruptible, bid) GPUs for jobs. No I/O, no clock reads.

- the bid: the offer's minimum bid times jobs.bid_factor, never above the price cap (the
  job's max_price or budget.max_hourly_price, whichever is lower, storage included);
- the preemption risk of an offer: a prior from its reliability until preemptions of its
  provider and GPU were seen, then the observed rate (preemptions per hour of spot use,
  the prior counted as one hour of exposure, so one early outbid does not swing it wildly);
- the expected cost of running a job on an offer: its price times the work, plus the
  chance that a preemption makes the work run again (and, after FALLBACK_AFTER, on demand);
- when a job gives up on spot (after FALLBACK_AFTER preemptions);
- what spot saved and what preemptions cost, for `costs`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from gpuwarden.core.model import Job, Termination, TerminationReason
from gpuwarden.providers.base import Offer

# Before any preemption of a provider and GPU was seen, a spot instance is assumed to be
# outbid once in ten hours, plus what its host's unreliability adds (1 - reliability per hour).
SPOT_PRIOR_HAZARD = 0.1
PRIOR_HOURS = 1.0
FALLBACK_AFTER = 3  # preemptions of one job, after which it runs on demand
_MICRO = 1_000_000  # bids are placed in micro-dollars per hour


def bid_for(min_bid: float, storage: float, factor: float, cap: float | None) -> float | None:
    """The bid (USD/h for the GPUs) for an ask whose minimum bid is `min_bid`: min_bid x
    factor, lowered to fit `cap` (bid + storage <= cap); None when even min_bid does not."""
    if min_bid <= 0 or factor < 1:
        return None
    lowest = math.ceil(min_bid * _MICRO - 1e-6)
    micro = max(lowest, math.floor(min_bid * factor * _MICRO + 1e-6))
    if cap is not None:
        micro = min(micro, math.floor((cap - storage) * _MICRO))
        while micro >= lowest and micro / _MICRO + storage > cap:
            micro -= 1  # float rounding: the bound is exact, not approximate
    if micro < lowest:
        return None
    return micro / _MICRO


def with_bids(
    offers: Iterable[Offer], *, spot: bool, factor: float, cap: float | None
) -> list[Offer]:
    """The offers a job may rent: on-demand ones as they are; spot ones (only when `spot`)
    with their bid placed and their price the bid plus storage; a spot offer whose minimum
    bid does not fit the cap is left out."""
    out: list[Offer] = []
    for o in offers:
        if not o.interruptible:
            out.append(o)
            continue
        if not spot or o.min_bid is None:
            continue
        bid = bid_for(o.min_bid, o.storage_per_hour, factor, cap)
        if bid is not None:
            out.append(replace(o, bid=bid, price_per_hour=bid + o.storage_per_hour))
    return out


@dataclass(frozen=True, slots=True)
class Exposure:
    """Spot use of one provider and GPU: how many instances were outbid in how many hours."""

    preemptions: int = 0
    hours: float = 0.0


def exposure_key(provider: str, gpu: str) -> tuple[str, str]:
    return (provider, gpu or "?")


def exposures(spot_ends: Iterable[Termination]) -> dict[tuple[str, str], Exposure]:
    """Exposure per (provider, GPU) from the termination records of spot instances."""
    out: dict[tuple[str, str], Exposure] = {}
    for t in spot_ends:
        key = exposure_key(t.provider, t.gpu)
        e = out.get(key, Exposure())
        out[key] = Exposure(
            e.preemptions + (t.reason is TerminationReason.PREEMPTED),
            e.hours + max(0.0, t.uptime_s) / 3600.0,
        )
    return out


def hazard(reliability: float, seen: Exposure | None) -> float:
    """Expected preemptions per hour of a spot instance."""
    prior = SPOT_PRIOR_HAZARD + max(0.0, 1.0 - reliability)
    if seen is None or (seen.hours <= 0 and seen.preemptions == 0):
        return prior
    return (seen.preemptions + prior * PRIOR_HOURS) / (seen.hours + PRIOR_HOURS)


def expected_cost(offer: Offer, work_s: float, rate: float) -> float:
    """What running `work_s` seconds (cold start and job) on `offer` is expected to cost.
    On demand: once. Spot: each try is preempted with probability p (at `rate` per hour),
    and a preempted try is paid and run again, up to FALLBACK_AFTER tries, after which the
    job runs on demand: once x (1 + p + p^2 ...) + p^FALLBACK_AFTER x the on-demand run."""
    once = offer.price_per_hour * max(0.0, work_s) / 3600.0
    if not offer.interruptible:
        return once
    p = 1.0 - math.exp(-max(0.0, rate) * max(0.0, work_s) / 3600.0)
    tries = sum(p**k for k in range(FALLBACK_AFTER))
    on_demand = (offer.on_demand_price or offer.price_per_hour) * max(0.0, work_s) / 3600.0
    return once * tries + p**FALLBACK_AFTER * on_demand


def by_expected_cost(
    offers: Iterable[Offer], work_s: float, seen: Mapping[tuple[str, str], Exposure]
) -> list[Offer]:
    """Cheapest expected cost first; ties: the more reliable, on-demand before spot, then
    by name so that the order is stable."""

    def key(o: Offer) -> tuple[float, float, bool, str, str]:
        rate = hazard(o.reliability, seen.get(exposure_key(o.provider, o.gpu_name)))
        cost = expected_cost(o, work_s, rate)
        return (round(cost, 9), -o.reliability, o.interruptible, o.provider, o.offer_id)

    return sorted(offers, key=key)


def preemptions(job: Job) -> int:
    value = job.extra.get("preemptions", 0)
    return value if isinstance(value, int) else 0


def wants_spot(job: Job, default: bool) -> bool:
    """Whether this attempt of the job may rent spot: its own choice (or the default), until
    it was preempted FALLBACK_AFTER times."""
    chosen = default if job.spec.spot is None else job.spec.spot
    return chosen and preemptions(job) < FALLBACK_AFTER


# --- costs ---------------------------------------------------------------------------------


def summary(spot_ends: Iterable[tuple[Termination, Mapping[str, Any]]]) -> dict[str, Any]:
    """What spot saved (the on-demand price of the same machines for the same time, minus
    what was paid) and what preemptions cost (their instances' time, which the re-runs
    repeated, and its price), from spot instances' termination records and spot details."""
    instances = preempted = 0
    paid = on_demand = rerun_s = rerun_cost = 0.0
    for t, spot in spot_ends:
        instances += 1
        paid += t.cost
        price = spot.get("on_demand_price")
        if isinstance(price, int | float) and price > 0 and t.price_per_hour > 0:
            on_demand += t.cost * float(price) / t.price_per_hour
        else:
            on_demand += t.cost
        if t.reason is TerminationReason.PREEMPTED:
            preempted += 1
            rerun_s += max(0.0, t.uptime_s)
            rerun_cost += t.cost
    return {
        "instances": instances,
        "paid": round(paid, 6),
        "on_demand": round(on_demand, 6),
        "saved": round(on_demand - paid, 6),
        "preemptions": preempted,
        "rerun_s": round(rerun_s, 3),
        "rerun_cost": round(rerun_cost, 6),
    }
