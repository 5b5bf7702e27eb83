"""The dashboard over HTTP: who gets in, which actions pass, what they record."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from pathlib import Path

import pytest
from tests.conftest import MakeApp
from web_support import web_env

from gpuwarden.core.model import EntityKind, InstanceState, TerminationReason
from gpuwarden.fleet import launcher
from gpuwarden.web.auth import CSRF_HEADER


async def test_every_request_needs_the_token(make_app: MakeApp, tmp_path: Path) -> None:
    async with web_env(make_app, tmp_path) as w:
        for path in ("/", "/api/state", "/api/events", "/metrics", "/outputs/x.png"):
            async with w.http.get(w.base + path) as r:
                assert r.status == 401, path
                assert "token" in (await r.json())["error"]
        async with w.http.post(w.base + "/api/instances/x/destroy") as r:
            assert r.status == 401
        async with w.http.get(w.base + "/?token=wrong", allow_redirects=False) as r:
            assert r.status == 401
        async with w.http.get(w.base + "/api/state", headers=w.bearer) as r:
            assert r.status == 200
            assert (await r.json())["actor"] == "dashboard:operator"


async def test_a_first_visit_sets_a_session_and_the_page_carries_its_csrf_token(
    make_app: MakeApp, tmp_path: Path
) -> None:
    async with web_env(make_app, tmp_path) as w:
        cookie, csrf = await w.login()
        async with w.http.get(w.base + "/", cookies=cookie) as r:
            assert r.status == 200
            html = await r.text()
            assert f'const CSRF = "{csrf}"' in html
            assert r.headers["X-Frame-Options"] == "DENY"
            assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]


async def test_extend_and_destroy_from_the_page_are_recorded_with_who(
    make_app: MakeApp, tmp_path: Path
) -> None:
    async with web_env(make_app, tmp_path) as w:
        inst = await launcher.launch(w.app, w.fake.offers[0], hours=1)
        cookie, csrf = await w.login()
        url = f"{w.base}/api/instances/{inst.id}"
        ours = {CSRF_HEADER: csrf, "Origin": w.base, "Sec-Fetch-Site": "same-origin"}
        # Cross-site, or without the CSRF token: refused, nothing changes.
        for headers in ({**ours, "Origin": "http://evil.example"}, {"Origin": w.base}):
            async with w.http.post(
                url + "/extend", json={"hours": 1}, headers=headers, cookies=cookie
            ) as r:
                assert r.status == 403
        assert (await w.app.store.get_instance(inst.id)).lease_until == inst.lease_until
        async with w.http.post(
            url + "/extend", json={"hours": "lots"}, headers=ours, cookies=cookie
        ) as r:
            assert r.status == 400 and "hours" in (await r.json())["error"]
        async with w.http.post(
            url + "/extend", json={"hours": 1}, headers=ours, cookies=cookie
        ) as r:
            assert r.status == 200, await r.text()
        after = await w.app.store.get_instance(inst.id)
        assert after.lease_until is not None and inst.lease_until is not None
        assert (after.lease_until - inst.lease_until).total_seconds() == 3600
        async with w.http.post(url + "/activity", headers=w.bearer) as r:  # a script: bearer
            assert r.status == 200, await r.text()
        async with w.http.post(url + "/destroy", headers=ours, cookies=cookie) as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["reason"] == "manual"
        ended = await w.app.store.get_instance(inst.id)
        assert ended.state is InstanceState.TERMINATED
        assert ended.reason is TerminationReason.MANUAL
        events = await w.app.store.events(kind=EntityKind.INSTANCE, entity_id=inst.id)
        by = {e.name: e.details.get("by") for e in events if e.details.get("by")}
        assert by["extended"] == by["activity"] == "dashboard:operator"
        assert "dashboard:operator" in {e.details.get("by") for e in events if e.to_state}
        async with w.http.post(url + "/destroy", headers=w.bearer) as r:
            assert r.status == 409  # already ended: said, not done twice


async def test_the_event_stream_sends_each_event_as_it_is_committed(
    make_app: MakeApp, tmp_path: Path
) -> None:
    async with (
        web_env(make_app, tmp_path) as w,
        w.http.get(w.base + "/api/events", headers=w.bearer) as r,
    ):
        assert r.headers["Content-Type"].startswith("text/event-stream")
        assert await r.content.readline() == b": connected\n"
        await r.content.readline()
        inst = await launcher.launch(w.app, w.fake.offers[0], hours=1)
        async with asyncio.timeout(10):
            while True:
                line = (await r.content.readline()).decode()
                if line.startswith("data: "):
                    event = json.loads(line.removeprefix("data: "))
                    if event["entity_id"] == inst.id:
                        break
        assert event["kind"] == "instance"


async def test_images_are_served_from_the_outputs_dir_only(
    make_app: MakeApp, tmp_path: Path
) -> None:
    async with web_env(make_app, tmp_path) as w:
        (tmp_path / "out" / "j1").mkdir(parents=True)
        (tmp_path / "out" / "j1" / "image-0.png").write_bytes(b"\x89PNG\r\n\x1a\nfake")
        (tmp_path / "out" / "j1" / "result.json").write_text("{}")
        (tmp_path / "secret.png").write_bytes(b"\x89PNG outside")
        (tmp_path / "out" / "j1" / "link.png").symlink_to(tmp_path / "secret.png")
        async with w.http.get(w.base + "/outputs/j1/image-0.png", headers=w.bearer) as r:
            assert r.status == 200 and r.headers["Content-Type"] == "image/png"
            assert (await r.read()).endswith(b"fake")
        for rel in ("j1/result.json", "j1/link.png", "..%2Fsecret.png", "j1/none.png"):
            async with w.http.get(f"{w.base}/outputs/{rel}", headers=w.bearer) as r:
                assert r.status == 404, rel


async def test_metrics_need_the_token_unless_public(make_app: MakeApp, tmp_path: Path) -> None:
    async with web_env(make_app, tmp_path, metrics={"public": True}) as w:
        async with w.http.get(w.base + "/metrics") as r:
            assert r.status == 200
            assert "gpuwarden_instances" in await r.text()
        async with w.http.get(w.base + "/api/state") as r:
            assert r.status == 401  # only /metrics is public


async def test_an_action_that_overruns_is_a_json_timeout_not_a_bare_500(
    make_app: MakeApp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As the control socket answers an overrun of daemon.request_timeout: code "timeout"."""
    from gpuwarden.web import views

    async def overrun(*_: object) -> None:
        await asyncio.Event().wait()  # never answers: daemon.request_timeout ends it

    async def inner_timeout(*_: object) -> None:
        raise TimeoutError  # the action's own failure (a call it made timed out)

    async with web_env(make_app, tmp_path) as w:
        inst = await launcher.launch(w.app, w.fake.offers[0], hours=1)
        # Below the setting's 1 s floor, so that the overrun is real and quick.
        daemon = w.app.settings.daemon.model_copy(
            update={"request_timeout": timedelta(seconds=0.05)}
        )
        w.app.settings = w.app.settings.model_copy(update={"daemon": daemon})
        url = f"{w.base}/api/instances/{inst.id}/activity"
        monkeypatch.setattr(views, "act", overrun)
        async with w.http.post(url, headers=w.bearer) as r:
            assert r.status == 504
            body = await r.json()
        assert body["code"] == "timeout" and "request_timeout" in body["error"]
        monkeypatch.setattr(views, "act", inner_timeout)
        async with w.http.post(url, headers=w.bearer) as r:
            assert r.status == 500  # not blamed on the request timeout
            assert (await r.json())["code"] == "internal"
