"""`status` at scale: the first page by default, --limit, --all and the provider/state/GPU
filters (totals over every match, kept or walked alike), and the plain layout of tables too
long for rich."""

from __future__ import annotations

import io
from datetime import timedelta

import pytest
from tests.conftest import T0, MakeApp

from gpuwarden.cli import build_parser
from gpuwarden.cli import commands_views as views
from gpuwarden.cli.output import PLAIN_ROWS, Out
from gpuwarden.control import instances as api
from gpuwarden.core.clock import FakeClock
from gpuwarden.core.model import QUEUE_PAUSED_FLAG, Instance, InstanceState, TerminationReason


def _inst(n: int, provider: str, gpu: str, state: InstanceState, clock: FakeClock) -> Instance:
    now = clock.now()
    return Instance(
        id=f"i{n:04d}",
        provider=provider,
        label=f"gpuwarden-main-i{n:04d}",
        state=state,
        created_at=now + timedelta(seconds=n),
        lease_until=now + timedelta(hours=1),
        last_activity=now,
        price_per_hour=1.0,
        gpu=gpu,
        provider_id=f"p{n}",
    )


async def test_status_limits_and_filters_with_totals_over_every_match(
    make_app: MakeApp,
) -> None:
    clock = FakeClock(T0)
    app = await make_app(clock=clock)
    kinds = [
        ("vast", "RTX 4090", InstanceState.RUNNING),
        ("lambda", "A100 80GB", InstanceState.PROVISIONING),
        ("vast", "A10", InstanceState.RUNNING),
    ]
    for n in range(30):
        provider, gpu, state = kinds[n % 3]
        await app.store.insert_instance(_inst(n, provider, gpu, state, clock))
    everything = await api.status(app)
    assert everything["count"] == everything["shown"] == 30
    page = await api.status(app, limit=4)
    assert [r["id"] for r in page["instances"]] == ["i0000", "i0001", "i0002", "i0003"]
    assert page["count"] == 30 and page["cost_per_hour"] == everything["cost_per_hour"]
    vast = await api.status(app, provider="vast")
    assert vast["count"] == 20 and {r["provider"] for r in vast["instances"]} == {"vast"}
    a10 = await api.status(app, gpu="A10")  # whole words: not the A100s
    assert a10["count"] == 10 and {r["gpu"] for r in a10["instances"]} == {"A10"}
    booting = await api.status(app, state="provisioning", limit=3)
    assert booting["count"] == 10 and booting["shown"] == 3
    assert booting["cost_per_hour"] == 10.0
    one = await api.status(app, id="i0004")  # launch --wait watches the one it rented
    assert [r["id"] for r in one["instances"]] == ["i0004"] and one["count"] == 1
    assert one["cost_per_hour"] == 1.0
    assert (await api.status(app, id="i0004", provider="lambda"))["count"] == 1
    assert (await api.status(app, id="i0004", provider="vast"))["count"] == 0
    assert (await api.status(app, id="nope"))["instances"] == []


def test_a_long_table_is_laid_out_plainly_with_the_same_columns() -> None:
    buf = io.StringIO()
    out = Out(stdout=buf, width=200)
    rows = [[f"id{n}", f"{n * 1.5:.2f}"] for n in range(PLAIN_ROWS + 1)]
    out.table(["ID", "COST"], rows, totals=["TOTAL", "9.99"], right=["COST"])
    lines = buf.getvalue().splitlines()
    assert lines[0].split() == ["ID", "COST"]
    assert len(lines) == 1 + len(rows) + 2  # header, rows, the rule, the totals
    assert lines[-1].split() == ["TOTAL", "9.99"]
    width = len(lines[1])
    assert all(len(line) == width for line in lines[1:-2])  # right-aligned to one edge
    assert lines[-2].startswith("---")


async def test_status_answers_the_first_page_by_default_with_totals_over_every_instance(
    make_app: MakeApp,
) -> None:
    clock = FakeClock(T0)
    app = await make_app(clock=clock)
    for n in range(api.STATUS_PAGE + 30):
        await app.store.insert_instance(_inst(n, "vast", "RTX 4090", InstanceState.RUNNING, clock))
    await clock.advance(433.000005)
    page = await api.status(app)
    assert page["count"] == api.STATUS_PAGE + 30 and page["shown"] == api.STATUS_PAGE
    assert [r["id"] for r in page["instances"]][:2] == ["i0000", "i0001"]
    every = await api.status(app, all=True)
    assert every["shown"] == every["count"] == api.STATUS_PAGE + 30
    # The kept totals (no filter) equal the ones a filter computes instance by instance.
    walked = await api.status(app, provider="vast", limit=1)
    for key in ("cost_per_hour", "cost_now", "est_total"):
        assert page[key] == pytest.approx(walked[key], abs=1e-6), key
        assert page[key] == every[key], key
    assert page["cost_now"] > 0 and page["budget"] == walked["budget"]
    # An end moves the totals at once.
    await app.store.transition_instance(
        "i0000", InstanceState.TERMINATED, reason=TerminationReason.MANUAL
    )
    after = await api.status(app)
    assert after["count"] == api.STATUS_PAGE + 29
    assert after["instances"][0]["id"] == "i0001"
    assert after["cost_per_hour"] == pytest.approx(page["cost_per_hour"] - 1.0)


def test_the_cli_says_when_rows_are_left_out_and_takes_all_or_a_limit() -> None:
    reply = {"count": 10_000, "shown": 100}
    rows: list[dict[str, object]] = [{}] * 100
    assert views._left_out(reply, rows, False) == (
        "showing 100 of 10,000 live instances; --limit N or --all for more"
    )
    assert "matching" in str(views._left_out(reply, rows, True))
    assert views._left_out({"count": 100}, rows, False) is None  # nothing left out: no line
    assert build_parser().parse_args(["status", "--all"]).all is True
    with pytest.raises(SystemExit):
        build_parser().parse_args(["status", "--all", "--limit", "5"])


async def test_status_reads_a_flag_again_once_it_is_written(make_app: MakeApp) -> None:
    app = await make_app()
    assert (await api.status(app))["queue_paused"] is False  # read once, then kept
    await app.store.set_flag(QUEUE_PAUSED_FLAG, True, reason="user")
    after = await api.status(app)
    assert after["queue_paused"] is True and after["queue_paused_reason"] == "user"
