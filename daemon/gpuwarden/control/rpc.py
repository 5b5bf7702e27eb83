"""JSON-RPC 2.0 framing for the control socket, with no I/O: turn one line into a request or
an error reply, and build replies. Kept apart from server.py so the fuzz and unit tests can
drive every malformed input straight through it.

Choices (documented in README.md, under "The control socket"):
- one JSON object per line, UTF-8, at most MAX_REQUEST bytes including the newline;
- params must be an object (named parameters) or absent; positional arrays are refused;
- batches (a JSON array) are refused with -32600: the CLI never sends them, and refusing
  them keeps one request = one reply = one bounded piece of work;
- a request without "id" is a notification: it runs, and gets no reply (JSON-RPC 2.0).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

MAX_REQUEST = 64 * 1024

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
TIMEOUT = -32001  # implementation-defined server error: the request ran out of time
DOMAIN_ERROR = 1  # what was asked cannot be done; error.data.code says why

Id = str | int | float | None


@dataclass(frozen=True, slots=True)
class Request:
    id: Id
    method: str
    params: dict[str, Any]
    notification: bool  # no "id": run it, send nothing back


class RpcError(Exception):
    """An error reply to send: code, message, optional data, for request `id`."""

    def __init__(self, code: int, message: str, data: Any = None, id: Id = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data
        self.id = id

    def reply(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            err["data"] = self.data
        return {"jsonrpc": "2.0", "id": self.id, "error": err}


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse(line: bytes) -> Request:
    """One line (without or with its newline) -> Request; raises RpcError for a bad one."""
    try:
        text = line.decode("utf-8")
        msg = json.loads(text, parse_constant=_no_constants)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, 10**5000, [[[[...
        raise RpcError(PARSE_ERROR, f"parse error: {_short(exc)}") from None
    if isinstance(msg, list):
        raise RpcError(INVALID_REQUEST, "batch requests are not supported; send one per line")
    if not isinstance(msg, dict):
        raise RpcError(INVALID_REQUEST, "invalid request: expected a JSON object")
    has_id = "id" in msg
    req_id = msg.get("id")
    if not _valid_id(req_id):
        raise RpcError(INVALID_REQUEST, "invalid request: id must be a string, number or null")
    if msg.get("jsonrpc") != "2.0":
        raise RpcError(INVALID_REQUEST, 'invalid request: "jsonrpc" must be "2.0"', id=req_id)
    method = msg.get("method")
    if not isinstance(method, str) or not method:
        raise RpcError(INVALID_REQUEST, 'invalid request: "method" must be a string', id=req_id)
    extra = set(msg) - {"jsonrpc", "id", "method", "params"}
    if extra:
        names = ", ".join(sorted(str(k) for k in extra)[:5])
        raise RpcError(INVALID_REQUEST, f"invalid request: unknown member(s) {names}", id=req_id)
    params = msg.get("params", {})
    if not isinstance(params, dict):
        raise RpcError(
            INVALID_PARAMS, "invalid params: params must be an object (named parameters)", id=req_id
        )
    return Request(id=req_id, method=method, params=params, notification=not has_id)


def _valid_id(value: Any) -> bool:
    if value is None or isinstance(value, str):
        return True
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, float) and math.isfinite(value)


def _short(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    text = str(exc)
    return text if len(text) <= 200 else text[:200] + "..."


def result(req_id: Id, value: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": req_id, "result": value}


def notification(method: str, params: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "method": method, "params": params}


def encode(message: dict[str, Any]) -> bytes:
    """One message as a line. Non-JSON values (datetimes, enums, paths) become strings."""
    return json.dumps(message, separators=(",", ":"), default=str, allow_nan=False).encode() + b"\n"
