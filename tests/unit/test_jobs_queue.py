"""Pure decisions of the job queue: order, back-off, fit, offer choice, keep-warm."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from gpuwarden.core.model import Instance, InstanceState, Job, JobSpec, JobState
from gpuwarden.jobs import decisions as queue
from gpuwarden.providers.base import Offer, Requirements

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def job(jid: str, *, priority: int = 0, age: int = 0, **extra: object) -> Job:
    at = T0 - timedelta(seconds=age)
    return Job(
        id=jid,
        state=JobState.QUEUED,
        spec=JobSpec(prompt="p"),
        created_at=at,
        updated_at=at,
        priority=priority,
        extra=dict(extra),
    )


def offer(
    oid: str,
    price: float,
    *,
    ram: float = 24,
    rel: float = 0.99,
    verified: bool = True,
    provider: str = "vast",
) -> Offer:
    return Offer(provider, oid, "RTX 4090", 1, ram, price, "EU", reliability=rel, verified=verified)


def inst(state: InstanceState = InstanceState.RUNNING, price: float = 0.4) -> Instance:
    return Instance(
        id="i1",
        provider="vast",
        label="l",
        state=state,
        created_at=T0,
        lease_until=T0 + timedelta(hours=1),
        last_activity=T0,
        price_per_hour=price,
    )


def test_queue_order_is_priority_then_first_come() -> None:
    jobs = [job("a", age=1), job("b", priority=5), job("c", age=9), job("d", priority=5, age=3)]
    assert [j.id for j in queue.queue_order(jobs)] == ["d", "b", "c", "a"]


def test_a_job_backing_off_waits_and_sets_the_next_wake() -> None:
    later = (T0 + timedelta(seconds=30)).isoformat()
    jobs = [job("a", age=5, not_before=later), job("b")]
    assert [j.id for j in queue.runnable(jobs, T0)] == ["b"]
    assert queue.next_wake(jobs, T0) == T0 + timedelta(seconds=30)
    assert [j.id for j in queue.runnable(jobs, T0 + timedelta(seconds=30))] == ["a", "b"]
    assert queue.next_wake(jobs, T0 + timedelta(seconds=31)) is None


@pytest.mark.parametrize(
    ("spec", "cap", "state", "ok"),
    [
        (JobSpec(prompt="p"), queue.Capability(24, 0.4), InstanceState.RUNNING, True),
        (
            JobSpec(prompt="p", gpu_ram_gb=40),
            queue.Capability(24, 0.4),
            InstanceState.RUNNING,
            False,
        ),
        (
            JobSpec(prompt="p", max_price=0.3),
            queue.Capability(24, 0.4),
            InstanceState.RUNNING,
            False,
        ),
        (JobSpec(prompt="p"), queue.Capability(None, 0.4), InstanceState.RUNNING, True),
        (
            JobSpec(prompt="p", gpu_ram_gb=40),
            queue.Capability(None, 0.4),
            InstanceState.RUNNING,
            False,
        ),
        (JobSpec(prompt="p"), queue.Capability(24, 0.4), InstanceState.TERMINATING, False),
    ],
)
def test_fits(spec: JobSpec, cap: queue.Capability, state: InstanceState, ok: bool) -> None:
    assert queue.fits(spec, inst(state), cap, default_gpu_ram_gb=8.0) is ok


def test_requirements_take_the_lower_of_the_job_and_budget_price() -> None:
    want = queue.requirements(
        JobSpec(prompt="p", max_price=0.5),
        default_gpu_ram_gb=8,
        min_reliability=0.9,
        budget_max_price=0.4,
    )
    assert (want.max_price, want.min_gpu_ram_gb, want.min_reliability) == (0.4, 8, 0.9)
    want = queue.requirements(
        JobSpec(prompt="p", gpu_ram_gb=40),
        default_gpu_ram_gb=8,
        min_reliability=0.9,
        budget_max_price=None,
    )
    assert (want.max_price, want.min_gpu_ram_gb) == (None, 40)


def test_rank_offers_filters_and_sorts_cheapest_first() -> None:
    offers = [
        offer("pricey", 0.9),
        offer("small", 0.1, ram=4),
        offer("flaky", 0.2, rel=0.5),
        offer("unverified", 0.2, verified=False),
        offer("b", 0.3, rel=0.96),
        offer("a", 0.3, rel=0.99),
        offer("lam", 0.35, provider="lambda"),
        offer("over", 1.5),
    ]
    want = Requirements(min_gpu_ram_gb=8, max_price=1.0, min_reliability=0.95)
    assert [o.offer_id for o in queue.rank_offers(offers, want)] == ["a", "b", "lam", "pricey"]
    avoid = ["vast:a", "lambda"]
    assert [o.offer_id for o in queue.rank_offers(offers, want, avoid)] == ["b", "pricey"]


def test_cold_start_key() -> None:
    assert queue.cold_start_key("vast", "RTX 4090") == "jobs.cold_start:vast:RTX 4090"


def test_engine_choice_and_cost_share() -> None:
    assert queue.engine_for(JobSpec(prompt="p"), "sim-vast", "auto") == "preview"
    assert queue.engine_for(JobSpec(prompt="p"), "vast", "auto") == "auto"
    assert queue.engine_for(JobSpec(prompt="p", engine="diffusers"), "sim-vast", "auto") == (
        "diffusers"
    )
    assert queue.engine_for(JobSpec(prompt="p"), "lambda", "preview") == "preview"
    assert queue.job_cost(0.36, 600) == 0.06
    assert queue.job_cost(0.36, -5) == 0.0
