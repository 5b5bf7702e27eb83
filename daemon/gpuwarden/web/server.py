"""The dashboard service: one aiohttp listener (off unless `dashboard.listen` is set) with the
page, its JSON, a live event stream (server-sent events from the store's event log, as the
control socket's `events.subscribe` streams it), the finished images and /metrics.

- Bound in `start()` (before READY, so a port in use is a failed start, not a silent gap),
  served from `run()` in the supervisor's root TaskGroup; it beats like every loop.
- Every request passes auth.py (token or session cookie; actions need the CSRF token and a
  same-site origin) except `/metrics` with `metrics.public = true`; refusals are 401/403.
- Each event stream has a bounded queue: a browser too slow to keep up loses events and is
  told (`lagged`), never stalls the store's commit path or other clients.
"""

from __future__ import annotations

import asyncio
import grp
import json
import socket
from datetime import timedelta
from importlib import resources
from typing import Any

import structlog
from aiohttp import web

from gpuwarden.config.web import split_listen
from gpuwarden.control.events import event_json, lagged_json
from gpuwarden.core.errors import DomainError, NotFound
from gpuwarden.core.heartbeat import BEAT_EVERY
from gpuwarden.core.model import Event
from gpuwarden.fleet.app import App
from gpuwarden.store import IllegalTransition, NotFoundError
from gpuwarden.web import metrics, views
from gpuwarden.web.auth import COOKIE, Auth, load_or_create_token, token_path

log = structlog.get_logger(__name__)

EVENT_QUEUE = 1000
KEEPALIVE = 15.0  # seconds between comments on an idle event stream (proxies close idle ones)
STATUS_OF = {"not_found": 404, "invalid_state": 409, "ambiguous": 409, "invalid_input": 400}
PAGE = "dashboard.html"
SESSION = web.RequestKey("session", str)  # the cookie session a request came with
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline';"
        " script-src 'self' 'unsafe-inline'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _page() -> str:
    return resources.files("gpuwarden.web").joinpath("assets", PAGE).read_text()


def _group_gid(name: str | None) -> int | None:
    if not name:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


class DashboardServer:
    """The `dashboard` service."""

    name = "dashboard"

    def __init__(self, app: App, *, event_queue: int = EVENT_QUEUE) -> None:
        self.app = app
        self.event_queue = event_queue
        self.auth: Auth | None = None
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._page = _page()

    @property
    def url(self) -> str:
        host, _ = split_listen(self.app.settings.dashboard.listen or "127.0.0.1:0")
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{self.port}/"

    async def start(self) -> None:
        settings = self.app.settings
        listen = settings.dashboard.listen
        assert listen is not None, "wired only when dashboard.listen is set"
        gid = _group_gid(settings.daemon.socket_group)
        token = load_or_create_token(token_path(settings.daemon.state_dir), gid)
        self.auth = Auth(token)
        host, port = split_listen(listen)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family, backlog=128)
        self.port = sock.getsockname()[1]
        self._runner = web.AppRunner(
            self._build(), access_log=None, handle_signals=False, shutdown_timeout=1.0
        )
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()
        self.app.heartbeats.register(self.name)
        log.info("dashboard_listening", url=self.url)

    async def run(self) -> None:
        if self._runner is None:
            await self.start()
        clock = self.app.clock
        wake = asyncio.Event()
        stop = asyncio.create_task(self.app.stopping.wait(), name="dashboard-stop")
        stop.add_done_callback(lambda _: wake.set())
        try:
            while not self.app.stopping.is_set():
                self.app.heartbeats.beat(self.name)
                await clock.sleep_until(clock.now() + timedelta(seconds=BEAT_EVERY), wake)
        finally:
            stop.cancel()
            await self.aclose()

    async def aclose(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    # --- the application ------------------------------------------------------------------

    def _build(self) -> web.Application:
        app = web.Application(middlewares=[self._guard], client_max_size=64 * 1024)
        app.router.add_get("/", self._index)
        app.router.add_get("/api/state", self._state)
        app.router.add_get("/api/events", self._events)
        app.router.add_post("/api/instances/{id}/{action}", self._action)
        app.router.add_get("/outputs/{path:.+}", self._output)
        app.router.add_get("/metrics", self._metrics)
        return app

    @web.middleware
    async def _guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        assert self.auth is not None
        public = request.path == "/metrics" and self.app.settings.metrics.public
        first_visit = request.path == "/" and "token" in request.query
        if not (public or first_visit):
            origin = f"{request.scheme}://{request.host}"
            verdict = self.auth.check(request.method, request.headers, request.cookies, origin)
            if verdict.status != 200:
                return _refused(verdict.status, verdict.reason)
            request[SESSION] = verdict.session or ""
        response: web.StreamResponse = await handler(request)
        for key, value in SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        return response

    async def _index(self, request: web.Request) -> web.StreamResponse:
        assert self.auth is not None
        offered = request.query.get("token")
        if offered is not None:
            session = self.auth.open_session(offered)
            if session is None:
                return _refused(401, "wrong token")
            # Off the address bar (and out of the history) once the cookie holds the session.
            response = web.Response(status=303, headers={"Location": "/"})
            response.set_cookie(COOKIE, session, httponly=True, samesite="Strict", path="/")
            return response
        csrf = self.auth.csrf(request.get(SESSION, ""))
        if csrf is None:  # a bearer client: the page is for browsers
            return _refused(401, "open the URL `gpuwarden dashboard` prints in a browser")
        html = self._page.replace("__CSRF_TOKEN__", csrf)
        return web.Response(text=html, content_type="text/html")

    async def _state(self, _: web.Request) -> web.StreamResponse:
        return _json(await views.state(self.app))

    async def _action(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json() if request.can_read_body else {}
        except ValueError:
            return _json({"error": "the body is not JSON", "code": "invalid_input"}, 400)
        try:
            timeout = self.app.settings.daemon.request_timeout.total_seconds()
            async with asyncio.timeout(timeout) as scope:
                result = await views.act(
                    self.app, request.match_info["action"], request.match_info["id"], body
                )
        except DomainError as exc:
            return _json({"error": exc.message, "code": exc.code}, STATUS_OF.get(exc.code, 422))
        except NotFoundError as exc:
            return _json({"error": str(exc.args[0]), "code": "not_found"}, 404)
        except IllegalTransition as exc:
            return _json({"error": str(exc), "code": "invalid_state"}, 409)
        except TimeoutError:
            return _timed_out(request.match_info["action"], timeout, overrun=scope.expired())
        return _json(result)

    async def _output(self, request: web.Request) -> web.StreamResponse:
        try:
            path, kind = views.output_file(self.app.settings.output_dir, request.match_info["path"])
        except NotFound as exc:
            return _json({"error": exc.message, "code": exc.code}, 404)
        return web.FileResponse(path, headers={"Content-Type": kind})

    async def _metrics(self, _: web.Request) -> web.StreamResponse:
        body = await metrics.render(self.app)
        return web.Response(body=body, headers={"Content-Type": metrics.CONTENT_TYPE})

    async def _events(self, request: web.Request) -> web.StreamResponse:
        queue: asyncio.Queue[Event | int] = asyncio.Queue(maxsize=self.event_queue)
        dropped = 0

        def listener(event: Event) -> None:  # runs in the store's commit path: cheap only
            nonlocal dropped
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                dropped += 1

        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"}
        )
        await response.prepare(request)
        unsubscribe = self.app.store.subscribe(listener)
        try:
            await response.write(b": connected\n\n")
            while not self.app.stopping.is_set():
                try:
                    item = await asyncio.wait_for(queue.get(), KEEPALIVE)
                except TimeoutError:
                    await response.write(b": keepalive\n\n")
                    continue
                payload = event_json(item) if isinstance(item, Event) else lagged_json(item)
                await response.write(f"data: {json.dumps(payload)}\n\n".encode())
                if queue.empty() and dropped:
                    lost, dropped = dropped, 0
                    await response.write(f"data: {json.dumps(lagged_json(lost))}\n\n".encode())
        except ConnectionError:
            pass  # the browser went away
        finally:
            unsubscribe()
        return response


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d, default=str))


def _refused(status: int, reason: str) -> web.Response:
    return _json(
        {"error": reason, "code": "unauthorized" if status == 401 else "forbidden"}, status
    )


def _timed_out(action: str, timeout: float, *, overrun: bool) -> web.Response:
    """An action past daemon.request_timeout: code "timeout", as the control socket answers
    an overrun. A timeout inside the action is its own failure, an internal error (left to
    aiohttp, it would be a bare 504 that blames the request timeout)."""
    if not overrun:
        log.exception("dashboard_action_failed", action=action)
        return _json({"error": "internal error (see the daemon's log)", "code": "internal"}, 500)
    log.warning("dashboard_timeout", action=action, timeout_s=timeout)
    took = f"the action took longer than {timeout:g} s (daemon.request_timeout)"
    return _json({"error": took, "code": "timeout"}, 504)
