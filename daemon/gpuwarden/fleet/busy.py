"""Which instances have a job on them: the guard treats them as active at `now`, and
`status` shows it. The jobs loop owns the job rows; this only reads them."""

from __future__ import annotations

from collections.abc import Set as AbstractSet

from gpuwarden.core import policy
from gpuwarden.core.model import Instance, JobState
from gpuwarden.fleet.app import App

# Jobs in these states hold their instance busy (activity at `now`).
BUSY_JOB_STATES = (JobState.PROVISIONING, JobState.RUNNING, JobState.FETCHING)


async def busy_instances(app: App) -> set[str]:
    """Instances with a job on them (the jobs service owns those rows; we only read)."""
    return set(await jobs_on_instances(app))


async def jobs_on_instances(app: App) -> dict[str, str]:
    """Instance id -> the id of the job that holds it busy."""
    return await app.store.jobs_holding_instances(BUSY_JOB_STATES)


def observations(inst: Instance, busy: AbstractSet[str]) -> policy.Observations:
    return policy.Observations(busy=inst.id in busy)
