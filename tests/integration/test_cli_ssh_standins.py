"""`launch --wait` and `gpuwarden ssh` on the paths a live sim rarely takes, against an
in-process control server with stand-in methods: an instance that ends before its SSH answers
(exit 1, and why), and `ssh` to an instance whose SSH has not answered (exit 1, nothing run)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from cli_support import gw
from control_support import running_server

from gpuwarden.control.methods import (
    EventsListParams,
    IdParams,
    LaunchParams,
    Method,
    StatusParams,
)

pytestmark = pytest.mark.slow

INSTANCE = {"id": "abcd1234", "provider": "sim-vast", "gpu": "RTX 4090", "state": "requested"}


async def test_launch_wait_exits_1_when_the_instance_ends_first() -> None:
    async def launch(app: Any, caller: Any, p: LaunchParams) -> dict[str, Any]:
        return {"dry_run": True, "gpu": "RTX 4090", "hours": 1.0} if p.dry_run else INSTANCE

    async def status(app: Any, caller: Any, p: StatusParams) -> dict[str, Any]:
        assert p.id == "abcd1234"  # the one instance it waits for, looked up
        return {"instances": []}  # no longer live

    async def events(app: Any, caller: Any, p: EventsListParams) -> list[dict[str, Any]]:
        assert p.entity_id == "abcd1234"
        return [{"id": 9, "name": "state", "to_state": "launch_failed", "reason": "launch_failed"}]

    methods: dict[str, Method[Any]] = {
        "launch": Method(LaunchParams, launch),
        "status": Method(StatusParams, status),
        "events.list": Method(EventsListParams, events),
    }
    async with running_server(methods=methods) as (_, app):
        sock = str(app.settings.daemon.socket)
        argv = ("launch", "--gpu", "4090", "--yes", "--wait", "--socket", sock)
        code, out, err = await asyncio.to_thread(gw, None, *argv)
    assert code == 1
    assert "Launched abcd1234" in out
    assert "instance abcd1234 ended before its SSH answered (launch_failed)" in err
    assert "gpuwarden events --id abcd1234" in err


async def test_ssh_refuses_before_ssh_answered_and_prints_json_after() -> None:
    ready = {"value": False}

    async def ssh(app: Any, caller: Any, p: IdParams) -> dict[str, Any]:
        return {
            "id": "abcd1234",
            "state": "running",
            "user": "root",
            "host": "127.0.0.1",
            "port": 2222,
            "host_key": "ssh-ed25519 AAAA" if ready["value"] else None,
            "ssh_ready": ready["value"],
            "known_hosts": str(app.settings.daemon.state_dir / "known_hosts"),
            "identity_file": None,
        }

    async with running_server(methods={"ssh": Method(IdParams, ssh)}) as (_, app):
        sock = str(app.settings.daemon.socket)
        code, out, err = await asyncio.to_thread(gw, None, "ssh", "abcd", "--socket", sock)
        assert code == 1 and out == ""
        assert "has not answered SSH yet" in err and "launch --wait" in err
        ready["value"] = True
        (app.settings.daemon.state_dir / "known_hosts").write_text("")
        argv = ("ssh", "--json", "--socket", sock, "abcd", "--", "ls", "-l")
        code, out, err = await asyncio.to_thread(gw, None, *argv)
    assert code == 0, err
    assert json.loads(out)["argv"][-4:] == ["root@127.0.0.1", "--", "ls", "-l"]
