"""The sim's billing ledger: what each simulated instance would have cost, to the unit the
provider bills in. This is the ground truth that leak tests check.

Billing runs from creation (the create/launch call) until the instance ended: destroyed or
terminated through the API, ended from outside, or ended by the credit running out. A Vast
spot instance that was outbid is stopped: from then until it is destroyed it bills only its
storage (`stopped_at`, `storage_per_hour`).
Vast bills each started second, Lambda each started minute. The arithmetic is written out
here on purpose instead of reusing gpuwarden.core.policy: the ground truth must not share code
with the thing it checks.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, Literal

from gpuwarden.core.clock import format_ts

ProviderKind = Literal["vast", "lambda"]


def billed_seconds(kind: ProviderKind, start: datetime, end: datetime) -> int:
    secs = max(0.0, (end - start).total_seconds())
    if kind == "lambda":
        return math.ceil(secs / 60.0) * 60
    return math.ceil(secs)


@dataclass(slots=True)
class LedgerEntry:
    provider: ProviderKind
    instance_id: str
    label: str
    price_per_hour: float  # USD
    launched_at: datetime
    gpu: str = ""
    ended_at: datetime | None = None
    ended_by: str | None = None  # "api:account", "api:instance_key", "outside", "credit"
    spot: bool = False  # rented with a bid
    storage_per_hour: float = 0.0  # USD, the part of the price a stopped instance still bills
    stopped_at: datetime | None = None  # outbid: GPU billing stopped, storage goes on

    def billed(self, now: datetime) -> int:
        return billed_seconds(self.provider, self.launched_at, self.ended_at or now)

    def cost(self, now: datetime) -> float:
        end = self.ended_at or now
        if self.stopped_at is None or self.stopped_at >= end:
            return self.price_per_hour * self.billed(now) / 3600.0
        running = billed_seconds(self.provider, self.launched_at, self.stopped_at)
        stopped = billed_seconds(self.provider, self.stopped_at, end)
        return (self.price_per_hour * running + self.storage_per_hour * stopped) / 3600.0

    def to_json(self, now: datetime) -> dict[str, Any]:
        out = asdict(self)
        out["launched_at"] = format_ts(self.launched_at)
        out["ended_at"] = format_ts(self.ended_at)
        out["stopped_at"] = format_ts(self.stopped_at)
        out["billed_seconds"] = self.billed(now)
        out["cost"] = round(self.cost(now), 6)
        out["running"] = self.ended_at is None
        return out


class Ledger:
    """Entries keyed by (provider, instance id), in creation order."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], LedgerEntry] = {}

    def open(self, entry: LedgerEntry) -> None:
        self._entries[(entry.provider, entry.instance_id)] = entry

    def close(self, kind: ProviderKind, instance_id: str, at: datetime, by: str) -> bool:
        """End billing. False (and no change) if it had already ended."""
        entry = self._entries[(kind, instance_id)]
        if entry.ended_at is not None:
            return False
        entry.ended_at = at
        entry.ended_by = by
        return True

    def stop(self, kind: ProviderKind, instance_id: str, at: datetime) -> bool:
        """A spot instance was outbid: only its storage bills from `at`. False if it had
        already stopped or ended."""
        entry = self._entries[(kind, instance_id)]
        if entry.ended_at is not None or entry.stopped_at is not None:
            return False
        entry.stopped_at = at
        return True

    def get(self, kind: ProviderKind, instance_id: str) -> LedgerEntry | None:
        return self._entries.get((kind, instance_id))

    def entries(self, kind: ProviderKind | None = None) -> list[LedgerEntry]:
        return [e for e in self._entries.values() if kind is None or e.provider == kind]

    def spent(self, kind: ProviderKind, now: datetime) -> float:
        return sum(e.cost(now) for e in self.entries(kind))

    def to_json(self, now: datetime, kind: ProviderKind | None = None) -> dict[str, Any]:
        rows = [e.to_json(now) for e in self.entries(kind)]
        return {
            "now": format_ts(now),
            "instances": rows,
            "running": sum(1 for r in rows if r["running"]),
            "total_cost": round(sum(r["cost"] for r in rows), 6),
        }


def render(data: dict[str, Any]) -> str:
    """A plain-text table of a ledger's JSON, for `gpuwarden sim` at exit."""
    rows = data["instances"]
    if not rows:
        return "ledger: no instances were created"
    lines = [
        f"{'provider':<8} {'instance':<34} {'label':<32} {'$/h':>8} {'billed_s':>9} "
        f"{'cost':>10}  ended_by"
    ]
    for r in rows:
        lines.append(
            f"{r['provider']:<8} {r['instance_id']:<34} {r['label'][:32]:<32} "
            f"{r['price_per_hour']:>8.4f} {r['billed_seconds']:>9} {r['cost']:>10.6f}  "
            f"{r['ended_by'] or 'STILL RUNNING'}"
            + (f" (outbid {r['stopped_at']})" if r.get("stopped_at") else "")
        )
    lines.append(f"total ${data['total_cost']:.6f}; still running: {data['running']}")
    return "\n".join(lines)
