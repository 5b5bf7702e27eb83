"""10,000 random and malformed messages (hypothesis) against a running control server: it stays
up, every reply is a well-formed JSON-RPC message, and every well-formed request is answered.

The server runs in its own thread and event loop, like a daemon; the test talks to it with
plain blocking sockets over a few connections. Each example sends a mix of junk and tracked
well-formed requests, then a sentinel request, and reads until the sentinel's reply.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from control_support import running_server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXAMPLES = 200
PER_EXAMPLE = 50  # 200 x 50 = 10,000 messages
CONNECTIONS = 4

# Methods that are safe to call at random: no side effects, fast with no providers.
SAFE = ["daemon.info", "status", "history", "costs", "jobs.get", "jobs.list", "offers", "extend"]

_counter = itertools.count()


class Server:
    """A ControlServer on its own loop in a thread."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.ready = threading.Event()
        self.failed: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self.thread = threading.Thread(target=self._main, name="control-fuzz", daemon=True)

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:
            self.failed = exc
            self.ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with running_server(request_timeout=5.0) as (server, app):
            self.path = server.path
            self.alive = lambda: not app.stopping.is_set()
            self.ready.set()
            await self._stop.wait()

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(15)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    srv = Server()
    srv.thread.start()
    assert srv.ready.wait(15)
    assert srv.failed is None, srv.failed
    yield srv
    for conn in _conns.values():
        conn.close()
    _conns.clear()
    srv.stop()
    assert not srv.thread.is_alive()
    assert srv.failed is None, srv.failed


class Conn:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(20)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def readline(self) -> bytes:
        return self.file.readline()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


_conns: dict[int, Conn] = {}


def _conn(server: Server, n: int) -> Conn:
    if n not in _conns:
        assert server.path is not None
        _conns[n] = Conn(server.path)
    return _conns[n]


# --- strategies ---------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=10**30, max_value=10**400)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    scalars,
    lambda ch: st.lists(ch, max_size=4) | st.dictionaries(st.text(max_size=8), ch, max_size=4),
    max_leaves=12,
)
methods = st.sampled_from(SAFE) | st.text(max_size=30)
envelopes = st.fixed_dictionaries(
    {},
    optional={
        "jsonrpc": st.just("2.0") | json_values,
        "id": json_values,
        "method": methods | json_values,
        "params": json_values | st.dictionaries(st.sampled_from(["id", "hours", "days"]), scalars),
        "extra": json_values,
    },
)


def _dumps(value: Any) -> bytes:
    return json.dumps(value).encode()


junk = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=200).map(str.encode),
    json_values.map(_dumps),
    envelopes.map(_dumps),
    st.integers(min_value=1, max_value=4000).map(lambda n: b"[" * n),  # deep nesting
    st.integers(min_value=1, max_value=400).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
    st.just(b'{"jsonrpc":"2.0","id":1,"method":"status","params":{"x":NaN}}'),
)


@st.composite
def well_formed(draw: st.DrawFn) -> tuple[Any, bytes]:
    """A request that must get a reply carrying its id; the id is unique to this run."""
    n = next(_counter)
    req_id: Any = draw(st.sampled_from([f"wf-{n}", 10**200 + n, -(10**40) - n]))
    method = draw(methods)
    params = draw(st.none() | st.dictionaries(st.sampled_from(["id", "hours", "days"]), scalars))
    msg: dict[str, Any] = {"jsonrpc": "2.0", "id": req_id, "method": method}
    if params is not None:
        msg["params"] = params
    return req_id, _dumps(msg)


@st.composite
def messages(draw: st.DrawFn) -> list[tuple[Any, bytes]]:
    """PER_EXAMPLE messages, about half junk and half tracked requests, shuffled."""
    half = PER_EXAMPLE // 2
    bad = draw(st.lists(junk, min_size=half, max_size=half))
    good = draw(st.lists(well_formed(), min_size=PER_EXAMPLE - half, max_size=PER_EXAMPLE - half))
    items: list[tuple[Any, bytes]] = [(None, b) for b in bad] + good
    draw(st.randoms(use_true_random=False)).shuffle(items)
    return items


sent = {"messages": 0, "tracked": 0}


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(batch=messages(), which=st.integers(min_value=0, max_value=CONNECTIONS - 1))
def _fuzz(server: Server, batch: list[tuple[Any, bytes]], which: int) -> None:
    conn = _conn(server, which)
    expected = {json.dumps(req_id) for req_id, _ in batch if req_id is not None}
    sentinel = f"sentinel-{next(_counter)}"
    payload = b"".join(line.replace(b"\n", b" ") + b"\n" for _, line in batch)
    payload += _dumps({"jsonrpc": "2.0", "id": sentinel, "method": "daemon.info"}) + b"\n"
    conn.send(payload)
    seen: set[str] = set()
    while True:
        line = conn.readline()
        assert line, "the server closed a connection it should have kept"
        reply = json.loads(line)
        assert reply["jsonrpc"] == "2.0"
        assert ("result" in reply) != ("error" in reply), reply
        if "error" in reply:
            assert isinstance(reply["error"]["code"], int)
            assert isinstance(reply["error"]["message"], str)
        if reply.get("id") == sentinel:
            assert "result" in reply
            break
        seen.add(json.dumps(reply.get("id")))
    missing = expected - seen
    assert not missing, f"well-formed requests without a reply: {sorted(missing)[:5]}"
    sent["messages"] += len(batch)
    sent["tracked"] += len(expected)


@pytest.mark.slow
# CPU-bound, not waiting on anything: 10,000 messages take 47-70 s under coverage on a quiet
# 2-core machine and went past the 120 s default with the machine at load 7 (measured), so
# this one test gets room; a hung reply still fails at the socket's 20 s read timeout.
@pytest.mark.timeout(360)
def test_ten_thousand_malformed_messages(server: Server) -> None:
    _fuzz(server)
    assert sent["messages"] >= 10_000
    assert sent["tracked"] >= 4000
    # Still up: a fresh connection is answered.
    assert server.path is not None
    fresh = Conn(server.path)
    try:
        fresh.send(b'{"jsonrpc":"2.0","id":"last","method":"daemon.info"}\n')
        reply = json.loads(fresh.readline())
    finally:
        fresh.close()
    assert reply["id"] == "last" and reply["result"]["version"]
    assert server.thread.is_alive()
