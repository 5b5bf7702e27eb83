"""What keep-warm billed and bought, per UTC day, for `costs`: summed from the `warm_idle`
events the jobs loop records when a warm instance is taken by a job or ended."""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from gpuwarden.core import policy
from gpuwarden.core.model import EntityKind
from gpuwarden.fleet.app import App

NOTHING = policy.WarmDay(0.0, 0.0, 0)


async def by_day(app: App, since: datetime) -> dict[date, policy.WarmDay]:
    events = await app.store.events(since=since, kind=EntityKind.INSTANCE, name="warm_idle")
    return policy.warm_by_day(
        (
            e.at,
            _num(e.details.get("cost")),
            _num(e.details.get("saved_wait_s")),
            bool(e.details.get("job_id")),
        )
        for e in events
    )


def days(spent: policy.Spend, warm: dict[date, policy.WarmDay]) -> list[dict[str, Any]]:
    """One row per UTC day with spend or keep-warm: the spend and idle tails, and keep-warm."""
    rows = []
    for k in sorted(set(spent.days) | set(warm)):
        day = spent.days.get(k, policy.DaySpend(0.0, 0.0))
        rows.append(
            {
                "day": k.isoformat(),
                "total": round(day.total, 6),
                "idle": round(day.idle, 6),
                **day_fields(warm.get(k)),
            }
        )
    return rows


def day_fields(warm: policy.WarmDay | None) -> dict[str, Any]:
    w = warm or NOTHING
    return {
        "warm_idle": round(w.idle_cost, 6),
        "wait_saved_s": round(w.wait_saved_s, 3),
        "warm_reuses": w.reuses,
    }


def totals(days: dict[date, policy.WarmDay]) -> dict[str, Any]:
    return {
        "warm_idle": round(sum(w.idle_cost for w in days.values()), 6),
        "wait_saved_s": round(sum(w.wait_saved_s for w in days.values()), 3),
    }


def _num(value: object) -> float:
    """A number from an event's details (0.0 for anything else)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    return float(value)
