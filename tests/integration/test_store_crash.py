"""A process killed with SIGKILL in the middle of transitions leaves a consistent database:
every entity's state is the to_state of its last state event, each step wrote exactly one
event, and every terminated instance has its termination record."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

INSTANCE_PATH = ["requested", "provisioning", "running", "terminating", "terminated"]
JOB_PATH = ["queued", "provisioning", "running", "fetching", "succeeded"]

CHILD = r"""
import asyncio, itertools, sys
from datetime import timedelta
from gpuwarden.core.clock import SystemClock
from gpuwarden.core.model import Instance, InstanceState, Job, JobSpec, JobState, TerminationReason
from gpuwarden.store import Store

I_PATH = [InstanceState.PROVISIONING, InstanceState.RUNNING, InstanceState.TERMINATING,
          InstanceState.TERMINATED]
J_PATH = [JobState.PROVISIONING, JobState.RUNNING, JobState.FETCHING, JobState.SUCCEEDED]

async def main(db: str, tag: str) -> None:
    clock = SystemClock()
    store = await Store.open(db, clock)
    done = itertools.count(1)

    def tick() -> None:
        print(next(done), flush=True)

    async def instances(lane: int) -> None:
        for n in itertools.count():
            iid = f"{tag}-i{lane}-{n}"
            now = clock.now()
            await store.insert_instance(Instance(
                id=iid, provider="sim-vast", label=f"gpuwarden-t-{iid}",
                state=InstanceState.REQUESTED, created_at=now,
                lease_until=now + timedelta(hours=1), last_activity=now, price_per_hour=1.0))
            tick()
            for step in I_PATH:
                reason = TerminationReason.IDLE if step is InstanceState.TERMINATING else None
                await store.transition_instance(iid, step, reason=reason, provider_id=f"p{n}",
                                                details={"lane": lane, "pad": "x" * 300})
                tick()

    async def jobs(lane: int) -> None:
        for n in itertools.count():
            jid = f"{tag}-j{lane}-{n}"
            now = clock.now()
            await store.insert_job(Job(id=jid, state=JobState.QUEUED,
                                       spec=JobSpec(prompt="p" * 200), created_at=now,
                                       updated_at=now))
            tick()
            for step in J_PATH:
                await store.transition_job(jid, step, progress_step=3)
                tick()

    await asyncio.gather(*(instances(i) for i in range(3)), *(jobs(j) for j in range(2)))

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def check_consistent(db: Path) -> tuple[int, int]:
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        for table, kind, path in (
            ("instances", "instance", INSTANCE_PATH),
            ("jobs", "job", JOB_PATH),
        ):
            rows = conn.execute(f"SELECT id, state FROM {table}").fetchall()
            for entity_id, state in rows:
                events = conn.execute(
                    "SELECT from_state, to_state FROM events"
                    " WHERE kind = ? AND entity_id = ? AND name = 'state' ORDER BY id",
                    (kind, entity_id),
                ).fetchall()
                assert events, entity_id
                assert events[-1][1] == state, (entity_id, state, events)
                assert len(events) == path.index(state) + 1, (entity_id, events)
                assert [e[1] for e in events] == path[: len(events)]
        terminated = conn.execute(
            "SELECT COUNT(*) FROM instances WHERE state = 'terminated'"
        ).fetchone()[0]
        records = conn.execute("SELECT COUNT(*) FROM terminations").fetchone()[0]
        assert terminated == records
        n_events = conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
        n_entities = conn.execute(
            "SELECT (SELECT COUNT(*) FROM instances) + (SELECT COUNT(*) FROM jobs)"
        ).fetchone()[0]
        return n_events, n_entities
    finally:
        conn.close()


@pytest.mark.slow
def test_sigkill_mid_transition_leaves_the_database_consistent(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    db = tmp_path / "crash.db"
    seen_events = 0
    for round_no, kill_after in enumerate((40, 97, 150)):
        child = subprocess.Popen(
            [sys.executable, str(script), str(db), f"r{round_no}"],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert child.stdout is not None
            for line in child.stdout:  # each line: one more committed write
                if int(line) >= kill_after:
                    break
            child.kill()  # SIGKILL while the other lanes are mid-transaction
        finally:
            child.kill()
            child.wait(timeout=10)
            if child.stdout:
                child.stdout.close()
        assert child.returncode == -9
        n_events, n_entities = check_consistent(db)
        assert n_events >= seen_events + kill_after  # every reported commit survived
        assert n_entities > 0
        seen_events = n_events
