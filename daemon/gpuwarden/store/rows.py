"""Mapping between SQLite rows and the frozen records of model.py."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from datetime import datetime
from typing import Any

from gpuwarden.core.clock import format_ts, parse_ts
from gpuwarden.core.model import (
    Billing,
    EntityKind,
    Event,
    Instance,
    InstanceState,
    Job,
    JobSpec,
    JobState,
    Termination,
    TerminationReason,
)


def _ts(value: Any) -> datetime:
    out = parse_ts(value)
    assert out is not None
    return out


def instance_from_row(row: sqlite3.Row) -> Instance:
    # sqlite3.Row finds a column by name with a scan over the names, for each of the 27
    # reads; a dict made once per row costs less than a third of that (start-up parses
    # every live row: 10,000 of them for a large fleet).
    r = dict(zip(row.keys(), row, strict=True))
    return Instance(
        id=r["id"],
        provider=r["provider"],
        provider_id=r["provider_id"],
        label=r["label"],
        state=InstanceState(r["state"]),
        reason=TerminationReason(r["reason"]) if r["reason"] else None,
        offer_id=r["offer_id"],
        gpu=r["gpu"],
        num_gpus=r["num_gpus"],
        region=r["region"],
        price_per_hour=r["price_per_hour"],
        billing=Billing(r["billing"]),
        created_at=_ts(r["created_at"]),
        lease_until=_ts(r["lease_until"]),
        last_activity=_ts(r["last_activity"]),
        provider_started_at=parse_ts(r["provider_started_at"]),
        running_at=parse_ts(r["running_at"]),
        terminating_at=parse_ts(r["terminating_at"]),
        terminated_at=parse_ts(r["terminated_at"]),
        ssh_host=r["ssh_host"],
        ssh_port=r["ssh_port"],
        ssh_user=r["ssh_user"],
        strikes=r["strikes"],
        last_probe_at=parse_ts(r["last_probe_at"]),
        last_probe_ok=None if r["last_probe_ok"] is None else bool(r["last_probe_ok"]),
        job_id=r["job_id"],
        extra=json.loads(r["extra"]),
    )


def to_column(name: str, value: Any) -> Any:
    """A Python value as stored in a column."""
    if isinstance(value, datetime):
        return format_ts(value)
    if name in ("extra", "details", "outputs"):
        return json.dumps(list(value) if isinstance(value, tuple) else value, sort_keys=True)
    if name == "spec":
        return json.dumps(dataclasses.asdict(value), sort_keys=True)
    if isinstance(value, bool):
        return int(value)
    return value


def columns(record: Instance | Job | Termination) -> dict[str, Any]:
    """Every field of a record as stored in the column of the same name."""
    return {f.name: to_column(f.name, getattr(record, f.name)) for f in dataclasses.fields(record)}


def spec_from_json(text: str) -> JobSpec:
    data = json.loads(text)
    known = {f.name for f in dataclasses.fields(JobSpec)}
    return JobSpec(**{k: v for k, v in data.items() if k in known})


def job_from_row(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"],
        state=JobState(row["state"]),
        spec=spec_from_json(row["spec"]),
        priority=row["priority"],
        attempt=row["attempt"],
        instance_id=row["instance_id"],
        created_at=_ts(row["created_at"]),
        updated_at=_ts(row["updated_at"]),
        started_at=parse_ts(row["started_at"]),
        finished_at=parse_ts(row["finished_at"]),
        progress_step=row["progress_step"],
        progress_total=row["progress_total"],
        error=row["error"],
        outputs=tuple(json.loads(row["outputs"])),
        gpu_seconds=row["gpu_seconds"],
        cost=row["cost"],
        extra=json.loads(row["extra"]),
    )


def event_from_row(row: sqlite3.Row) -> Event:
    return Event(
        id=row["id"],
        at=_ts(row["at"]),
        kind=EntityKind(row["kind"]),
        entity_id=row["entity_id"],
        name=row["name"],
        from_state=row["from_state"],
        to_state=row["to_state"],
        reason=row["reason"],
        details=json.loads(row["details"]),
    )


def spot_termination_from_row(row: sqlite3.Row) -> tuple[Termination, dict[str, Any]]:
    """A row of sql.SPOT_TERMINATIONS: the record and its instance's spot details."""
    spot = json.loads(row["spot"]) if row["spot"] else {}
    return termination_from_row(row), spot if isinstance(spot, dict) else {}


def termination_from_row(row: sqlite3.Row) -> Termination:
    return Termination(
        at=_ts(row["at"]),
        instance_id=row["instance_id"],
        provider=row["provider"],
        provider_id=row["provider_id"],
        reason=TerminationReason(row["reason"]),
        uptime_s=row["uptime_s"],
        gpu=row["gpu"],
        region=row["region"],
        price_per_hour=row["price_per_hour"],
        cost=row["cost"],
    )
