"""/metrics after a real job on the sim cloud: every metric the issue names, with values
that match what happened (one cold start, one job waited and ran, one warm instance)."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest
from jobs_support import job_env, job_settings
from prometheus_client.parser import text_string_to_metric_families

from gpuwarden.core.model import JobState
from gpuwarden.loops.reconciler import Reconciler
from gpuwarden.web.server import DashboardServer

pytestmark = pytest.mark.slow

NAMED_IN_THE_ISSUE = {
    "gpuwarden_instances": "gauge",  # by state and provider
    "gpuwarden_instances_past_deadline": "gauge",
    "gpuwarden_spend_dollars": "gauge",  # today and this month
    "gpuwarden_spend_committed_dollars": "gauge",
    "gpuwarden_budget_limit_dollars": "gauge",  # the limits
    "gpuwarden_account_credit_dollars": "gauge",
    "gpuwarden_instance_strikes": "gauge",
    "gpuwarden_loop_heartbeat_age_seconds": "gauge",
    "gpuwarden_guard_deadline_lag_seconds": "histogram",
    "gpuwarden_destroy_retries": "counter",
    "gpuwarden_jobs_queued": "gauge",
    "gpuwarden_job_wait_seconds": "histogram",
    "gpuwarden_job_run_seconds": "histogram",
    "gpuwarden_cold_starts": "counter",
    "gpuwarden_cold_start_seconds": "histogram",
}


async def test_metrics_after_a_job_on_the_sim(tmp_path: Path) -> None:
    base = job_settings(tmp_path, keep_warm="10m")
    settings = base.model_copy(
        update={
            "dashboard": base.dashboard.model_copy(update={"listen": "127.0.0.1:0"}),
            "budget": base.budget.model_copy(update={"daily_limit": 5.0, "monthly_limit": 50.0}),
        }
    )
    async with job_env(tmp_path, settings=settings) as env:
        server = DashboardServer(env.app)
        await server.start()
        try:
            job_id = await env.submit(steps=3)
            job = await env.wait_job(job_id, {JobState.SUCCEEDED, JobState.FAILED})
            assert job.state is JobState.SUCCEEDED, job.error
            await Reconciler(env.app).pass_once()  # reads the account's credit
            inst = await env.store.get_instance(job.instance_id or "")
            gpu, provider = inst.gpu, inst.provider
            assert server.auth is not None
            headers = {"Authorization": f"Bearer {server.auth.token}"}
            async with (
                aiohttp.ClientSession() as http,
                http.get(server.url + "metrics", headers=headers) as r,
            ):
                assert r.status == 200
                assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                text = await r.text()
        finally:
            await server.aclose()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, kind in NAMED_IN_THE_ISSUE.items():
        assert name in families, name
        assert families[name].type == kind, name

    def one(name: str, **labels: str) -> float:
        found = [
            s.value
            for f in families.values()
            for s in f.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]
        assert len(found) == 1, (name, labels, found)
        return found[0]

    assert one("gpuwarden_instances", state="running", provider=provider) == 1  # kept warm
    assert one("gpuwarden_instances", state="terminating", provider=provider) == 0
    assert one("gpuwarden_instances_past_deadline") == 0
    assert one("gpuwarden_instance_strikes", instance=job.instance_id or "") == 0
    assert 0 < one("gpuwarden_spend_committed_dollars", window="daily") < 5
    assert one("gpuwarden_budget_limit_dollars", window="monthly") == 50
    assert 0 < one("gpuwarden_account_credit_dollars", provider=provider) <= 100
    assert 0 <= one("gpuwarden_loop_heartbeat_age_seconds", loop="jobs") < 60
    assert one("gpuwarden_destroy_retries_total", provider=provider) == 0
    assert one("gpuwarden_jobs_queued") == 0
    assert one("gpuwarden_cold_starts_total", provider=provider, gpu=gpu) == 1
    assert 0 < one("gpuwarden_cold_start_seconds_sum", provider=provider, gpu=gpu) < 60
    assert one("gpuwarden_job_wait_seconds_count") == 1
    assert one("gpuwarden_job_run_seconds_count", outcome="succeeded") == 1
    assert 0 < one("gpuwarden_job_run_seconds_sum", outcome="succeeded") < 60
    assert one("gpuwarden_guard_deadline_lag_seconds_count") == 0  # nothing reached one yet
