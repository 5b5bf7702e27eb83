"""The sim's pure parts: Vast filters and paging, billing arithmetic, fault knobs, catalog."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from gpuwarden.config.settings import SimFaultSettings
from gpuwarden.sim import catalog
from gpuwarden.sim.faults import FaultError, FaultState
from gpuwarden.sim.ledger import Ledger, LedgerEntry, billed_seconds, render
from gpuwarden.sim.vast_query import (
    QueryError,
    decode_token,
    instance_value,
    matches,
    offer_value,
    page_after,
    parse_offer_order,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
OFFER = catalog.vast_offer(
    next(m for m in catalog.VAST_MACHINES if m.ask_id == 15207788),
    allocated_gb=20,
    rented=False,
    bid=False,
)


@pytest.mark.parametrize(
    ("filters", "hit"),
    [
        ({"gpu_name": {"eq": "RTX 4090"}}, True),
        ({"gpu_name": {"in": ["RTX_4090"]}}, True),  # the CLI's underscores
        ({"gpu_name": {"notin": ["RTX 4090", "RTX 3090"]}}, False),
        ({"num_gpus": {"eq": "1"}}, True),  # numeric strings are coerced
        ({"gpu_ram": {"gte": "24000"}}, True),
        ({"gpu_ram": {"gt": 24564}}, False),
        ({"dph_total": {"lte": 0.3}}, False),
        ({"dph_total": {"lt": 0.4}}, True),
        ({"reliability": {"gte": 0.99}}, True),
        ({"verified": {"eq": True}}, True),
        ({"verified": {"eq": "false"}}, False),
        ({"geolocation": {"in": ["US", "CA"]}}, True),
        ({"geolocation": {"notin": ["US"]}}, False),
        ({"rentable": {"neq": False}}, True),
        ({"no_such_field": {"eq": 1}}, True),  # not filtered on
        ({"num_gpus": 1}, True),  # a bare value means eq
    ],
)
def test_offer_filters(filters: dict[str, object], hit: bool) -> None:
    assert matches(OFFER, filters, offer_value) is hit


def test_unknown_operator_is_an_error() -> None:
    with pytest.raises(QueryError):
        matches(OFFER, {"gpu_name": {"like": "RTX"}}, offer_value)
    with pytest.raises(QueryError):
        matches(OFFER, {"gpu_name": {"in": "RTX 4090"}}, offer_value)


def test_order_parsing() -> None:
    assert parse_offer_order(None) == [("score", True)]
    assert parse_offer_order([["dph_total", "asc"], ["dlperf", "desc"]]) == [
        ("dph_total", False),
        ("dlperf", True),
    ]
    with pytest.raises(QueryError):
        parse_offer_order("dph_total")


def test_keyset_paging_walks_every_row_once() -> None:
    rows = [{"id": i, "label": f"l{i % 3}"} for i in range(60, 0, -1)]
    seen: list[int] = []
    token = None
    for _ in range(5):
        page, token = page_after(rows, [("id", False)], token, 25)
        seen += [r["id"] for r in page]
        if token is None:
            break
    assert seen == list(range(1, 61))
    desc, _ = page_after(rows, [("label", True)], None, 3)
    assert [r["label"] for r in desc] == ["l2", "l2", "l2"]
    assert [r["id"] for r in desc] == [2, 5, 8]  # id breaks ties, ascending
    with pytest.raises(QueryError):
        decode_token("not-base64!")
    assert matches({"id": 3, "label": "x"}, {"label": {"eq": "x"}}, instance_value)


@pytest.mark.parametrize(
    ("kind", "secs", "billed"),
    [
        ("vast", 0, 0),
        ("vast", 0.2, 1),
        ("vast", 125.0, 125),
        ("vast", 125.4, 126),
        ("lambda", 0.2, 60),
        ("lambda", 60.0, 60),
        ("lambda", 60.5, 120),
        ("lambda", 125.4, 180),
    ],
)
def test_billing_granularity(kind: str, secs: float, billed: int) -> None:
    assert billed_seconds(kind, T0, T0 + timedelta(seconds=secs)) == billed  # type: ignore[arg-type]


def test_ledger_rows_and_totals() -> None:
    ledger = Ledger()
    ledger.open(LedgerEntry("vast", "1", "gw-a", 0.36, T0))
    ledger.open(LedgerEntry("lambda", "ab", "gw-b", 0.75, T0))
    end = T0 + timedelta(seconds=100)
    assert ledger.close("vast", "1", end, "api:account")
    assert not ledger.close("vast", "1", end + timedelta(seconds=5), "outside")  # once only
    data = ledger.to_json(T0 + timedelta(seconds=200))
    vast, lam = data["instances"]
    assert vast["billed_seconds"] == 100 and vast["cost"] == pytest.approx(0.01)
    assert vast["ended_by"] == "api:account" and not vast["running"]
    assert lam["billed_seconds"] == 240 and lam["running"]  # still billing at "now"
    assert data["running"] == 1
    assert data["total_cost"] == pytest.approx(0.01 + 0.05)
    assert ledger.spent("lambda", T0 + timedelta(seconds=200)) == pytest.approx(0.05)
    text = render(data)
    assert "STILL RUNNING" in text and "gw-a" in text


def test_fault_knobs_update_per_provider_and_count_down() -> None:
    faults = FaultState(SimFaultSettings(destroy_noop=1))
    faults.update({"vast": {"rate_5xx": 1.0}, "latency": "0.5s"})
    assert faults.get("vast").rate_5xx == 1.0 and faults.get("lambda").rate_5xx == 0.0
    assert faults.get("lambda").latency == timedelta(seconds=0.5)
    assert faults.roll("vast") == "5xx" and faults.roll("lambda") is None
    assert faults.take("lambda", "destroy_noop") and not faults.take("lambda", "destroy_noop")
    assert faults.take("vast", "destroy_noop")  # each provider has its own count
    assert faults.injected == {"vast:5xx": 1, "lambda:destroy_noop": 1, "vast:destroy_noop": 1}
    with pytest.raises(FaultError):
        faults.update({"rate_429": 2})
    with pytest.raises(FaultError):
        faults.update({"no_such_knob": 1})
    assert faults.get("vast").rate_429 == 0.0  # a bad update changes nothing


def test_seeded_rates_repeat() -> None:
    def draws(seed: int) -> list[object]:
        f = FaultState(SimFaultSettings(rate_5xx=0.5, seed=seed))
        return [f.roll("vast") for _ in range(20)]

    assert draws(1) == draws(1)
    assert "5xx" in draws(1) and None in draws(1)


def test_catalog_matches_the_reference_units() -> None:
    assert OFFER["gpu_ram"] == 24564  # MB
    assert OFFER["dph_total"] == pytest.approx(0.349 + 0.2 * 20 / 720, abs=1e-6)
    assert OFFER["geolocation"] == "Texas, US"
    types = catalog.lambda_instance_types()
    a10 = types["gpu_1x_a10"]
    assert a10["instance_type"]["price_cents_per_hour"] == 75
    assert [r["name"] for r in a10["regions_with_capacity_available"]] == ["us-east-1", "us-west-1"]
    assert all(r in catalog.LAMBDA_REGIONS for t in catalog.LAMBDA_TYPES for r in t.regions)
    ids = [m.ask_id for m in catalog.VAST_MACHINES]
    assert len(ids) == len(set(ids))


def test_an_outbid_spot_entry_bills_only_storage_from_the_stop_to_the_destroy() -> None:
    ledger = Ledger()
    ledger.open(LedgerEntry("vast", "1", "gw-a", 0.36, T0, spot=True, storage_per_hour=0.036))
    assert ledger.stop("vast", "1", T0 + timedelta(seconds=100))
    assert not ledger.stop("vast", "1", T0 + timedelta(seconds=200))  # already stopped
    ledger.close("vast", "1", T0 + timedelta(seconds=3700), "api:account")
    [row] = ledger.to_json(T0)["instances"]
    assert row["stopped_at"] is not None and row["billed_seconds"] == 3700
    assert row["cost"] == pytest.approx((0.36 * 100 + 0.036 * 3600) / 3600)
    assert "(outbid" in render(ledger.to_json(T0))


def test_gpuwarden_sim_sets_the_outbid_rate_and_refuses_a_bad_one() -> None:
    from gpuwarden.cli import build_parser
    from gpuwarden.cli.commands_sim import _settings

    args = build_parser().parse_args(["sim", "--outbid-rate", "6"])
    assert _settings(args).faults.outbid_rate == 6
    bad = build_parser().parse_args(["sim", "--outbid-rate", "-1"])
    with pytest.raises(ValueError, match="outbid_rate"):
        _settings(bad)
