"""What the loops observe for Prometheus as it happens: the guard's lag from a deadline to
the destroy call, job wait and run times, cold starts. The rest of /metrics (instances,
spend, credit, heartbeats, queue depth, destroy retries) is read from the App at scrape time
(web/metrics.py), so it cannot drift from the store.

The objects are registered in no global registry: each App has its own, so that two daemons
in one test process never share a series.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import Counter, Histogram
from prometheus_client.registry import Collector

# Seconds; a guard that is on time acts within a second of a deadline.
LAG_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
JOB_BUCKETS = (1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
COLD_BUCKETS = (5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0)


def _histogram(name: str, doc: str, buckets: tuple[float, ...], *labels: str) -> Histogram:
    return Histogram(name, doc, labels, buckets=buckets, registry=None)


@dataclass
class Metrics:
    guard_lag: Histogram = field(
        default_factory=lambda: _histogram(
            "gpuwarden_guard_deadline_lag_seconds",
            "From an instance's deadline to the guard's destroy call.",
            LAG_BUCKETS,
        )
    )
    job_wait: Histogram = field(
        default_factory=lambda: _histogram(
            "gpuwarden_job_wait_seconds",
            "From a job's submit to its start on an instance.",
            JOB_BUCKETS,
        )
    )
    job_run: Histogram = field(
        default_factory=lambda: _histogram(
            "gpuwarden_job_run_seconds",
            "From a job's start to its end, by outcome.",
            JOB_BUCKETS,
            "outcome",
        )
    )
    cold_start: Histogram = field(
        default_factory=lambda: _histogram(
            "gpuwarden_cold_start_seconds",
            "From a rental's intent to its first use over SSH, by provider and GPU.",
            COLD_BUCKETS,
            "provider",
            "gpu",
        )
    )
    cold_starts: Counter = field(
        default_factory=lambda: Counter(
            "gpuwarden_cold_starts",
            "Instances rented for jobs and reached over SSH, by provider and GPU.",
            ("provider", "gpu"),
            registry=None,
        )
    )

    def collectors(self) -> list[Collector]:
        return [self.guard_lag, self.job_wait, self.job_run, self.cold_start, self.cold_starts]

    def observe_cold_start(self, provider: str, gpu: str, seconds: float) -> None:
        self.cold_starts.labels(provider, gpu or "?").inc()
        self.cold_start.labels(provider, gpu or "?").observe(max(0.0, seconds))
