"""The demo's preemption (cli/demo.py): once a job is running on a spot instance, someone
outbids that instance on the sim cloud (its admin API), so that the demo shows the daemon
end it as `preempted` and run the job again elsewhere."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import httpx

from gpuwarden.cli.client import ControlClient
from gpuwarden.cli.commands_jobs import TERMINAL
from gpuwarden.cli.commands_views import status_rows


async def outbid_when_running(
    socket: Path,
    sim_url: str,
    job_id: str,
    *,
    say: Callable[[str], None],
    timeout: float,
    after_step: int = 1,
) -> bool:
    """Outbid the job's spot instance once the job reports `after_step` steps done. False if
    it ended first, ran on demand, or did not get that far within `timeout` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with ControlClient(socket) as client:
        while loop.time() < deadline:
            job = await client.call("jobs.get", {"id": job_id})
            if job["state"] in TERMINAL:
                return False
            if job["state"] == "running" and job["progress"]["step"] >= after_step:
                return await _outbid(client, sim_url, job["instance_id"], say)
            await asyncio.sleep(0.1)
    return False


async def _outbid(
    client: ControlClient, sim_url: str, instance_id: str, say: Callable[[str], None]
) -> bool:
    rows = status_rows(await client.call("status", {"id": instance_id}))
    row = next((r for r in rows if r.get("id") == instance_id), None)
    if row is None or not row.get("spot"):
        return False
    async with httpx.AsyncClient(base_url=sim_url, timeout=10) as http:
        reply = await http.post(f"/_sim/instances/{row['provider_id']}/outbid")
        reply.raise_for_status()
    say(f"sim: someone outbid spot instance {instance_id} (our bid ${row['spot'].get('bid')}/h)")
    return True
