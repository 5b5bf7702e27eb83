"""The dead-man switch for real: the start-up script runs under sh in a sandbox HOME, the
switch daemonises, and a loopback HTTP server stands in for the provider's API. Short
timeouts (1 s), so each case takes a few seconds."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from tests.conftest import eventually

from gpuwarden.config.settings import Settings
from gpuwarden.core.model import instance_label
from gpuwarden.remote.deadman import onstart_script

pytestmark = pytest.mark.slow


@dataclass
class FakeApi:
    """Records every request; answers Lambda's GET /instances from `instances`."""

    url: str = ""
    requests: list[tuple[str, str, str, str]] = field(default_factory=list)
    instances: list[dict[str, Any]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        body = (await request.read()).decode()
        auth = request.headers.get("Authorization", "")
        self.requests.append((request.method, request.path, auth, body))
        if request.method == "GET" and request.path.endswith("/instances"):
            return web.json_response({"data": self.instances})
        self.arrived.set()
        return web.json_response({"success": True})

    def ending_calls(self) -> list[tuple[str, str, str, str]]:
        return [r for r in self.requests if r[0] != "GET"]


@pytest.fixture
async def api() -> AsyncIterator[FakeApi]:
    fake = FakeApi()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    fake.url = f"http://127.0.0.1:{port}"
    try:
        yield fake
    finally:
        await runner.cleanup()


@dataclass
class Box:
    """One pretend instance: a HOME, its environment, and the switch it started."""

    home: Path
    env: dict[str, str]

    @property
    def dir(self) -> Path:
        return self.home / ".gpuwarden"

    def pid(self) -> int | None:
        try:
            return int((self.dir / "deadman.pid").read_text())
        except (OSError, ValueError):
            return None

    def log(self) -> str:
        try:
            return (self.dir / "deadman.log").read_text()
        except OSError:
            return ""

    async def boot(self, script: str) -> None:
        proc = await asyncio.create_subprocess_exec("sh", "-c", script, env=self.env, cwd=self.home)
        assert await asyncio.wait_for(proc.wait(), 10) == 0

    def kill(self) -> None:
        pid = self.pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
async def box(tmp_path: Path) -> AsyncIterator[Box]:
    home = tmp_path / "home"
    home.mkdir()
    env = {"PATH": os.environ["PATH"], "HOME": str(home)}
    b = Box(home, env)
    try:
        yield b
    finally:
        b.kill()


def settings(**policy: Any) -> Settings:
    return Settings(policy={"deadman_timeout": "1s", **policy})


async def test_vast_switch_waits_for_a_stale_heartbeat_then_deletes_itself(
    api: FakeApi, box: Box
) -> None:
    box.env |= {
        "CONTAINER_ID": "4242",
        "CONTAINER_API_KEY": "inst-key-1",
        "GPUWARDEN_SIM_API": api.url,
    }
    await box.boot(onstart_script(settings(), "vast", "https://console.vast.ai", "i1"))
    await eventually(lambda: box.pid() is not None, timeout=5, what="the switch to start")
    # Probes keep the heartbeat fresh for twice the timeout: nothing is ended.
    for _ in range(8):
        (box.dir / "heartbeat").touch()
        await asyncio.sleep(0.25)
    assert api.ending_calls() == []
    # The daemon goes silent: the switch ends the instance with the instance-scoped key.
    await asyncio.wait_for(api.arrived.wait(), 6)
    method, path, auth, _ = api.ending_calls()[0]
    assert (method, path, auth) == ("DELETE", "/api/v0/instances/4242/", "Bearer inst-key-1")
    assert "no heartbeat for" in box.log()
    assert "inst-key-1" not in box.log()
    assert not (box.dir / "deadman.key").exists()


async def test_vast_switch_without_curl_uses_python(api: FakeApi, box: Box) -> None:
    box.env |= {
        "CONTAINER_ID": "77",
        "CONTAINER_API_KEY": "inst-key-2",
        "GPUWARDEN_SIM_API": api.url,
        "DEADMAN_HTTP": "python3",
    }
    await box.boot(onstart_script(settings(), "vast", "https://console.vast.ai", "i2"))
    await asyncio.wait_for(api.arrived.wait(), 8)
    assert api.ending_calls()[0][:3] == ("DELETE", "/api/v0/instances/77/", "Bearer inst-key-2")


async def test_switch_ends_an_instance_past_the_hard_cap_despite_heartbeats(
    api: FakeApi, box: Box
) -> None:
    box.env |= {"CONTAINER_ID": "9", "CONTAINER_API_KEY": "k", "GPUWARDEN_SIM_API": api.url}
    caps = {k: "1s" for k in ("lease_min", "lease_default", "lease_max", "hard_cap")}
    s = settings(deadman_timeout="6s", deadman_margin="1s", **caps)  # checks each 1 s
    await box.boot(onstart_script(s, "vast", "https://console.vast.ai", "i3"))
    await eventually(lambda: box.pid() is not None, timeout=5, what="the switch to start")
    ended = asyncio.ensure_future(api.arrived.wait())
    while not ended.done():
        (box.dir / "heartbeat").touch()
        await asyncio.wait([ended], timeout=0.2)
    assert "instance is" in box.log()
    assert api.ending_calls()[0][1] == "/api/v0/instances/9/"


async def test_lambda_opt_in_finds_its_id_by_label_and_terminates(api: FakeApi, box: Box) -> None:
    label = instance_label("main", "i4")
    api.instances = [{"id": "other0", "name": "someone-else"}, {"id": "abc123", "name": label}]
    # The sim's own id is only the fallback; the label lookup wins.
    box.env |= {"GPUWARDEN_SIM_API": api.url, "GPUWARDEN_SIM_INSTANCE": "fallback"}
    s = settings(lambda_deadman_api_key=True)
    await box.boot(onstart_script(s, "lambda", "https://cloud.lambda.ai/api/v1", "i4", "acct-key"))
    await asyncio.wait_for(api.arrived.wait(), 8)
    assert api.requests[0][:3] == ("GET", "/instances", "Bearer acct-key")
    method, path, auth, body = api.ending_calls()[0]
    assert (method, path, auth) == ("POST", "/instance-operations/terminate", "Bearer acct-key")
    assert body.replace(" ", "") == '{"instance_ids":["abc123"]}'
    assert oct((box.dir / "deadman.key").stat().st_mode & 0o777) == "0o600"


async def test_lambda_without_opt_in_only_warns_and_starts_once(api: FakeApi, box: Box) -> None:
    box.env |= {"GPUWARDEN_SIM_API": api.url, "GPUWARDEN_SIM_INSTANCE": "lam1"}
    script = onstart_script(settings(), "lambda", "https://cloud.lambda.ai/api/v1", "i5", "acct")
    assert "acct" not in script
    await box.boot(script)
    await eventually(lambda: box.pid() is not None, timeout=5, what="the switch to start")
    first = box.pid()
    await box.boot(script)  # a second boot (container restart) does not start a second one
    await eventually(
        lambda: "cannot end instance: no API key" in box.log(), timeout=8, what="the warning"
    )
    assert box.pid() == first
    assert box.log().count("watching:") == 1
    assert api.requests == []
    assert not (box.dir / "deadman.key").exists()


async def test_an_armed_switch_says_so_where_the_probe_reads_it(api: FakeApi, box: Box) -> None:
    box.env |= {"CONTAINER_ID": "5", "CONTAINER_API_KEY": "k", "GPUWARDEN_SIM_API": api.url}
    await box.boot(onstart_script(settings(deadman_timeout="1h"), "vast", api.url, "i6"))
    state = box.dir / "deadman.state"
    await eventually(state.is_file, timeout=5, what="the switch's state")
    assert state.read_text() == "armed\n"
    assert state.stat().st_mode & 0o777 == 0o644  # the probe may run as another user


# What the start-up script and the switch need, without curl or any python3.
BARE_TOOLS = (
    *("sh", "cat", "date", "stat", "touch", "mkdir", "mv", "base64", "gzip", "setsid"),
    *("sleep", "grep", "id", "getent", "cut", "chmod", "rm"),
)


async def test_a_switch_without_curl_or_python_says_it_cannot_act(
    api: FakeApi, box: Box, tmp_path: Path
) -> None:
    if Path("/opt/conda/bin/python3").exists():
        pytest.skip("this machine has /opt/conda/bin/python3, which the switch would find")
    bare = tmp_path / "bin"
    bare.mkdir()
    for tool in BARE_TOOLS:
        found = shutil.which(tool)
        assert found is not None, tool
        (bare / tool).symlink_to(found)
    box.env |= {
        "PATH": str(bare),
        "CONTAINER_ID": "8",
        "CONTAINER_API_KEY": "k",
        "GPUWARDEN_SIM_API": api.url,
    }
    await box.boot(onstart_script(settings(), "vast", api.url, "i7"))
    state = box.dir / "deadman.state"
    await eventually(state.is_file, timeout=5, what="the switch's state")
    assert state.read_text() == "unable: no curl or python3\n"
    # The heartbeat goes stale (1 s): it tries, says so plainly, and never calls python3.
    await eventually(lambda: "HTTP 0" in box.log(), timeout=8, what="an ending attempt")
    log = box.log()
    assert log.count("cannot end this instance: no curl or python3") == 1
    assert "not found" not in log
    assert api.requests == []
