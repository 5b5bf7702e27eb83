"""The control socket under a client that opens too many connections or leaves them idle:
descriptors stay bounded, the daemon keeps answering, and provoked log lines are throttled."""

from __future__ import annotations

from control_support import Raw, running_server

from gpuwarden.cli.client import ControlClient
from gpuwarden.control.throttle import LogThrottle
from gpuwarden.core.clock import FakeClock

INFO = {"jsonrpc": "2.0", "id": 1, "method": "daemon.info"}


async def test_connections_past_the_cap_are_told_busy_and_closed() -> None:
    async with running_server(max_connections=3) as (server, _app):
        held = [await Raw.open(server.path) for _ in range(3)]
        for c in held:  # each is being served (the server counted it)
            assert (await c.ask(INFO))["result"]["version"]
        extra = await Raw.open(server.path)
        refused = await extra.recv()
        assert refused is not None and refused["error"]["data"]["code"] == "busy"
        assert await extra.recv() is None  # and closed
        await extra.close()
        await held.pop().close()
        reply: dict[str, object] = {}
        for _ in range(100):  # once the server has seen the close, a new client is served
            c = await Raw.open(server.path)
            reply = await c.ask(INFO)
            await c.close()
            if "result" in reply:
                break
        assert "result" in reply
        for c in held:
            await c.close()


async def test_an_idle_connection_is_closed_but_a_subscriber_is_not() -> None:
    async with running_server(idle_timeout=0.3) as (server, app):
        sub = await Raw.open(server.path)
        ok = await sub.ask({"jsonrpc": "2.0", "id": 1, "method": "events.subscribe"})
        assert ok["result"] == {"subscribed": True}
        idle = await Raw.open(server.path)
        assert await idle.recv(timeout=5) is None  # closed by the server: no request came
        await idle.close()
        # The idle timeout has passed for the subscriber too; it still gets the next event.
        await app.store.set_flag("probe", 1)
        names = []
        for _ in range(3):
            frame = await sub.recv(timeout=5)
            assert frame is not None
            names.append(frame.get("params", frame).get("name"))
            if "flag" in names:
                break
        assert "flag" in names
        await sub.close()
        async with ControlClient(server.path) as client:
            assert (await client.call("daemon.info"))["version"]


async def test_a_provoked_log_line_is_throttled_and_counts_what_it_held_back() -> None:
    clock = FakeClock()
    throttle = LogThrottle(clock, every=10)
    assert throttle.allow("refused") == 0
    assert [throttle.allow("refused") for _ in range(1999)] == [None] * 1999
    assert throttle.allow("busy") == 0  # each kind on its own
    await clock.advance(10)  # the next window
    assert throttle.allow("refused") == 1999
