"""Pure decisions of the job queue. No I/O and no clock reads: `now` comes in as an argument.

- which queued job runs next (priority, then first come first served; a job may carry a
  `not_before` back-off after a failed launch);
- which warm instance a job may reuse;
- which offer to rent (the cheapest that meets the job, across enabled providers);
- where the cold-start estimate of a provider and GPU is kept.

Waiting against renting, the keep-warm window and the cold-start estimate are in weighing.py.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from gpuwarden.core.clock import parse_ts
from gpuwarden.core.model import Instance, InstanceState, Job, JobSpec, JobState
from gpuwarden.providers.base import Offer, Requirements

# Before any launch of a provider and GPU was measured, a cold start is assumed this long
# (a typical Vast.ai pull-and-boot); the first measurement replaces it.
DEFAULT_COLD_START_S = 180.0


def queue_order(jobs: Iterable[Job]) -> list[Job]:
    """Higher priority first, then a job put back at the front (its spot instance was
    outbid), then older first (ids break ties so the order is total)."""
    return sorted(jobs, key=lambda j: (-j.priority, not j.extra.get("front"), j.created_at, j.id))


def not_before(job: Job) -> datetime | None:
    value = job.extra.get("not_before")
    return parse_ts(value) if isinstance(value, str) else None


def runnable(jobs: Iterable[Job], now: datetime) -> list[Job]:
    """Queued jobs that may be dispatched now, in dispatch order."""
    out = []
    for job in queue_order(jobs):
        if job.state is not JobState.QUEUED:
            continue
        nb = not_before(job)
        if nb is not None and nb > now:
            continue
        out.append(job)
    return out


def next_wake(jobs: Iterable[Job], now: datetime) -> datetime | None:
    """The earliest back-off end among queued jobs still waiting for it."""
    times = [
        nb
        for j in jobs
        if j.state is JobState.QUEUED and (nb := not_before(j)) is not None and nb > now
    ]
    return min(times, default=None)


@dataclass(frozen=True, slots=True)
class Capability:
    """What we know of a rented machine, to match later jobs against it."""

    gpu_ram_gb: float | None
    price_per_hour: float


def fits(
    spec: JobSpec,
    inst: Instance,
    cap: Capability,
    default_gpu_ram_gb: float,
    *,
    spot_ok: bool = True,
) -> bool:
    """May this job run on this (warm, idle) instance? A job that must not run on spot
    (--no-spot, or preempted too often) does not take a spot instance."""
    if inst.state is not InstanceState.RUNNING:
        return False
    if not spot_ok and isinstance(inst.extra.get("spot"), dict):
        return False
    if spec.max_price is not None and cap.price_per_hour > spec.max_price:
        return False
    need = spec.gpu_ram_gb if spec.gpu_ram_gb is not None else default_gpu_ram_gb
    if cap.gpu_ram_gb is None:  # unknown machine (e.g. after a restart): only modest jobs
        return need <= default_gpu_ram_gb
    return cap.gpu_ram_gb >= need


def requirements(
    spec: JobSpec,
    *,
    default_gpu_ram_gb: float,
    min_reliability: float,
    budget_max_price: float | None,
    interruptible: bool = False,
    disk_gb: float | None = None,
) -> Requirements:
    """The offer search for a job: its own limits, else the configured ones."""
    prices = [p for p in (spec.max_price, budget_max_price) if p is not None]
    return Requirements(
        min_gpu_ram_gb=spec.gpu_ram_gb if spec.gpu_ram_gb is not None else default_gpu_ram_gb,
        max_price=min(prices) if prices else None,
        min_reliability=min_reliability,
        verified=True,
        interruptible=interruptible,
        disk_gb=disk_gb,
    )


def offer_key(offer: Offer) -> str:
    return f"{offer.provider}:{offer.offer_id}"


def instance_key(inst: Instance) -> str:
    """The offer key of the offer an instance was rented from."""
    return f"{inst.provider}:{inst.offer_id}"


def rank_offers(
    offers: Iterable[Offer], want: Requirements, avoid: Iterable[str] = ()
) -> list[Offer]:
    """Offers that meet `want`, cheapest first (then the more reliable, then by name so the
    order is stable). `avoid` holds offer keys and provider names that failed this job."""
    skip = set(avoid)
    ok = [
        o
        for o in offers
        if offer_key(o) not in skip
        and o.provider not in skip
        and (want.min_gpu_ram_gb is None or o.gpu_ram_gb >= want.min_gpu_ram_gb)
        and (want.max_price is None or o.price_per_hour <= want.max_price)
        and o.reliability >= want.min_reliability
        and (o.verified or not want.verified)
        and o.num_gpus >= want.num_gpus
    ]
    return sorted(ok, key=lambda o: (o.price_per_hour, -o.reliability, o.provider, o.offer_id))


def cold_start_key(provider: str, gpu: str) -> str:
    """The flag that holds the decaying cold-start estimate of a provider and GPU."""
    return f"jobs.cold_start:{provider}:{gpu or '?'}"


def engine_for(spec: JobSpec, provider: str, setting: str) -> str:
    """The runner engine: the job's own choice, else the configured one, where "auto" means
    preview on the sim cloud (no GPU there) and "auto" (diffusers when CUDA works) elsewhere."""
    if spec.engine:
        return spec.engine
    if setting == "auto" and provider.startswith("sim"):
        return "preview"
    return setting


def job_cost(price_per_hour: float, seconds: float) -> float:
    """The job's share of its instance's bill: the time the instance was held for it."""
    return round(price_per_hour * max(0.0, seconds) / 3600.0, 6)
