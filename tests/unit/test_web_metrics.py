"""/metrics on a FakeClock: what the guard observes and what is read at scrape time."""

from __future__ import annotations

from pathlib import Path

import pytest
from guard_support import Recorder, running_guard, settings
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from tests.conftest import MakeApp

from gpuwarden.core.clock import FakeClock
from gpuwarden.fleet import launcher
from gpuwarden.fleet.app import App
from gpuwarden.providers.fake import FakeProvider
from gpuwarden.web import metrics


async def scrape(app: App) -> dict[str, list[Sample]]:
    text = (await metrics.render(app)).decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def value(samples: list[Sample], name: str, **labels: str) -> float:
    found = [s.value for s in samples if s.name == name and s.labels == labels]
    assert len(found) == 1, (name, labels, samples)
    return found[0]


async def test_the_guard_observes_its_lag_and_the_terminator_counts_retries(
    tmp_path: Path, make_app: MakeApp, clock: FakeClock
) -> None:
    fake = FakeProvider(clock, "fake")
    app = await make_app(settings(tmp_path, idle_timeout="5m"), clock, [fake])
    rec = Recorder(app.store)
    async with running_guard(app) as run:
        inst = await launcher.launch(app, fake.offers[0], hours=1)
        got = await scrape(app)
        assert (
            value(
                got["gpuwarden_instances"], "gpuwarden_instances", state="running", provider="fake"
            )
            + value(
                got["gpuwarden_instances"],
                "gpuwarden_instances",
                state="provisioning",
                provider="fake",
            )
            == 1
        )
        assert (
            value(got["gpuwarden_instances_past_deadline"], "gpuwarden_instances_past_deadline")
            == 0
        )
        fake.faults.fail_next["destroy"] = 2
        await run.quiet()
        await run.step(clock, 300)  # the idle deadline: destroy fails twice, then ends it
        for _ in range(4):
            await run.step(clock, 5)
        await rec.terminated(inst.id)
    got = await scrape(app)
    lag = got["gpuwarden_guard_deadline_lag_seconds"]
    assert value(lag, "gpuwarden_guard_deadline_lag_seconds_count") == 1
    assert value(lag, "gpuwarden_guard_deadline_lag_seconds_sum") == pytest.approx(0, abs=0.5)
    retries = got["gpuwarden_destroy_retries"]
    assert value(retries, "gpuwarden_destroy_retries_total", provider="fake") == 2
    assert (
        value(got["gpuwarden_instances"], "gpuwarden_instances", state="running", provider="fake")
        == 0
    )


async def test_money_queue_and_heartbeats_are_read_at_scrape_time(
    tmp_path: Path, make_app: MakeApp, clock: FakeClock
) -> None:
    fake = FakeProvider(clock, "fake")
    conf = settings(tmp_path).model_copy(
        update={"budget": settings(tmp_path).budget.model_copy(update={"daily_limit": 10.0})}
    )
    app = await make_app(conf, clock, [fake])
    app.credit["fake"] = 42.5
    app.heartbeats.register("guard")
    await launcher.launch(app, fake.offers[0], hours=2)
    await clock.advance(3600)
    got = await scrape(app)
    price = fake.offers[0].price_per_hour
    spent = value(got["gpuwarden_spend_dollars"], "gpuwarden_spend_dollars", window="daily")
    assert spent == pytest.approx(price, rel=0.01)  # one hour of the instance, so far
    committed = value(
        got["gpuwarden_spend_committed_dollars"],
        "gpuwarden_spend_committed_dollars",
        window="daily",
    )
    assert committed == pytest.approx(2 * price, rel=0.01)
    assert (
        value(
            got["gpuwarden_budget_limit_dollars"], "gpuwarden_budget_limit_dollars", window="daily"
        )
        == 10
    )
    assert not [s for s in got["gpuwarden_budget_limit_dollars"] if s.labels["window"] != "daily"]
    assert (
        value(
            got["gpuwarden_account_credit_dollars"],
            "gpuwarden_account_credit_dollars",
            provider="fake",
        )
        == 42.5
    )
    assert (
        value(
            got["gpuwarden_loop_heartbeat_age_seconds"],
            "gpuwarden_loop_heartbeat_age_seconds",
            loop="guard",
        )
        == 3600
    )
    assert value(got["gpuwarden_jobs_queued"], "gpuwarden_jobs_queued") == 0
