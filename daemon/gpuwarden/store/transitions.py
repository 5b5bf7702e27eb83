"""One instance state change as statements on a connection (the Store runs it inside its
transaction, under its lock, and writes the event): the check against the state machine,
the row, its time stamp and, on TERMINATED, the termination record."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiosqlite

from gpuwarden.core import policy
from gpuwarden.core.model import INSTANCE_TRANSITIONS, Instance, InstanceState, TerminationReason
from gpuwarden.store import rows, sql
from gpuwarden.store.sql import IllegalTransition

_STAMPS = {
    InstanceState.RUNNING: "running_at",
    InstanceState.TERMINATING: "terminating_at",
    InstanceState.TERMINATED: "terminated_at",
    InstanceState.LAUNCH_FAILED: "terminated_at",
}


@dataclass(slots=True)
class Transition:
    """A state change waiting for the writer (see Store.transition_instance)."""

    instance_id: str
    to: InstanceState
    reason: TerminationReason | None
    details: Mapping[str, Any] | None
    fields: dict[str, Any]
    now: datetime
    done: asyncio.Future[Instance]


async def write(
    conn: aiosqlite.Connection, req: Transition
) -> tuple[Instance, Instance, dict[str, Any]]:
    """Check and write one change; returns the row before, the row after and the details of
    its event. Raises IllegalTransition (or NotFoundError) before writing anything."""
    current = await sql.instance(conn, req.instance_id)
    if req.to not in INSTANCE_TRANSITIONS[current.state]:
        raise IllegalTransition(f"instance {req.instance_id}: {current.state} -> {req.to}")
    updates: dict[str, Any] = {"state": req.to.value, **req.fields}
    if req.reason is not None:
        updates["reason"] = req.reason.value
    stamp = _STAMPS.get(req.to)
    if stamp and stamp not in updates:
        updates[stamp] = req.now
    await sql.update(conn, "instances", req.instance_id, updates)
    after = await sql.instance(conn, req.instance_id)
    body = dict(req.details or {})
    if req.to in (InstanceState.TERMINATED, InstanceState.LAUNCH_FAILED):
        term = policy.termination_of(after, req.now)
        body |= {
            "provider_id": term.provider_id,
            "uptime_s": term.uptime_s,
            "gpu": term.gpu,
            "region": term.region,
            "price_per_hour": term.price_per_hour,
            "cost": term.cost,
        }
        if after.job_id is not None:  # rented for a job: the jobs loop listens
            body["job_id"] = after.job_id
        if req.to is InstanceState.TERMINATED:
            await sql.insert(conn, "terminations", rows.columns(term), replace=True)
    return current, after, body
