"""Headless Chromium from Debian's package, driven by Playwright (never `playwright install`:
the browser is the system's), and a dashboard over the in-process sim cloud."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from sim_support import SimApp, sim_app

from gpuwarden.config.settings import Settings
from gpuwarden.web.server import DashboardServer

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# In CI (.ci/run installs chromium) a missing browser is a failure, never a skip.
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists() and os.environ.get("CI") != "true",
    reason="no /usr/bin/chromium (apt-get install chromium; .ci/run installs it)",
)

if TYPE_CHECKING:
    from playwright.async_api import Page


def dashboard_settings(tmp: Path) -> Settings:
    return Settings(
        daemon={"state_dir": str(tmp / "state"), "socket": str(tmp / "control.sock")},
        providers={"sim": {"enabled": True, "boot_delay": "0.2s", "sandbox_dir": str(tmp / "sim")}},
        jobs={"output_dir": str(tmp / "out")},
        dashboard={"listen": "127.0.0.1:0"},
        budget={"daily_limit": 20.0},
    )


@dataclass
class Dash:
    env: SimApp
    server: DashboardServer

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def login_url(self) -> str:
        assert self.server.auth is not None
        return f"{self.server.url}?token={self.server.auth.token}"


@contextlib.asynccontextmanager
async def dashboard(tmp: Path) -> AsyncIterator[Dash]:
    (tmp / "state").mkdir(parents=True, exist_ok=True)
    async with sim_app(dashboard_settings(tmp), tmp) as env:
        server = DashboardServer(env.app)
        await server.start()
        try:
            yield Dash(env, server)
        finally:
            await server.aclose()


@contextlib.asynccontextmanager
async def browser_page(tmp: Path) -> AsyncIterator[Page]:
    """A fresh page; if the test fails inside, a screenshot is saved to tmp/failure.png."""
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            try:
                yield page
            except BaseException:
                with contextlib.suppress(Exception):
                    await page.screenshot(path=str(tmp / "failure.png"), full_page=True)
                raise
        finally:
            await browser.close()
