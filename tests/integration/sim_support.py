"""Helpers for tests that run the simulated cloud: start/stop it, build the real clients
against it (or a whole App without its loops), run a command over SSH, and read its
ledger. (Waiting for a condition is tests/conftest.py's `eventually`.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncssh
import httpx
from tests.conftest import open_app

from gpuwarden.config.settings import Settings, SimFaultSettings, SimSettings
from gpuwarden.core.clock import Clock, SystemClock
from gpuwarden.fleet.app import App
from gpuwarden.providers import build_providers
from gpuwarden.providers.base import Provider
from gpuwarden.providers.http import Backoff
from gpuwarden.providers.lambdacloud import LambdaClient
from gpuwarden.providers.vast import VastClient
from gpuwarden.remote.ssh import load_or_create_key
from gpuwarden.sim import SimCloud, SimUrls

BOOT = timedelta(seconds=0.2)
QUICK = Backoff(base=0.01, cap=0.05, rate_limited_base=0.01, max_retry_after=1.0)
KEY = "sim-key"


@asynccontextmanager
async def running_sim(
    root: Path, clock: Clock | None = None, *, faults: dict[str, Any] | None = None, **kw: Any
) -> AsyncIterator[SimCloud]:
    settings = SimSettings(
        boot_delay=kw.pop("boot_delay", BOOT),
        faults=SimFaultSettings(**(faults or {})),
        **kw,
    )
    cloud = SimCloud(settings, clock, sandbox_root=root / "sim")
    await cloud.start()
    try:
        yield cloud
    finally:
        await cloud.stop()


@dataclass
class SimApp:
    app: App
    sim: SimCloud
    tasks: list[asyncio.Task[None]] = field(default_factory=list)  # cancelled at the end


@asynccontextmanager
async def sim_app(
    settings: Settings,
    tmp: Path,
    *,
    wrap: Callable[[dict[str, Provider]], dict[str, Provider]] | None = None,
) -> AsyncIterator[SimApp]:
    """A daemon's App without its loops: the in-process sim cloud (settings.providers.sim),
    the real provider clients against it (optionally wrapped), a real Store under
    tmp/state, the SystemClock and an SSH key. At the end `stopping` is set, the tasks a
    test started are cancelled, then the rest is closed in reverse."""
    clock = SystemClock()
    (tmp / "state").mkdir(parents=True, exist_ok=True)
    sim = SimCloud(settings.providers.sim, clock, sandbox_root=tmp / "sim")
    providers = build_providers(settings, clock, sim_urls=await sim.start())
    if wrap is not None:
        providers = wrap(providers)
    async with open_app(settings, clock, providers.values()) as app:
        app.ssh_key, app.ssh_public_key = load_or_create_key(None, tmp / "state" / "ssh" / "key")
        env = SimApp(app, sim)
        try:
            yield env
        finally:
            app.stopping.set()
            for t in env.tasks:
                t.cancel()
            await asyncio.gather(*env.tasks, return_exceptions=True)
            for p in providers.values():
                with suppress(Exception):
                    await p.aclose()
            await sim.stop()


def urls(cloud: SimCloud) -> SimUrls:
    assert cloud.urls is not None
    return cloud.urls


def vast_client(cloud: SimCloud, *, max_retries: int = 3, key: str = KEY) -> VastClient:
    return VastClient(
        name="sim-vast",
        base_url=urls(cloud).vast,
        api_key=key,
        clock=SystemClock(),
        timeout=5.0,
        max_retries=max_retries,
        pacing={},
        backoff=QUICK,
    )


def lambda_client(cloud: SimCloud, *, max_retries: int = 3, key: str = KEY) -> LambdaClient:
    return LambdaClient(
        name="sim-lambda",
        base_url=urls(cloud).lambda_,
        api_key=key,
        clock=SystemClock(),
        ssh_key_name="gpuwarden-test",
        timeout=5.0,
        max_retries=max_retries,
        pacing={},
        backoff=QUICK,
    )


async def ssh_run(
    host: str, port: int, key: asyncssh.SSHKey, command: str, *, user: str = "root"
) -> asyncssh.SSHCompletedProcess:
    async with asyncssh.connect(
        host, port, username=user, client_keys=[key], known_hosts=None, connect_timeout=5
    ) as conn:
        return await conn.run(command, timeout=10)


async def admin(cloud: SimCloud, method: str, path: str, body: Any = None) -> Any:
    async with httpx.AsyncClient(base_url=urls(cloud).admin) as http:
        resp = await http.request(method, path, json=body)
        resp.raise_for_status()
        return resp.json()


def ledger_row(cloud: SimCloud, provider_id: str) -> dict[str, Any]:
    rows = [r for r in cloud.ledger()["instances"] if r["instance_id"] == provider_id]
    assert len(rows) == 1, cloud.ledger()
    row: dict[str, Any] = rows[0]
    return row


def new_key() -> tuple[asyncssh.SSHKey, str]:
    key = asyncssh.generate_private_key("ssh-ed25519", comment="gpuwarden-test")
    return key, key.export_public_key().decode().strip()
