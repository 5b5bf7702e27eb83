"""`launch --wait`: wait until the new instance runs with its SSH answering, on the event
stream rather than by polling.

It subscribes first, then looks at `status` once; after that it looks again only when an
event about the instance arrives (a state change, `ssh_ready`), or the daemon says it dropped
events for this client (`lagged`), or LOOK_EVERY passes without either (a safety net, not the
way it learns), or the timeout is up. Every readiness change is an event in the store, so
nothing is missed between the subscription and the first look.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from gpuwarden.cli import commands_views as views
from gpuwarden.cli.client import ControlClient, EventStream
from gpuwarden.cli.commands_views import status_rows
from gpuwarden.cli.output import EX_DOMAIN, EX_OK, Out, duration

WAIT_TIMEOUT_S = 600.0  # launch --wait: ten minutes
EX_WAIT_TIMEOUT = 75  # sysexits EX_TEMPFAIL: not ready yet; it may still be
LOOK_EVERY = 30.0  # seconds between looks when no event comes


async def wait_ready(
    client: ControlClient, out: Out, inst: Mapping[str, Any], timeout_s: float
) -> int:
    """Until the instance runs with its SSH answering (0), is no longer live (1: launch
    failed or ended), or `timeout_s` passes (75, the instance still billing)."""
    iid = str(inst.get("id"))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    stream = await client.open_events()
    try:
        while True:
            found = status_rows(await client.call("status", {"id": iid}))
            row = next((r for r in found if str(r.get("id")) == iid), None)
            if row is None:  # ended: the store says how
                return await _ended(client, out, iid)
            if row.get("state") == "running" and row.get("ssh_ready"):
                if out.json_mode:
                    out.json(row)
                else:
                    out.print(f"{iid} is running and answers SSH: gpuwarden ssh {iid}")
                return EX_OK
            if loop.time() >= deadline:
                return _timed_out(out, iid, row, timeout_s)
            try:
                async with asyncio.timeout(min(LOOK_EVERY, max(0.0, deadline - loop.time()))):
                    await _news_of(stream, iid)
            except TimeoutError:
                pass  # look once more: at the deadline, that look decides
    finally:
        await stream.aclose()


async def _news_of(stream: EventStream, iid: str) -> None:
    """Return at the next event about instance `iid`, or the daemon's `lagged` notice (events
    were dropped: one of them may have been about it)."""
    async for ev in stream:
        if ev.get("entity_id") == iid or ev.get("kind") == "daemon":
            return


async def _ended(client: ControlClient, out: Out, iid: str) -> int:
    events = await client.call("events.list", {"entity_id": iid, "limit": 20})
    ends = [e for e in events if e.get("name") == "state" and e.get("reason")]
    why = f" ({ends[-1]['reason']})" if ends else ""
    out.error(f"instance {iid} ended before its SSH answered{why}")
    out.hint(f"'gpuwarden events --id {iid}' tells its story")
    return EX_DOMAIN


def _timed_out(out: Out, iid: str, row: Mapping[str, Any], timeout_s: float) -> int:
    out.error(
        f"instance {iid} is still {views.shown_state(row)} after "
        f"{duration(timeout_s)}; it bills until it ends"
    )
    out.hint(f"'gpuwarden status' to look again, 'gpuwarden destroy {iid}' to end it")
    if out.json_mode:
        out.json(row)
    return EX_WAIT_TIMEOUT
