"""`launch --wait` learns from the event stream: it subscribes, looks at `status` once, and
looks again only when an event about its instance arrives (or the daemon says it dropped
some), not every second. A fake client stands in for the socket."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest

from gpuwarden.cli import launch_wait
from gpuwarden.cli.launch_wait import EX_WAIT_TIMEOUT, wait_ready
from gpuwarden.cli.output import EX_DOMAIN, EX_OK, Out


class _Stream:
    def __init__(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        self._queue = queue
        self.closed = False

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self._gen()

    async def _gen(self) -> AsyncIterator[dict[str, Any]]:
        while True:
            yield await self._queue.get()

    async def aclose(self) -> None:
        self.closed = True


class _Client:
    """The daemon as the waiter sees it: `status` answers from `row` (None: not live)."""

    def __init__(self) -> None:
        self.row: dict[str, Any] | None = {"id": "i1", "state": "provisioning"}
        self.looks = 0
        self.looked = asyncio.Event()
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.stream: _Stream | None = None

    async def open_events(self) -> _Stream:
        self.stream = _Stream(self.events)
        return self.stream

    async def call(self, method: str, params: Mapping[str, Any] | None = None) -> Any:
        if method == "events.list":
            return [{"name": "state", "reason": "launch_failed"}]
        assert method == "status"
        assert params == {"id": "i1"}  # one instance looked up, not the whole fleet
        self.looks += 1
        self.looked.set()
        return {"instances": [self.row] if self.row else []}

    async def next_look(self) -> None:
        await asyncio.wait_for(self.looked.wait(), 5)
        self.looked.clear()


def _event(entity_id: str, name: str = "state", kind: str = "instance") -> dict[str, Any]:
    return {"kind": kind, "entity_id": entity_id, "name": name}


async def test_it_looks_once_then_only_on_the_instances_own_events() -> None:
    client = _Client()
    out = io.StringIO()
    task = asyncio.create_task(
        wait_ready(client, Out(False, stdout=out), {"id": "i1"}, 600)  # type: ignore[arg-type]
    )
    await client.next_look()  # subscribed, then the first look
    assert client.stream is not None
    client.events.put_nowait(_event("i2"))  # another instance's news: no look
    client.events.put_nowait(_event("i2", "ssh_ready"))
    client.row = {"id": "i1", "state": "running", "ssh_ready": False}
    client.events.put_nowait(_event("i1"))  # provisioning -> running
    await client.next_look()
    client.row = {"id": "i1", "state": "running", "ssh_ready": True}
    client.events.put_nowait(_event("i1", "ssh_ready"))
    assert await asyncio.wait_for(task, 5) == EX_OK
    assert client.looks == 3  # the first look and one per event of its own
    assert client.stream.closed
    assert "i1 is running and answers SSH" in out.getvalue()


async def test_a_lagged_notice_is_a_reason_to_look_again() -> None:
    client = _Client()
    task = asyncio.create_task(
        wait_ready(client, Out(False, stdout=io.StringIO()), {"id": "i1"}, 600)  # type: ignore[arg-type]
    )
    await client.next_look()
    client.row = None  # ended, and the event that said so was dropped
    client.events.put_nowait(_event("daemon", "lagged", kind="daemon"))
    assert await asyncio.wait_for(task, 5) == EX_DOMAIN
    assert client.looks == 2


async def test_with_no_event_the_timeout_decides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch_wait, "LOOK_EVERY", 0.01)  # the safety-net look comes too
    client = _Client()
    code = await asyncio.wait_for(
        wait_ready(client, Out(False, stdout=io.StringIO()), {"id": "i1"}, 0.05),  # type: ignore[arg-type]
        5,
    )
    assert code == EX_WAIT_TIMEOUT
    assert client.looks >= 2  # the first look, and the one at the deadline
