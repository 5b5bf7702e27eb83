"""The limits in force: the policy and budget sections of the settings as `policy.Limits`.

A config reload replaces `app.settings`, so `App.limits()` reads them on each use rather than
copying them once at start-up.
"""

from __future__ import annotations

from gpuwarden.config.settings import Settings
from gpuwarden.core.policy import Limits


def limits_from(settings: Settings) -> Limits:
    policy, budget = settings.policy, settings.budget
    return Limits(
        idle_timeout=policy.idle_timeout,
        lease_default=policy.lease_default,
        lease_min=policy.lease_min,
        lease_max=policy.lease_max,
        hard_cap=policy.hard_cap,
        watchdog_failures=policy.watchdog_failures,
        poll_interval=policy.poll_interval,
        vanish_grace=policy.vanish_grace,
        deadman_timeout=policy.deadman_timeout,
        deadman_margin=policy.deadman_margin,
        max_hourly_price=budget.max_hourly_price,
        daily_limit=budget.daily_limit,
        monthly_limit=budget.monthly_limit,
        credit_floor=budget.credit_floor,
    )
