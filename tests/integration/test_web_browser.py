"""The dashboard in a real browser (Debian's Chromium through Playwright) on the sim cloud:
it lists a launched instance, Extend moves its lease end, Destroy ends it, a change arrives
live without a reload, no token is 401, and a cross-site POST is refused. On failure each
test leaves a screenshot in its tmp_path (failure.png)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from aiohttp import web
from browser_support import browser_page, dashboard, needs_chromium
from playwright.async_api import expect
from tests.conftest import eventually

from gpuwarden.control import instances as api
from gpuwarden.core.model import InstanceState, TerminationReason

pytestmark = [pytest.mark.slow, needs_chromium]


async def test_the_page_lists_an_instance_extend_moves_its_lease_destroy_ends_it(
    tmp_path: Path,
) -> None:
    async with dashboard(tmp_path) as d, browser_page(tmp_path) as page:
        launched = await api.launch(d.env.app, hours=1, by="test")
        iid = launched["id"]
        await page.goto(d.login_url)
        assert page.url == d.url  # the token left the address bar
        row = page.locator(f'#instances tr[data-id="{iid}"]')
        await expect(row).to_be_visible()
        await expect(row).to_contain_text(launched["gpu"])
        before = (await d.env.app.store.get_instance(iid)).lease_until
        assert before is not None

        await row.locator("input.hours").fill("2")
        await row.locator('button[data-action="extend"]').click()
        await expect(page.locator("#message")).to_have_text("extend: done")

        async def moved() -> bool:
            lease = (await d.env.app.store.get_instance(iid)).lease_until
            return lease == before + timedelta(hours=2)

        await eventually(moved, what="the lease to move by 2 h")
        lease = (await d.env.app.store.get_instance(iid)).lease_until
        assert lease is not None
        await expect(row).to_have_attribute("data-lease-until", lease.isoformat())

        await row.locator('button[data-action="activity"]').click()
        await expect(page.locator("#message")).to_have_text("activity: done")
        events = await d.env.app.store.events(entity_id=iid)
        by = {e.name: e.details.get("by") for e in events}
        assert by["extended"] == by["activity"] == "dashboard:operator"

        page.once("dialog", lambda dialog: dialog.accept())
        await row.locator('button[data-action="destroy"]').click()
        await expect(row).to_have_count(0)  # gone from the live list
        ended = await d.env.app.store.get_instance(iid)
        assert ended.state is InstanceState.TERMINATED
        assert ended.reason is TerminationReason.MANUAL
        [entry] = [
            e for e in d.env.sim.ledger()["instances"] if e["instance_id"] == ended.provider_id
        ]
        assert not entry["running"]
        await expect(page.locator(f'#history tr[data-id="{iid}"] .reason')).to_have_text("manual")
        await expect(page.locator("#events li").first).to_be_visible()


async def test_a_change_arrives_live_without_a_reload(tmp_path: Path) -> None:
    async with dashboard(tmp_path) as d, browser_page(tmp_path) as page:
        await page.goto(d.login_url)
        await expect(page.locator("#live")).to_have_text("● live")
        await page.evaluate("window.sameDocument = true")
        launched = await api.launch(d.env.app, hours=1, by="test")
        # Well within the page's 15 s periodic refresh: only the event stream can bring it.
        await expect(page.locator(f'#instances tr[data-id="{launched["id"]}"]')).to_be_visible(
            timeout=5000
        )
        await expect(
            page.locator(f'#events li[data-entity="{launched["id"]}"]').first
        ).to_be_visible(timeout=5000)
        assert await page.evaluate("window.sameDocument") is True


async def test_no_token_is_401_and_a_cross_site_post_is_refused(tmp_path: Path) -> None:
    async with dashboard(tmp_path) as d, browser_page(tmp_path) as page:
        response = await page.goto(d.url)
        assert response is not None and response.status == 401
        launched = await api.launch(d.env.app, hours=1, by="test")
        await page.goto(d.login_url)  # the browser now holds a session cookie
        # Another site (another port is another origin) posts a form at the dashboard: the
        # browser sends the cookie along, and the dashboard must refuse.
        target = f"{d.url}api/instances/{launched['id']}/destroy"
        evil = web.Application()
        html = f'<form id=f method=POST action="{target}"></form><script>f.submit()</script>'

        async def page_of_evil(_: web.Request) -> web.Response:
            return web.Response(text=html, content_type="text/html")

        evil.router.add_get("/", page_of_evil)
        runner = web.AppRunner(evil)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            port = runner.addresses[0][1]
            async with page.expect_response(lambda r: r.url == target) as posted:
                await page.goto(f"http://127.0.0.1:{port}/")
            assert (await posted.value).status == 403
        finally:
            await runner.cleanup()
        inst = await d.env.app.store.get_instance(launched["id"])
        assert inst.state is not InstanceState.TERMINATED and inst.state.live
