"""Seeding a database for the scale benchmark: N live RUNNING instances on the fake provider
(provider ids 1001 up, as FakeProvider.spawn numbers them), some of them with their lease
ending at planted times, and queued jobs. Rows are written with executemany in one
transaction (one fsync), the schema by the Store's own migrations."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

from gpuwarden.core.clock import Clock, format_ts
from gpuwarden.core.model import (
    Billing,
    Instance,
    InstanceState,
    Job,
    JobSpec,
    JobState,
    instance_label,
)
from gpuwarden.store import Store, rows

FAR = timedelta(hours=4)  # the lease of instances without a planted deadline


async def migrate(db: Path, clock: Clock) -> None:
    store = await Store.open(db, clock)
    await store.close()


def _insert(conn: sqlite3.Connection, table: str, records: Sequence[Instance | Job]) -> None:
    if not records:
        return
    cols = list(rows.columns(records[0]))
    conn.executemany(
        f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
        [tuple(rows.columns(r).values()) for r in records],
    )


def seed(
    db: Path,
    *,
    installation: str,
    now: datetime,
    count: int,
    deadlines: Sequence[datetime],
    queued_jobs: int,
) -> dict[str, datetime]:
    """Returns provider id -> planted deadline (the first len(deadlines) instances)."""
    planted: dict[str, datetime] = {}
    instances = []
    for n in range(count):
        iid = f"s{n:07x}"
        pid = str(1001 + n)
        lease = deadlines[n] if n < len(deadlines) else now + FAR
        if n < len(deadlines):
            planted[pid] = lease
        instances.append(
            Instance(
                id=iid,
                provider="fake",
                label=instance_label(installation, iid),
                state=InstanceState.RUNNING,
                created_at=now,
                lease_until=lease,
                last_activity=now,
                price_per_hour=0.4,
                gpu="RTX 4090",
                region="EU",
                offer_id="fake-offer-1",
                provider_id=pid,
                provider_started_at=now,
                running_at=now,
                ssh_host="127.0.0.1",
                ssh_port=22000 + int(pid) % 1000,  # where FakeProvider puts it
                last_probe_at=now,
                last_probe_ok=True,
                billing=Billing.PER_SECOND,
            )
        )
    jobs = [
        Job(
            id=f"j{n:07x}",
            state=JobState.QUEUED,
            spec=JobSpec(prompt=f"a lighthouse at dusk, variant {n}"),
            created_at=now - timedelta(seconds=queued_jobs - n),
            updated_at=now,
        )
        for n in range(queued_jobs)
    ]
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        _insert(conn, "instances", instances)
        _insert(conn, "jobs", jobs)
        conn.execute("COMMIT")
    finally:
        conn.close()
    return planted


def plant(db: Path, deadlines: dict[str, datetime]) -> None:
    """Move the leases of the instances with these provider ids to the given times (after
    seeding, so that the time seeding took does not eat into the lead)."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.executemany(
            "UPDATE instances SET lease_until = ? WHERE provider_id = ?",
            [(format_ts(at), pid) for pid, at in deadlines.items()],
        )
    finally:
        conn.close()
