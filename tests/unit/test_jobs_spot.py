"""Pure spot decisions: the bid and its bound, the preemption risk, the expected cost, the
fallback to on-demand, the queue front, and what `costs` reports."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from gpuwarden.config.settings import Settings
from gpuwarden.core.model import (
    Instance,
    InstanceState,
    Job,
    JobSpec,
    JobState,
    Termination,
    TerminationReason,
)
from gpuwarden.jobs import decisions as queue
from gpuwarden.jobs import spot
from gpuwarden.jobs.spec import build_spec
from gpuwarden.providers.base import Offer

T0 = datetime(2026, 1, 1, tzinfo=UTC)

prices = st.floats(min_value=0.0001, max_value=50, allow_nan=False, allow_infinity=False)


@given(
    min_bid=prices,
    storage=st.floats(min_value=0, max_value=2, allow_nan=False),
    factor=st.floats(min_value=1, max_value=10, allow_nan=False),
    cap=st.none() | prices,
)
def test_a_bid_is_at_least_the_minimum_and_never_above_the_cap(
    min_bid: float, storage: float, factor: float, cap: float | None
) -> None:
    bid = spot.bid_for(min_bid, storage, factor, cap)
    if bid is None:  # only when even the minimum bid does not fit
        assert cap is not None and min_bid + storage > cap - 1e-6
        return
    assert bid >= min_bid - 1e-6
    assert bid <= min_bid * factor + 1e-6
    if cap is not None:
        assert bid + storage <= cap  # exact: the launch's price check is strict


def test_the_bid_is_the_minimum_times_the_factor_lowered_to_the_cap() -> None:
    assert spot.bid_for(0.1, 0.01, 1.2, None) == pytest.approx(0.12)
    assert spot.bid_for(0.1, 0.01, 1.2, 0.12) == pytest.approx(0.11)  # storage counts
    assert spot.bid_for(0.1, 0.01, 1.2, 0.10) is None  # even the minimum is over the cap


def offer(oid: str, price: float, *, rel: float = 0.99, provider: str = "sim-vast") -> Offer:
    return Offer(provider, oid, "RTX 4090", 1, 24, price, "EU", reliability=rel)


def spot_of(o: Offer, min_bid: float, storage: float = 0.01) -> Offer:
    return replace(
        o,
        interruptible=True,
        min_bid=min_bid,
        storage_per_hour=storage,
        price_per_hour=min_bid + storage,
        on_demand_price=o.price_per_hour,
    )


def test_with_bids_places_bids_and_drops_spot_for_a_no_spot_job() -> None:
    od = offer("1", 0.40)
    sp = spot_of(od, 0.18)
    placed = spot.with_bids([od, sp], spot=True, factor=1.2, cap=0.5)
    assert placed[0] == od
    assert placed[1].bid == pytest.approx(0.216)
    assert placed[1].price_per_hour == pytest.approx(0.226)
    assert spot.with_bids([od, sp], spot=False, factor=1.2, cap=0.5) == [od]
    assert spot.with_bids([sp], spot=True, factor=1.2, cap=0.15) == []  # min bid over the cap


def test_the_prior_risk_grows_with_unreliability_and_gives_way_to_what_was_seen() -> None:
    assert spot.hazard(1.0, None) == pytest.approx(spot.SPOT_PRIOR_HAZARD)
    assert spot.hazard(0.9, None) == pytest.approx(spot.SPOT_PRIOR_HAZARD + 0.1)
    often = spot.hazard(1.0, spot.Exposure(preemptions=20, hours=10))
    never = spot.hazard(1.0, spot.Exposure(preemptions=0, hours=100))
    assert often > 1.5 and never < spot.SPOT_PRIOR_HAZARD / 50


def test_spot_wins_by_expected_cost_until_preemptions_make_it_dearer() -> None:
    od = offer("1", 0.40)
    sp = replace(spot_of(offer("2", 0.40), 0.15), bid=0.18, price_per_hour=0.19)
    work = 600.0
    assert spot.by_expected_cost([od, sp], work, {})[0] is sp
    # Outbid about every two minutes on this provider and GPU: a re-run is near certain.
    seen = {spot.exposure_key("sim-vast", "RTX 4090"): spot.Exposure(preemptions=300, hours=10)}
    assert spot.by_expected_cost([sp, od], work, seen)[0] is od
    assert spot.expected_cost(od, work, 100.0) == pytest.approx(0.40 * work / 3600)


def test_exposures_count_preemptions_and_hours_per_provider_and_gpu() -> None:
    def end(reason: TerminationReason, uptime: float, gpu: str = "RTX 4090") -> Termination:
        return Termination(T0, "i", "sim-vast", "p", reason, uptime, gpu, "EU", 0.2, 0.01)

    seen = spot.exposures(
        [
            end(TerminationReason.PREEMPTED, 1800),
            end(TerminationReason.JOB_DONE, 1800),
            end(TerminationReason.PREEMPTED, 3600, "RTX 3090"),
        ]
    )
    assert seen[("sim-vast", "RTX 4090")] == spot.Exposure(1, 1.0)
    assert seen[("sim-vast", "RTX 3090")] == spot.Exposure(1, 1.0)


def job(spot_choice: bool | None = None, **extra: object) -> Job:
    return Job(
        id="j",
        state=JobState.QUEUED,
        spec=JobSpec(prompt="p", spot=spot_choice),
        created_at=T0,
        updated_at=T0,
        extra=dict(extra),
    )


def test_a_job_falls_back_to_on_demand_after_three_preemptions() -> None:
    assert spot.wants_spot(job(), True) and not spot.wants_spot(job(), False)
    assert not spot.wants_spot(job(False), True)
    assert spot.wants_spot(job(True, preemptions=2), False)
    assert not spot.wants_spot(job(True, preemptions=spot.FALLBACK_AFTER), True)


def test_a_preempted_job_goes_to_the_front_of_its_priority() -> None:
    old = replace(job(), id="old", created_at=T0 - timedelta(hours=1))
    back = replace(job(front=True), id="back")
    urgent = replace(job(), id="urgent", priority=5)
    assert [j.id for j in queue.queue_order([old, back, urgent])] == ["urgent", "back", "old"]


def test_the_summary_shows_what_spot_saved_and_what_preemptions_cost() -> None:
    def end(reason: TerminationReason, uptime: float, cost: float) -> Termination:
        return Termination(T0, "i", "sim-vast", "p", reason, uptime, "x", "EU", 0.2, cost)

    out = spot.summary(
        [
            (end(TerminationReason.JOB_DONE, 3600, 0.2), {"on_demand_price": 0.5}),
            (end(TerminationReason.PREEMPTED, 60, 0.2 / 60), {"on_demand_price": 0.5}),
        ]
    )
    assert out["instances"] == 2 and out["preemptions"] == 1
    assert out["paid"] == pytest.approx(0.2 + 0.2 / 60, abs=1e-6)
    assert out["on_demand"] == pytest.approx(0.5 + 0.5 / 60, abs=1e-6)
    assert out["saved"] == pytest.approx(0.3 + 0.3 / 60, abs=1e-6)
    assert out["rerun_s"] == 60 and out["rerun_cost"] == pytest.approx(0.2 / 60, abs=1e-6)


def test_a_job_kept_off_spot_does_not_take_a_warm_spot_instance() -> None:
    warm = Instance(
        id="i1",
        provider="sim-vast",
        label="l",
        state=InstanceState.RUNNING,
        created_at=T0,
        lease_until=T0 + timedelta(hours=1),
        last_activity=T0,
        price_per_hour=0.1,
        extra={"spot": {"bid": 0.09}},
    )
    cap = queue.Capability(24.0, 0.1)
    assert queue.fits(JobSpec(prompt="p"), warm, cap, 8.0)
    assert not queue.fits(JobSpec(prompt="p"), warm, cap, 8.0, spot_ok=False)
    on_demand = replace(warm, extra={})
    assert queue.fits(JobSpec(prompt="p"), on_demand, cap, 8.0, spot_ok=False)


@pytest.mark.parametrize(
    ("flags", "sent"), [([], None), (["--spot"], True), (["--no-spot"], False)]
)
def test_submit_spot_flags_reach_the_request(flags: list[str], sent: bool | None) -> None:
    from gpuwarden.cli import build_parser
    from gpuwarden.cli.commands_jobs import _submit_params

    args = build_parser().parse_args(["submit", "--prompt", "a fox", *flags])
    assert _submit_params(args).get("spot") is sent


@pytest.mark.parametrize(("interruptible", "asked", "spot_of"), [
    (True, None, True), (False, None, False), (False, True, True), (True, False, False),
])  # fmt: skip
def test_a_jobs_market_is_decided_at_submit(
    tmp_path: Path, interruptible: bool, asked: bool | None, spot_of: bool
) -> None:
    s = Settings(daemon={"state_dir": str(tmp_path)}, jobs={"interruptible": interruptible})
    assert build_spec(s.jobs, prompt="a fox", spot=asked).spot is spot_of


def test_bad_spot_settings_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as info:
        Settings(jobs={"bid_factor": 0.5})
    assert "bid_factor" in str(info.value)


def test_costs_text_shows_what_spot_saved_and_what_preemptions_cost() -> None:
    import io

    from gpuwarden.cli.commands_views import _show_spot
    from gpuwarden.cli.output import Out

    buf = io.StringIO()
    out = Out(stdout=buf, stderr=io.StringIO())
    _show_spot(out, {"instances": 0})
    assert buf.getvalue() == ""  # no spot instance ended: nothing to say
    summary = {"instances": 3, "paid": 0.0006, "on_demand": 0.0011, "saved": 0.0005}
    _show_spot(out, {**summary, "preemptions": 1, "rerun_s": 5.2, "rerun_cost": 0.0001})
    text = buf.getvalue()
    assert "Spot: 3 instance(s) paid $0.0006; on demand $0.0011: saved $0.0005." in text
    assert "Preemptions: 1; re-run 5s of work, costing $0.0001." in text
