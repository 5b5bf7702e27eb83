"""The client side of the control socket: JSON-RPC 2.0, one JSON object per line.

`ControlClient` keeps one connection for calls (opened on first use, serialised by a lock, so
one client object can be shared by tasks) and opens a separate one per `subscribe()`, because
a subscribed connection carries a stream of notifications.

    async with ControlClient(resolve_socket(args.socket, args.config)) as client:
        rows = await client.call("status")
        async for event in client.subscribe():
            ...

Errors: `Unreachable` when nothing answers at the socket (the CLI exits 69), `RemoteError`
for every error reply (`domain_code` is the stable string of a domain error, else None).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
from collections.abc import AsyncGenerator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from gpuwarden.config import paths

DOMAIN_ERROR = 1  # JSON-RPC error code of a domain error; error.data.code says which
INVALID_REQUEST = -32600
MAX_REQUEST = 64 * 1024  # the daemon's limit for one request line (control/rpc.py MAX_REQUEST)
READ_LIMIT = 64 * 1024 * 1024  # replies (a long history) may be far larger than requests


class Unreachable(Exception):
    """Nothing answers at the socket path (no daemon, no permission, or it went away)."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"cannot reach the gpuwarden daemon at {path}: {reason}")
        self.path = Path(path)
        self.reason = reason


class RemoteError(Exception):
    """An error reply. `code` is the JSON-RPC code; `data` the error's data (may be None)."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    @property
    def domain_code(self) -> str | None:
        """The stable string (not_found, lease_max_exceeded, ...) of a domain error."""
        if isinstance(self.data, Mapping):
            code = self.data.get("code")
            return code if isinstance(code, str) else None
        return None


def resolve_socket(
    explicit: str | os.PathLike[str] | None = None,
    config: str | os.PathLike[str] | None = None,
) -> Path:
    """The socket path, found the way the daemon finds its config: --socket, else
    $GPUWARDEN_SOCKET, else the daemon.socket of --config or $GPUWARDEN_CONFIG, else that of
    /etc/gpuwarden/config.toml if it exists, else /run/gpuwarden/control.sock if it exists,
    else that of the `config.example.toml` of the checkout the current directory is in
    (`make run` starts the daemon on it), else /run/gpuwarden/control.sock.

    A broken config is passed over here: the daemon, not the client, is the judge of it.
    A relative daemon.socket in a file is relative to the file's directory (config.load)."""
    if explicit:
        return Path(explicit)
    env = os.environ.get(paths.SOCKET_ENV)
    if env:
        return Path(env)
    cfg = config or os.environ.get(paths.CONFIG_ENV)
    if cfg:
        return _socket_of(Path(cfg)) or paths.DEFAULT_SOCKET
    return _found_socket()


def _found_socket() -> Path:
    """No socket or config named: the system daemon's, else a checkout's (`make run`)."""
    if paths.DEFAULT_CONFIG_PATH.exists():
        return _socket_of(paths.DEFAULT_CONFIG_PATH) or paths.DEFAULT_SOCKET
    if paths.DEFAULT_SOCKET.exists():
        return paths.DEFAULT_SOCKET
    for folder in (Path.cwd(), *Path.cwd().parents):
        example = folder / CHECKOUT_CONFIG
        if example.is_file():
            found = _socket_of(example)
            if found is not None and found.exists():
                return found
            break
    return paths.DEFAULT_SOCKET


CHECKOUT_CONFIG = "config.example.toml"  # what `make run` starts the daemon on


def _socket_of(config_path: Path) -> Path | None:
    """The file's daemon.socket with the environment's override: read lightly (tomllib),
    and through the whole Settings only when the light read cannot say (config/paths.py)."""
    if not config_path.exists():
        return None  # as config.load refuses it
    light = paths.light_socket(config_path, os.environ)
    if light is not None:
        return light
    from gpuwarden.config import settings as config_mod  # pydantic: about 0.3 s

    try:
        return config_mod.load(config_path).daemon.socket
    except (config_mod.ConfigError, OSError):
        return None


class ControlClient:
    def __init__(self, socket_path: Path | str, *, timeout: float | None = 120.0) -> None:
        self.path = Path(socket_path)
        self.timeout = timeout  # per call, on top of the daemon's own request timeout
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()
        self._conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def __aenter__(self) -> ControlClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await _close(conn[1])

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            return await asyncio.open_unix_connection(str(self.path), limit=READ_LIMIT)
        except FileNotFoundError:
            raise Unreachable(self.path, "no such socket") from None
        except PermissionError:
            raise Unreachable(self.path, "permission denied") from None
        except ConnectionRefusedError:
            raise Unreachable(self.path, "connection refused (stale socket?)") from None
        except OSError as exc:
            raise Unreachable(self.path, exc.strerror or str(exc)) from None

    async def call(self, method: str, params: Mapping[str, Any] | None = None) -> Any:
        """Send one request and return its result; raises RemoteError or Unreachable."""
        async with self._lock:
            if self._conn is None:
                self._conn = await self._open()
            reader, writer = self._conn
            req_id = next(self._ids)
            try:
                async with asyncio.timeout(self.timeout):
                    await _send(writer, req_id, method, params)
                    while True:
                        msg = await _read(reader)
                        if msg is None:
                            raise Unreachable(self.path, "the daemon closed the connection")
                        if msg.get("id") == req_id:
                            return _result(msg)
            except Unreachable:
                await self.aclose()
                raise
            except TimeoutError:
                await self.aclose()
                raise Unreachable(self.path, f"no reply within {self.timeout:g} s") from None
            except OSError as exc:
                await self.aclose()
                raise Unreachable(self.path, exc.strerror or str(exc)) from None

    async def subscribe(self) -> AsyncGenerator[dict[str, Any], None]:
        """Yield each event the daemon publishes (the params of its `event` notifications),
        until the daemon goes away (then Unreachable) or the caller stops iterating.

        An event is a dict with id, at, kind, entity_id, name, from_state, to_state, reason,
        details. When this client fell behind, the daemon dropped events and sends one with
        kind "daemon", name "lagged" and details {"dropped": N}."""
        stream = await self.open_events()
        try:
            async for event in stream:
                yield event
        finally:
            await stream.aclose()

    async def open_events(self) -> EventStream:
        """Subscribe and return once the daemon has confirmed it: every event committed
        after this returns will be in the stream (use it to list a backlog without a gap)."""
        reader, writer = await self._open()
        try:
            await _send(writer, 0, "events.subscribe", None)
            first = await _read(reader)
            if first is None:
                raise Unreachable(self.path, "the daemon closed the connection")
            _result(first)
        except OSError as exc:
            await _close(writer)
            raise Unreachable(self.path, exc.strerror or str(exc)) from None
        except BaseException:
            await _close(writer)
            raise
        return EventStream(self.path, reader, writer)


class EventStream:
    """An open subscription: `async for event in stream`, then `await stream.aclose()`."""

    def __init__(
        self, path: Path, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.path = path
        self._reader = reader
        self._writer = writer

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        while True:
            try:
                msg = await _read(self._reader)
            except OSError as exc:
                raise Unreachable(self.path, exc.strerror or str(exc)) from None
            if msg is None:
                raise Unreachable(self.path, "the daemon closed the connection")
            params = msg.get("params")
            if msg.get("method") == "event" and isinstance(params, dict):
                return params

    async def aclose(self) -> None:
        await _close(self._writer)


def encode_request(req_id: int, method: str, params: Mapping[str, Any] | None) -> bytes:
    """One request as the line the client sends."""
    req: dict[str, Any] = {"jsonrpc": "2.0", "id": req_id, "method": method}
    if params is not None:
        req["params"] = dict(params)
    # UTF-8 rather than \u escapes: a non-ASCII prompt stays as small as it can be.
    return json.dumps(req, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


async def _send(
    writer: asyncio.StreamWriter, req_id: int, method: str, params: Mapping[str, Any] | None
) -> None:
    line = encode_request(req_id, method, params)
    if len(line) > MAX_REQUEST:
        raise RemoteError(
            INVALID_REQUEST,
            f"request too large: {len(line)} bytes; the daemon takes at most {MAX_REQUEST}",
            {"code": "request_too_large"},
        )
    writer.write(line)
    await writer.drain()


async def _read(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """The next message, or None at end of stream."""
    line = await reader.readline()
    if not line:
        return None
    try:
        msg = json.loads(line)
    except ValueError:
        raise RemoteError(-32700, "the daemon sent a line that is not JSON") from None
    if not isinstance(msg, dict):
        raise RemoteError(-32603, "the daemon sent something that is not a JSON-RPC message")
    return msg


def _result(msg: Mapping[str, Any]) -> Any:
    err = msg.get("error")
    if isinstance(err, Mapping):
        raise RemoteError(
            int(err.get("code", -32603)), str(err.get("message", "error")), err.get("data")
        )
    return msg.get("result")


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
