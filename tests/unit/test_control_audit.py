"""Audit with who: an action over the real control socket records the caller's uid (and user
name) under "by" in its event, and `history` shows who ended an instance by hand."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from peer_support import NOBODY, as_nobody
from tests.conftest import MakeApp

from gpuwarden.config import settings as config
from gpuwarden.control.methods import Caller
from gpuwarden.control.server import ControlServer
from gpuwarden.core.clock import SystemClock
from gpuwarden.core.model import (
    CONFIG_RELOADED,
    QUEUE_PAUSED_FLAG,
    EntityKind,
    Event,
    TerminationReason,
)
from gpuwarden.fleet import launcher
from gpuwarden.fleet.app import App
from gpuwarden.lifecycle.reloader import ConfigReloader
from gpuwarden.providers.fake import FakeProvider
from gpuwarden.system import systemd


def test_a_caller_is_named_by_user_name_and_uid() -> None:
    assert Caller.of_uid(1000, lambda uid: "alice").by == "alice (uid:1000)"


def test_a_uid_without_a_name_is_recorded_as_the_uid() -> None:
    def unknown(uid: int) -> str:
        raise KeyError(uid)

    assert Caller.of_uid(4242, unknown).by == "uid:4242"


def _me() -> str:
    uid = os.getuid()
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid:{uid})"
    except KeyError:
        return f"uid:{uid}"


async def _call(path: Path, method: str, params: dict[str, Any] | None = None) -> Any:
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        msg = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params or {}}
        writer.write(json.dumps(msg).encode() + b"\n")
        await writer.drain()
        reply = json.loads(await asyncio.wait_for(reader.readline(), 10))
    finally:
        writer.close()
    assert "result" in reply, reply
    return reply["result"]


@pytest.fixture
async def served(short_dir: Path, make_app: MakeApp) -> AsyncIterator[tuple[App, Path]]:
    clock = SystemClock()
    conf = short_dir / "c.toml"
    conf.write_text(
        f'[daemon]\nstate_dir = "{short_dir}"\nsocket = "{short_dir / "control.sock"}"\n'
        f"allowed_uids = [{NOBODY}]\n"
    )
    app = await make_app(config.load(conf), clock, [FakeProvider(clock, "fake")])
    app.reload = ConfigReloader(app, conf, systemd.Notifier(None), lambda: "running").reload
    server = ControlServer(app)
    await server.start()
    task = asyncio.create_task(server.run())
    try:
        yield app, server.path
    finally:
        app.stopping.set()
        await asyncio.wait_for(task, 5)


def _by(events: list[Event], name: str) -> list[Any]:
    return [e.details.get("by") for e in events if e.name == name]


async def test_actions_over_the_socket_record_the_callers_uid(served: tuple[App, Path]) -> None:
    app, path = served
    job = await _call(path, "jobs.submit", {"prompt": "a red fox"})
    await _call(path, "queue.pause")
    await _call(path, "queue.resume")
    await _call(path, "jobs.cancel", {"id": job["id"]})
    launched = await _call(path, "launch", {"provider": "fake", "hours": 1})
    iid = launched["id"]
    await _call(path, "extend", {"id": iid, "hours": 1})
    await _call(path, "activity", {"id": iid})
    await _call(path, "destroy", {"id": iid})
    await _call(path, "config.reload")

    me = _me()
    assert f"uid:{os.getuid()}" in me
    job_events = await app.store.events(entity_id=job["id"])
    assert [(e.to_state, e.details.get("by")) for e in job_events] == [
        ("queued", me),
        ("cancelled", me),
    ]
    flags = await app.store.events(entity_id=QUEUE_PAUSED_FLAG)
    assert [(e.details["value"], e.details.get("by")) for e in flags] == [(True, me), (False, me)]
    inst_events = await app.store.events(entity_id=iid)
    assert _by(inst_events, "extended") == [me]
    assert _by(inst_events, "activity") == [me]
    states = [(e.to_state, e.details.get("by")) for e in inst_events if e.name == "state"]
    assert ("requested", me) in states
    assert ("terminating", me) in states
    assert "user" not in json.dumps([e.details for e in inst_events + job_events + flags])
    [reloaded] = await app.store.events(entity_id="daemon", kind=EntityKind.DAEMON)
    assert (reloaded.name, reloaded.details["by"]) == (CONFIG_RELOADED, me)

    # history and the events list show who ended it
    [record] = await _call(path, "history", {"hours": 1})
    assert record["reason"] == "manual"
    assert record["by"] == me
    listed = await _call(path, "events.list", {"entity_id": iid})
    assert any(e["details"].get("by") == me for e in listed)


async def test_an_instance_the_daemon_ended_has_no_by_in_history(
    served: tuple[App, Path],
) -> None:
    app, path = served
    fake = app.providers["fake"]
    assert isinstance(fake, FakeProvider)
    inst = await launcher.launch(app, fake.offers[0], hours=1)
    await app.terminator.end(inst.id, TerminationReason.IDLE, {"why": "idle"})
    [record] = await _call(path, "history", {"hours": 1})
    assert (record["reason"], record["by"]) == ("idle", None)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as uid 65534")
async def test_another_uid_is_recorded_as_that_uid(served: tuple[App, Path]) -> None:
    app, path = served
    os.chmod(path.parent, 0o755)
    os.chmod(path, 0o666)
    request = b'{"jsonrpc":"2.0","id":1,"method":"queue.pause","params":{}}\n'
    got = await as_nobody(path, request, keep=200)
    assert got.startswith(f"uid={NOBODY} got=") and '"queue_paused":true' in got, got
    [ev] = await app.store.events(entity_id=QUEUE_PAUSED_FLAG, kind=EntityKind.DAEMON)
    try:
        name: str | None = pwd.getpwuid(NOBODY).pw_name
    except KeyError:
        name = None
    expected = f"{name} (uid:{NOBODY})" if name else f"uid:{NOBODY}"
    assert ev.details["by"] == expected
