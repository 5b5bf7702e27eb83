"""/metrics: the Prometheus text exposition of one scrape.

What the store and the App hold is read at scrape time (one async snapshot, then a custom
Collector yields it), so a gauge can never drift from the database; what happens in between
(deadline lag, job times, cold starts) comes from the histograms the loops observe
(fleet/metrics.py). Money is in dollars, times in seconds, counters end in `_total`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector

from gpuwarden.control.instances import budget_json
from gpuwarden.core import policy
from gpuwarden.core.model import QUEUE_PAUSED_FLAG, InstanceState, JobState
from gpuwarden.fleet.app import App
from gpuwarden.fleet.busy import busy_instances, observations

# The classic text format: every Prometheus version reads it, and our names are plain ASCII.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
LIVE = (
    InstanceState.REQUESTED,
    InstanceState.PROVISIONING,
    InstanceState.RUNNING,
    InstanceState.TERMINATING,
)


@dataclass
class Snapshot:
    instances: dict[tuple[str, str], int] = field(default_factory=dict)  # (state, provider)
    past_deadline: int = 0
    strikes: dict[tuple[str, str], int] = field(default_factory=dict)  # (instance, provider)
    budget: dict[str, dict[str, float | None]] = field(default_factory=dict)
    credit: dict[str, float] = field(default_factory=dict)
    heartbeats: dict[str, float] = field(default_factory=dict)
    queued: int = 0
    queue_paused: bool = False
    retries: dict[str, int] = field(default_factory=dict)


async def snapshot(app: App) -> Snapshot:
    now = app.clock.now()
    limits = app.limits()
    live = await app.store.live_instances()
    busy = await busy_instances(app) if live else set()
    snap = Snapshot()
    for provider in app.providers:
        for state in LIVE:
            snap.instances[(state.value, provider)] = 0
    for inst in live:
        key = (inst.state.value, inst.provider)
        snap.instances[key] = snap.instances.get(key, 0) + 1
        snap.strikes[(inst.id, inst.provider)] = inst.strikes
        when, _ = policy.earliest_deadline(inst, observations(inst, busy), limits, now)
        snap.past_deadline += now >= when
    # The time read again: the awaits above let others ask the kept totals at a later time,
    # and a time earlier than theirs is computed instance by instance (core/totals.py).
    snap.budget = await budget_json(app, app.clock.now())
    snap.credit = dict(app.credit)
    snap.heartbeats = app.heartbeats.ages()
    snap.queued = len(await app.store.jobs([JobState.QUEUED], limit=1_000_000))
    snap.queue_paused = bool(await app.store.get_flag(QUEUE_PAUSED_FLAG, False))
    snap.retries = {p: 0 for p in app.providers} | app.terminator.retries
    return snap


class SnapshotCollector(Collector):
    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap

    def collect(self) -> Iterator[Metric]:
        s = self.snap
        g = GaugeMetricFamily(
            "gpuwarden_instances",
            "Live instances by state and provider.",
            labels=["state", "provider"],
        )
        for (state, provider), n in sorted(s.instances.items()):
            g.add_metric([state, provider], n)
        yield g
        yield GaugeMetricFamily(
            "gpuwarden_instances_past_deadline",
            "Live instances (ending ones too) whose earliest deadline has passed: still billing.",
            value=s.past_deadline,
        )
        g = GaugeMetricFamily(
            "gpuwarden_instance_strikes",
            "Consecutive failed watchdog probes of each live instance.",
            labels=["instance", "provider"],
        )
        for (iid, provider), n in sorted(s.strikes.items()):
            g.add_metric([iid, provider], n)
        yield g
        yield from self._money()
        g = GaugeMetricFamily(
            "gpuwarden_loop_heartbeat_age_seconds",
            "Seconds since each loop last beat.",
            labels=["loop"],
        )
        for name, age in sorted(s.heartbeats.items()):
            g.add_metric([name], age)
        yield g
        yield GaugeMetricFamily(
            "gpuwarden_jobs_queued", "Jobs waiting in the queue.", value=s.queued
        )
        yield GaugeMetricFamily(
            "gpuwarden_queue_paused", "1 while the job queue is paused.", value=int(s.queue_paused)
        )
        c = CounterMetricFamily(
            "gpuwarden_destroy_retries",
            "Failed destroy attempts (each is retried) since the daemon started, by provider.",
            labels=["provider"],
        )
        for provider, n in sorted(s.retries.items()):
            c.add_metric([provider], n)
        yield c

    def _money(self) -> Iterator[Metric]:
        s = self.snap
        families = {
            "spent": GaugeMetricFamily(
                "gpuwarden_spend_dollars",
                "Spend recorded in the budget window (daily: today UTC, monthly: this month).",
                labels=["window"],
            ),
            "committed": GaugeMetricFamily(
                "gpuwarden_spend_committed_dollars",
                "Spend recorded plus what live instances can still bill, per budget window.",
                labels=["window"],
            ),
            "limit": GaugeMetricFamily(
                "gpuwarden_budget_limit_dollars",
                "The budget limit of each window (absent without a limit).",
                labels=["window"],
            ),
        }
        for window, values in sorted(s.budget.items()):
            for key, family in families.items():
                value = values.get(key)
                if value is not None:
                    family.add_metric([window], value)
        yield from families.values()
        g = GaugeMetricFamily(
            "gpuwarden_account_credit_dollars",
            "Account credit by provider, as last read by the reconciler.",
            labels=["provider"],
        )
        for provider, credit in sorted(s.credit.items()):
            g.add_metric([provider], credit)
        yield g


async def render(app: App) -> bytes:
    """One scrape: the snapshot read now, and the loops' histograms."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(await snapshot(app)))
    for collector in app.metrics.collectors():
        registry.register(collector)
    return generate_latest(registry)
