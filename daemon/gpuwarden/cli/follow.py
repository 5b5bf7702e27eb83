"""`events --follow`: print the event log as it grows, across daemon restarts.

Subscribe first, then list what is already there, so nothing falls between the two; every
event is printed once, by its id (the log's ids keep counting across restarts). When the
daemon goes away the follower says so on stderr and tries again with backoff (0.5 s doubling
to 10 s); once back it subscribes again and lists what it missed after the last id it
printed (`events.list` with `after_id`), so a restart leaves neither a gap nor a duplicate.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

from gpuwarden.cli.client import ControlClient, Unreachable
from gpuwarden.cli.output import Out

RETRY_FIRST = 0.5
RETRY_MAX = 10.0
PAGE = 1000  # events asked for at once while catching up

Show = Callable[[Out, Mapping[str, Any]], None]


async def follow(
    client: ControlClient,
    out: Out,
    params: Mapping[str, Any],
    entity: str | None,
    show: Show,
    *,
    retry_first: float = RETRY_FIRST,
) -> None:
    """Print the backlog `params` selects, then every new event, until cancelled. The first
    connection's failure is the caller's (Unreachable); later ones are waited out."""
    seen: int | None = None  # the id of the last event printed; None before the backlog
    delay = retry_first
    away = False  # said that the daemon went away, and not yet that it is back
    while True:
        try:
            stream = await client.open_events()
        except Unreachable:
            if seen is None:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)
            continue
        try:
            if seen is None:
                backlog = await client.call("events.list", params)
                seen = 0
                if entity:
                    entity = await _resolved(client, entity)
            else:
                backlog = await _missed(client, entity, seen)
                out.warn("reconnected to the daemon; the events since then follow")
            delay, away = retry_first, False
            for ev in backlog:
                seen = _print_new(out, ev, seen, show)
            async for ev in stream:
                # New events are matched here, by the id the daemon resolved (or its start).
                if entity and not str(ev.get("entity_id") or "").startswith(entity):
                    continue
                seen = _print_new(out, ev, seen, show)
        except Unreachable as exc:
            if seen is None:
                raise
            if not away:
                out.warn(f"{exc}; reconnecting (Ctrl-C ends)")
            away = True
        finally:
            await stream.aclose()
        await asyncio.sleep(delay)
        delay = min(delay * 2, RETRY_MAX)


async def _resolved(client: ControlClient, entity: str) -> str:
    """The id the daemon resolves `entity` to (an instance's label or a prefix), read off the
    entity's first event: the stream carries ids only, so a label would match nothing."""
    first = await client.call("events.list", {"entity_id": entity, "after_id": 0, "limit": 1})
    return str(first[0].get("entity_id") or entity) if first else entity


async def _missed(client: ControlClient, entity: str | None, seen: int) -> list[dict[str, Any]]:
    """Every event after id `seen` (of `entity`, if given), oldest first, page by page."""
    found: list[dict[str, Any]] = []
    after = seen
    while True:
        params: dict[str, Any] = {"after_id": after, "limit": PAGE}
        if entity:
            params["entity_id"] = entity
        page = await client.call("events.list", params)
        found += page
        if len(page) < PAGE:
            return found
        after = max(int(ev.get("id") or after) for ev in page)


def _print_new(out: Out, ev: Mapping[str, Any], seen: int, show: Show) -> int:
    """Show `ev` unless it was shown already; returns the last id shown."""
    event_id = ev.get("id")
    if event_id is None:  # the daemon's own notices (lagged) carry no id
        show(out, ev)
        return seen
    if int(event_id) <= seen:
        return seen
    show(out, ev)
    return int(event_id)
