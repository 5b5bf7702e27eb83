"""HTTP helpers shared by the sim's Vast and Lambda layers: routes with and without the
trailing slash, JSON bodies, bearer/basic/query API keys, and the fault middleware."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from gpuwarden.sim.core import SimCore
from gpuwarden.sim.ledger import ProviderKind

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ErrorBuilder = Callable[[int], web.Response]

SIM_PREFIX = "/_sim/"


def add(app: web.Application, method: str, path: str, handler: Handler) -> None:
    """Serve `path` with and without a trailing slash (the SDKs send one; the specs do not)."""
    app.router.add_route(method, path, handler)
    app.router.add_route(method, path + "/", handler)


def presented_key(request: web.Request, *, query: bool, basic: bool) -> str | None:
    """The API key the caller sent: `Authorization: Bearer K`, `Basic base64(K:)` or
    `Basic K` (Lambda), or `?api_key=K` (Vast). None when none was sent."""
    auth = request.headers.get("Authorization", "")
    scheme, _, value = auth.partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer" and value:
        return value
    if basic and scheme.lower() == "basic" and value:
        try:
            decoded = base64.b64decode(value, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return value  # `Authorization: Basic <api_key>`, raw, as the spec also allows
        return decoded.partition(":")[0] if ":" in decoded else value
    if query and request.query.get("api_key"):
        return request.query["api_key"]
    return None


async def json_body(request: web.Request) -> Any:
    """The parsed JSON body; {} when empty. Raises ValueError when it is not JSON."""
    raw = await request.read()
    if not raw.strip():
        return {}
    return json.loads(raw)


async def json_object(request: web.Request) -> dict[str, Any] | None:
    """The body as a JSON object ({} when empty); None when it is not JSON or not an object."""
    try:
        body = await json_body(request)
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def fault_middleware(core: SimCore, kind: ProviderKind, error: ErrorBuilder) -> Any:
    """Latency, then a drawn 429 or 5xx, then the sim-time tick, then the handler.
    Paths under /_sim/ (the sim's own admin and ledger) are never faulted."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if SIM_PREFIX in request.path:
            return await handler(request)
        faults = core.faults.get(kind)
        if faults.latency.total_seconds() > 0:
            await asyncio.sleep(faults.latency.total_seconds())
        rolled = core.faults.roll(kind)
        if rolled == "429":
            return error(429)
        if rolled == "5xx":
            return error(core.faults.choice((500, 502, 503)))
        await core.tick(kind)
        return await handler(request)

    return middleware
