"""The job handlers as people use them: `jobs --limit N` shows the newest N, newest first
(the oldest first hid every new job after 50), and a job is named by a unique id prefix."""

from __future__ import annotations

from pathlib import Path

import pytest
from jobs_fakes import add_instance, add_job, settings
from tests.conftest import MakeApp

from gpuwarden.config.settings import Settings
from gpuwarden.control import instances
from gpuwarden.control import jobs as api
from gpuwarden.core import errors
from gpuwarden.core.clock import FakeClock
from gpuwarden.core.model import QUEUE_PAUSED_FLAG, JobState


async def test_the_list_is_the_newest_first(
    tmp_path: Path, make_app: MakeApp, clock: FakeClock
) -> None:
    app = await make_app(settings(tmp_path), clock)
    for jid in ("j01", "j02", "j03", "j04"):
        await add_job(app, jid, priority=9 if jid == "j01" else 0)  # priority: not the order
        await clock.advance(10)
    assert [j["id"] for j in await api.list(app, limit=2)] == ["j04", "j03"]
    assert [j["id"] for j in await api.list(app)] == ["j04", "j03", "j02", "j01"]
    # The jobs loop still takes them in queue order.
    assert next(j.id for j in await app.store.jobs([JobState.QUEUED])) == "j01"


async def test_a_job_is_named_by_a_unique_prefix(
    tmp_path: Path, make_app: MakeApp, clock: FakeClock
) -> None:
    app = await make_app(settings(tmp_path), clock)
    for jid in ("jab12aa", "jab12bb", "jcd34cc"):
        await add_job(app, jid)
    assert (await api.get(app, "jcd3"))["id"] == "jcd34cc"
    assert (await api.get(app, "jab12a"))["id"] == "jab12aa"
    with pytest.raises(errors.Ambiguous, match=r"jab12aa.*jab12bb"):
        await api.get(app, "jab12")
    with pytest.raises(errors.NotFound, match="at least 4 characters"):
        await api.get(app, "jcd")
    with pytest.raises(errors.NotFound):
        await api.get(app, "j%%%")  # text, not a LIKE pattern
    cancelled = await api.cancel(app, "jcd34", by="test")
    assert cancelled["id"] == "jcd34cc" and cancelled["state"] == "cancelled"


async def test_status_names_the_job_running_on_an_instance(
    tmp_path: Path, make_app: MakeApp, clock: FakeClock
) -> None:
    app = await make_app(settings(tmp_path), clock)
    await add_instance(app, "i1")
    await add_instance(app, "i2")
    await add_job(app, "jbusy", JobState.RUNNING, instance_id="i1")
    await add_job(app, "jdone", JobState.SUCCEEDED, instance_id="i2")
    rows = {r["id"]: r for r in (await instances.status(app))["instances"]}
    assert (rows["i1"]["job"], rows["i1"]["busy"]) == ("jbusy", True)
    assert (rows["i2"]["job"], rows["i2"]["busy"]) == (None, False)


async def test_costs_and_status_show_the_budget_and_why_the_queue_is_paused(
    tmp_path: Path, make_app: MakeApp, clock: FakeClock
) -> None:
    conf = settings(tmp_path).model_copy(
        update={"budget": Settings(budget={"daily_limit": 10.0}).budget}
    )
    app = await make_app(conf, clock)
    await add_instance(app, "i1", price_per_hour=0.5)  # 4 h lease: $2 committed
    costs = await instances.costs(app)
    day = costs["budget"]["daily"]
    assert (day["limit"], day["spent"], day["committed"], day["left"]) == (10.0, 0.0, 2.0, 8.0)
    assert costs["budget"]["monthly"]["left"] is None  # no monthly limit
    assert costs["queue_paused"] is False and costs["queue_paused_reason"] is None
    await app.store.set_flag(QUEUE_PAUSED_FLAG, True, reason="insufficient_credit")
    for got in (await instances.costs(app), await instances.status(app)):
        assert got["queue_paused"] is True
        assert got["queue_paused_reason"] == "insufficient_credit"
        assert got["queue_paused_since"]
