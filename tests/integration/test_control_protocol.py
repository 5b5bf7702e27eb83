"""The control socket's protocol over a real Unix socket: the socket file, every error kind,
bounded requests, timeouts, notifications and the event stream."""

from __future__ import annotations

import asyncio
import grp
import os
import socket
import stat
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from control_support import Raw, control_settings, request, running_server
from tests.conftest import open_app

from gpuwarden.cli.client import ControlClient, RemoteError, Unreachable
from gpuwarden.control import rpc
from gpuwarden.control.methods import METHODS, Method, NoParams
from gpuwarden.control.server import ControlServer, SocketInUse, bind_socket
from gpuwarden.core.clock import FakeClock, settle
from gpuwarden.core.errors import LeaseMaxExceeded
from gpuwarden.core.heartbeat import BEAT_EVERY
from gpuwarden.core.model import EntityKind, Event


async def _hang(app: Any, caller: Any, params: Any) -> Any:
    await asyncio.Event().wait()


async def _boom(app: Any, caller: Any, params: Any) -> Any:
    raise RuntimeError("secret internals")


async def _domain(app: Any, caller: Any, params: Any) -> Any:
    raise LeaseMaxExceeded("only 2 more hours are allowed", allowed_hours=2.0)


async def _store_missing(app: Any, caller: Any, params: Any) -> Any:
    return await app.store.get_instance("nope")


async def _now(app: Any, caller: Any, params: Any) -> Any:
    return {"at": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), "kind": EntityKind.JOB}


class EchoParams(NoParams):
    text: str


async def _echo(app: Any, caller: Any, params: EchoParams) -> Any:
    return {"text": params.text}


METHODS_FOR_TEST = {
    **METHODS,
    "test.hang": Method(NoParams, _hang),
    "test.boom": Method(NoParams, _boom),
    "test.domain": Method(NoParams, _domain),
    "test.store_missing": Method(NoParams, _store_missing),
    "test.now": Method(NoParams, _now),
    "test.echo": Method(EchoParams, _echo),
}


# --- the socket file ---------------------------------------------------------------------


async def test_socket_is_born_0660_and_removed_on_stop(short_dir: Path) -> None:
    async with open_app(control_settings(short_dir)) as app:
        server = ControlServer(app)
        await server.start()
        st = app.settings.daemon.socket.lstat()
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert os.umask(0o022) == 0o022  # the process umask was restored
        task = asyncio.create_task(server.run())
        app.stopping.set()
        await asyncio.wait_for(task, 5)
        assert not app.settings.daemon.socket.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another group needs root")
async def test_socket_group_is_applied() -> None:
    group = grp.getgrgid(65534) if _has_gid(65534) else grp.getgrall()[-1]
    async with running_server(socket_group=group.gr_name) as (_server, app):
        st = app.settings.daemon.socket.lstat()
        assert st.st_gid == group.gr_gid
        assert stat.S_IMODE(st.st_mode) == 0o660


def test_chown_is_skipped_when_the_socket_already_has_the_group(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under the systemd unit chown is refused (SystemCallFilter); it is not even tried when
    the socket is born with the right group, so that nothing is refused and logged."""
    path = short_dir / "s.sock"
    bind_socket(path, None).close()
    born_with = path.lstat().st_gid
    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(os, "chown", lambda *a: calls.append(a))
    bind_socket(path, born_with).close()
    assert calls == []
    bind_socket(path, born_with + 1).close()
    assert calls == [(path, -1, born_with + 1)]


async def test_the_heartbeat_follows_the_app_clock(short_dir: Path) -> None:
    clock = FakeClock()
    async with open_app(control_settings(short_dir), clock) as app:
        server = ControlServer(app)
        await server.start()
        task = asyncio.create_task(server.run())
        await settle()
        await clock.advance(BEAT_EVERY - 1)
        assert app.heartbeats.ages()["control"] == BEAT_EVERY - 1  # no beat on wall time
        await clock.advance(1)
        assert app.heartbeats.ages()["control"] == 0  # beat when the clock said so
        app.stopping.set()
        await asyncio.wait_for(task, 5)
        assert app.stopping.is_set()  # still set for the other services


def _has_gid(gid: int) -> bool:
    try:
        grp.getgrgid(gid)
    except KeyError:
        return False
    return True


def test_stale_socket_is_replaced_but_live_or_foreign_files_are_not(short_dir: Path) -> None:
    path = short_dir / "s.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nothing listens: a dead daemon's socket
    sock = bind_socket(path, None)
    try:
        with pytest.raises(SocketInUse, match="answers"):
            bind_socket(path, None)  # something listens there now
    finally:
        sock.close()
    other = short_dir / "file"
    other.write_text("not a socket")
    with pytest.raises(SocketInUse, match="not a socket"):
        bind_socket(other, None)
    assert other.read_text() == "not a socket"


# --- protocol errors ----------------------------------------------------------------------


async def test_each_protocol_error_kind_and_the_connection_survives() -> None:
    async with running_server(methods=METHODS_FOR_TEST) as (server, _app):
        c = await Raw.open(server.path)
        cases: list[tuple[bytes | dict[str, Any], int, Any]] = [
            (b"{not json\n", rpc.PARSE_ERROR, None),
            (b"\xff\xfe\n", rpc.PARSE_ERROR, None),
            (b"[" * 5000 + b"\n", rpc.PARSE_ERROR, None),
            (b'{"jsonrpc":"2.0","id":1,"method":"status","x":NaN}\n', rpc.PARSE_ERROR, None),
            (b"[]\n", rpc.INVALID_REQUEST, None),
            (b'[{"jsonrpc":"2.0","id":1,"method":"daemon.info"}]\n', rpc.INVALID_REQUEST, None),
            (b'"hello"\n', rpc.INVALID_REQUEST, None),
            ({"id": 7, "method": "daemon.info"}, rpc.INVALID_REQUEST, 7),
            ({"jsonrpc": "1.0", "id": 8, "method": "daemon.info"}, rpc.INVALID_REQUEST, 8),
            ({"jsonrpc": "2.0", "id": True, "method": "daemon.info"}, rpc.INVALID_REQUEST, None),
            ({"jsonrpc": "2.0", "id": {"a": 1}, "method": "x"}, rpc.INVALID_REQUEST, None),
            ({"jsonrpc": "2.0", "id": 9, "method": 5}, rpc.INVALID_REQUEST, 9),
            (request("no.such.method", req_id="abc"), rpc.METHOD_NOT_FOUND, "abc"),
            (request("extend", [1, 2], req_id=10), rpc.INVALID_PARAMS, 10),
        ]
        for data, code, want_id in cases:
            reply = await c.ask(data)
            assert reply["jsonrpc"] == "2.0"
            assert reply["error"]["code"] == code, (data, reply)
            assert reply["id"] == want_id, (data, reply)
        ok = await c.ask(request("daemon.info", req_id=11))
        assert ok["id"] == 11 and ok["result"]["pid"] == os.getpid()
        await c.close()


async def test_invalid_params_name_the_field() -> None:
    async with running_server() as (server, _app):
        c = await Raw.open(server.path)
        bad = await c.ask(request("extend", {"id": "i-1", "hours": -1}))
        assert bad["error"]["code"] == rpc.INVALID_PARAMS
        assert "hours" in bad["error"]["message"]
        assert bad["error"]["data"]["errors"][0]["field"] == "hours"
        missing = await c.ask(request("extend", {"id": "i-1"}))
        assert "hours" in missing["error"]["message"]
        assert "required" in missing["error"]["message"].lower()
        extra = await c.ask(request("status", {"bogus": 1}))
        assert extra["error"]["code"] == rpc.INVALID_PARAMS
        assert "bogus" in extra["error"]["message"]
        wrong_type = await c.ask(request("offers", {"limit": "many"}))
        assert "limit" in wrong_type["error"]["message"]
        await c.close()


async def test_domain_errors_carry_a_stable_code() -> None:
    async with (
        running_server(methods=METHODS_FOR_TEST) as (server, _app),
        ControlClient(server.path) as client,
    ):
        with pytest.raises(RemoteError) as err:
            await client.call("test.domain")
        assert err.value.code == rpc.DOMAIN_ERROR
        assert err.value.domain_code == "lease_max_exceeded"
        assert err.value.data["allowed_hours"] == 2.0
        assert "2 more hours" in err.value.message
        with pytest.raises(RemoteError) as nf:
            await client.call("test.store_missing")
        assert nf.value.domain_code == "not_found"
        # the same client keeps working after errors
        info = await client.call("daemon.info")
        assert info["queue_paused"] is False


async def test_unexpected_exception_is_a_generic_internal_error() -> None:
    async with running_server(methods=METHODS_FOR_TEST) as (server, _app):
        c = await Raw.open(server.path)
        reply = await c.ask(request("test.boom", req_id=3))
        assert reply["error"]["code"] == rpc.INTERNAL_ERROR
        assert "secret" not in reply["error"]["message"]
        assert (await c.ask(request("daemon.info", req_id=4)))["id"] == 4
        await c.close()


async def test_results_are_json_with_utc_times() -> None:
    async with (
        running_server(methods=METHODS_FOR_TEST) as (server, _app),
        ControlClient(server.path) as client,
    ):
        out = await client.call("test.now")
    assert out == {"at": "2026-01-02T03:04:05Z", "kind": "job"}


async def test_oversize_line_gets_an_error_then_close() -> None:
    async with running_server() as (server, _app):
        c = await Raw.open(server.path)
        await c.send(b'{"jsonrpc":"2.0","id":1,"method":"status","params":{"x":"' + b"a" * 70_000)
        reply = await c.recv()
        assert reply is not None
        assert reply["error"]["code"] == rpc.INVALID_REQUEST
        assert "longer than" in reply["error"]["message"]
        assert await c.recv() is None  # closed
        await c.close()
        async with ControlClient(server.path) as client:  # the server is still up
            assert (await client.call("daemon.info"))["version"]


async def test_client_sends_utf8_and_refuses_oversize_requests_itself() -> None:
    text = "🎨 ünïcødé " * 2000  # 20,000 characters; as \\u escapes it would not fit 64 KiB
    async with (
        running_server(methods=METHODS_FOR_TEST) as (server, _app),
        ControlClient(server.path) as client,
    ):
        assert (await client.call("test.echo", {"text": text}))["text"] == text
        with pytest.raises(RemoteError) as err:
            await client.call("test.echo", {"text": "x" * 70_000})
        assert err.value.domain_code == "request_too_large"
        assert (await client.call("daemon.info"))["version"]  # the connection is still good


async def test_timeout_answers_and_does_not_block_other_clients() -> None:
    async with running_server(methods=METHODS_FOR_TEST, request_timeout=0.3) as (server, _app):
        slow = await Raw.open(server.path)
        await slow.send(request("test.hang", req_id=1))
        async with ControlClient(server.path) as other:  # answered while the other hangs
            assert (await other.call("daemon.info"))["pid"] == os.getpid()
        reply = await slow.recv()
        assert reply is not None
        assert reply["error"]["code"] == rpc.TIMEOUT
        assert reply["error"]["data"]["code"] == "timeout"
        await slow.close()


async def test_notification_gets_no_reply() -> None:
    async with running_server() as (server, _app):
        c = await Raw.open(server.path)
        await c.send({"jsonrpc": "2.0", "method": "daemon.info"})
        await c.send({"jsonrpc": "2.0", "method": "no.such"})
        reply = await c.ask(request("daemon.info", req_id="after"))
        assert reply["id"] == "after"
        await c.close()


async def test_unreachable_client_error(short_dir: Path) -> None:
    with pytest.raises(Unreachable) as err:
        await ControlClient(short_dir / "none.sock").call("status")
    assert err.value.path == short_dir / "none.sock"
    assert "no such socket" in str(err.value)


# --- events -------------------------------------------------------------------------------


async def test_events_stream_store_events_until_the_client_leaves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with running_server() as (server, app):
        listeners: list[Any] = []
        real_subscribe = app.store.subscribe

        def spy(listener: Any) -> Any:
            listeners.append(listener)
            unsubscribe = real_subscribe(listener)

            def undo() -> None:
                listeners.remove(listener)
                unsubscribe()

            return undo

        monkeypatch.setattr(app.store, "subscribe", spy)
        client = ControlClient(server.path)
        stream = client.subscribe()
        first = asyncio.ensure_future(stream.__anext__())
        await _until(lambda: bool(listeners))
        await app.store.set_flag("queue_paused", True, reason="test")
        event = await asyncio.wait_for(first, 5)
        assert event["kind"] == "daemon" and event["name"] == "flag"
        assert event["details"] == {"value": True}
        assert event["at"].endswith("Z")
        await stream.aclose()
        await _until(lambda: not listeners)


async def test_a_slow_subscriber_is_told_it_lagged(monkeypatch: pytest.MonkeyPatch) -> None:
    async with running_server(event_queue=2) as (server, app):
        captured: list[Any] = []
        real_subscribe = app.store.subscribe

        def spy(listener: Any) -> Any:
            captured.append(listener)
            return real_subscribe(listener)

        monkeypatch.setattr(app.store, "subscribe", spy)
        c = await Raw.open(server.path)
        assert (await c.ask(request("events.subscribe")))["result"] == {"subscribed": True}
        await _until(lambda: bool(captured))
        now = datetime(2026, 1, 1, tzinfo=UTC)
        for i in range(10):  # ten events before the pump can run: the queue holds two
            captured[0](Event(i + 1, now, EntityKind.JOB, "j", "progress", None, None, None, {}))
        got = [await c.recv() for _ in range(3)]
        names = [(m or {})["params"]["name"] for m in got]
        assert names == ["progress", "progress", "lagged"]
        last = got[2]
        assert last is not None and last["params"]["details"] == {"dropped": 8}
        await c.close()


async def _until(cond: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)
