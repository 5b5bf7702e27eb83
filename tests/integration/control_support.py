"""Helpers for the control socket tests: a ControlServer on a short temporary socket path
(AF_UNIX paths are limited to 108 bytes, so not under pytest's long tmp_path) with a minimal
App (tests/conftest.py's open_app): a real Store, the system clock (or a given one), no
providers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager, suppress
from datetime import timedelta
from pathlib import Path
from typing import Any

from tests.conftest import open_app, short_tmp

from gpuwarden.config.settings import DaemonSettings, Settings
from gpuwarden.control.methods import Method
from gpuwarden.control.server import IDLE_TIMEOUT, MAX_CONNECTIONS, ControlServer
from gpuwarden.fleet.app import App


def control_settings(base: Path, **daemon: Any) -> Settings:
    """State in `base`, the socket at base/run/control.sock, and the given [daemon] keys."""
    return Settings(
        daemon=DaemonSettings(state_dir=base, socket=base / "run" / "control.sock", **daemon)
    )


@asynccontextmanager
async def running_server(
    *,
    methods: Mapping[str, Method[Any]] | None = None,
    event_queue: int = 1000,
    request_timeout: float = 30.0,
    max_connections: int = MAX_CONNECTIONS,
    idle_timeout: float = IDLE_TIMEOUT,
    **daemon: Any,
) -> AsyncIterator[tuple[ControlServer, App]]:
    with short_tmp() as base:
        settings = control_settings(base, **daemon)
        # Tests may go below the 1 s floor a config may set, to see a timeout quickly.
        timeout = timedelta(seconds=request_timeout)
        settings = settings.model_copy(
            update={"daemon": settings.daemon.model_copy(update={"request_timeout": timeout})}
        )
        async with open_app(settings) as app:
            server = ControlServer(
                app,
                methods=methods,
                event_queue=event_queue,
                max_connections=max_connections,
                idle_timeout=idle_timeout,
            )
            await server.start()
            task = asyncio.create_task(server.run())
            try:
                yield server, app
            finally:
                app.stopping.set()
                await asyncio.wait_for(task, 10)


class Raw:
    """A raw line-level connection, for sending what no well-behaved client would."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, path: Path) -> Raw:
        reader, writer = await asyncio.open_unix_connection(str(path), limit=2**24)
        return cls(reader, writer)

    async def send(self, data: bytes | Mapping[str, Any]) -> None:
        if not isinstance(data, bytes):
            data = json.dumps(data).encode() + b"\n"
        self.writer.write(data)
        await self.writer.drain()

    async def recv(self, timeout: float = 5.0) -> dict[str, Any] | None:
        line = await asyncio.wait_for(self.reader.readline(), timeout)
        if not line:
            return None
        out: dict[str, Any] = json.loads(line)
        return out

    async def ask(self, data: bytes | Mapping[str, Any], timeout: float = 5.0) -> dict[str, Any]:
        await self.send(data)
        reply = await self.recv(timeout)
        assert reply is not None, "the server closed the connection"
        return reply

    async def close(self) -> None:
        self.writer.close()
        with suppress(OSError):
            await self.writer.wait_closed()


def request(method: str, params: Any = None, req_id: Any = 1) -> dict[str, Any]:
    msg: dict[str, Any] = {"jsonrpc": "2.0", "id": req_id, "method": method}
    if params is not None:
        msg["params"] = params
    return msg
