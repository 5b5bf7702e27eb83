"""A dashboard on loopback over an App with a fake cloud, and an HTTP client for it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from tests.conftest import MakeApp

from gpuwarden.config.settings import Settings
from gpuwarden.fleet.app import App
from gpuwarden.providers.fake import FakeProvider
from gpuwarden.web.auth import COOKIE
from gpuwarden.web.server import DashboardServer


def web_settings(tmp: Path, **extra: Any) -> Settings:
    return Settings(
        daemon={"state_dir": str(tmp / "state")},
        dashboard={"listen": "127.0.0.1:0"},
        jobs={"output_dir": str(tmp / "out")},
        **extra,
    )


@dataclass
class Web:
    app: App
    server: DashboardServer
    fake: FakeProvider
    http: aiohttp.ClientSession

    @property
    def base(self) -> str:
        return self.server.url.rstrip("/")

    @property
    def bearer(self) -> dict[str, str]:
        assert self.server.auth is not None
        return {"Authorization": f"Bearer {self.server.auth.token}"}

    async def login(self) -> tuple[dict[str, str], str]:
        """A browser's first visit: (the cookie it got, the page's CSRF token)."""
        assert self.server.auth is not None
        async with self.http.get(
            f"{self.base}/?token={self.server.auth.token}", allow_redirects=False
        ) as r:
            assert r.status == 303, await r.text()
            cookie = {COOKIE: r.cookies[COOKIE].value}
        csrf = self.server.auth.csrf(cookie[COOKIE])
        assert csrf is not None
        return cookie, csrf


@contextlib.asynccontextmanager
async def web_env(make_app: MakeApp, tmp: Path, **extra: Any) -> AsyncIterator[Web]:
    from gpuwarden.core.clock import SystemClock

    clock = SystemClock()
    (tmp / "state").mkdir()
    fake = FakeProvider(clock, "fake")
    app = await make_app(web_settings(tmp, **extra), clock, [fake])
    server = DashboardServer(app)
    await server.start()
    try:
        async with aiohttp.ClientSession() as http:
            yield Web(app, server, fake, http)
    finally:
        await server.aclose()
