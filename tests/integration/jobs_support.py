"""Shared harness of the job tests on the sim cloud: a real Store on tmp_path, the in-process
SimCloud with the real provider clients, real SSH, the SystemClock with short timeouts, and
the JobService with the guard (which drives destroys to their end)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sim_support import sim_app
from tests.conftest import eventually

from gpuwarden.config.settings import Settings
from gpuwarden.control import jobs as api
from gpuwarden.core.model import Instance, Job, JobState
from gpuwarden.fleet.app import App
from gpuwarden.jobs.runner import Connector, RemoteConn
from gpuwarden.jobs.service import JobService
from gpuwarden.loops.guard import Guard
from gpuwarden.providers.base import Launched, LaunchSpec, NoCapacity, Offer, Provider
from gpuwarden.sim.server import SimCloud
from gpuwarden.store import Store


def job_settings(tmp: Path, **jobs: Any) -> Settings:
    return Settings(
        daemon={"state_dir": str(tmp / "state"), "socket": str(tmp / "control.sock")},
        providers={"sim": {"enabled": True, "boot_delay": "0.2s", "sandbox_dir": str(tmp / "sim")}},
        jobs={
            "keep_warm": "0s",
            "progress_interval": "0.1s",
            "preview_step_delay": "0.01s",
            "ssh_wait": "10s",
            "output_dir": str(tmp / "out"),
            "steps": 4,
            "width": 64,
            "height": 64,
            **jobs,
        },
        ssh={"connect_timeout": "2s"},
    )


@dataclass
class Faulty:
    """Wraps a real provider client: NoCapacity for chosen offers, and a hook after launch."""

    inner: Provider
    no_capacity: set[str] = field(default_factory=set)
    launched: list[str] = field(default_factory=list)
    after_launch: Callable[[str], Awaitable[None]] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def launch(self, offer: Offer, spec: LaunchSpec) -> Launched:
        if offer.offer_id in self.no_capacity:
            raise NoCapacity(f"offer {offer.offer_id} is gone", provider=self.inner.name)
        out = await self.inner.launch(offer, spec)
        self.launched.append(out.provider_id)
        if self.after_launch is not None:
            await self.after_launch(out.provider_id)
        return out


@dataclass
class Recording:
    """A connector that keeps every connection it made, so a test can drop them."""

    inner: Connector
    conns: list[RemoteConn] = field(default_factory=list)

    async def connect(self, inst: Instance) -> RemoteConn:
        conn = await self.inner.connect(inst)
        self.conns.append(conn)
        return conn


@dataclass
class JobEnv:
    tmp: Path
    app: App
    sim: SimCloud
    service: JobService
    tasks: list[asyncio.Task[None]]

    @property
    def store(self) -> Store:
        return self.app.store

    async def submit(self, prompt: str = "a lighthouse at dusk", **kw: Any) -> str:
        job = await api.submit(self.app, prompt=prompt, by="test", **kw)
        return str(job["id"])

    async def job(self, job_id: str) -> Job:
        return await self.store.get_job(job_id)

    async def wait_job(self, job_id: str, states: set[JobState], timeout: float = 20.0) -> Job:
        async def reached() -> bool:
            return (await self.job(job_id)).state in states

        await eventually(reached, timeout=timeout, what=f"job {job_id} to reach {sorted(states)}")
        return await self.job(job_id)

    def sandbox(self, provider_id: str) -> Path:
        inst = self.sim.instance(provider_id)
        assert inst is not None, provider_id
        return inst.sandbox


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@contextlib.asynccontextmanager
async def job_env(
    tmp: Path,
    *,
    settings: Settings | None = None,
    wrap: Callable[[dict[str, Provider]], dict[str, Provider]] | None = None,
    connector: Callable[[Connector], Connector] | None = None,
    start: bool = True,
) -> AsyncIterator[JobEnv]:
    async with sim_app(settings or job_settings(tmp), tmp, wrap=wrap) as base:
        env = JobEnv(tmp, base.app, base.sim, JobService(base.app), base.tasks)
        if start:
            await env_start(env, connector)
        yield env


async def env_start(env: JobEnv, connector: Callable[[Connector], Connector] | None) -> None:
    """Start the guard and the job service (recovering what the store holds)."""
    await env.service.start()
    if connector is not None:
        assert env.service.runner is not None
        env.service.runner.connector = connector(env.service.runner.connector)
    env.tasks.append(asyncio.create_task(Guard(env.app).run(), name="guard"))
    env.tasks.append(asyncio.create_task(env.service.run(), name="jobs"))


async def cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    """`gpuwarden ARGS` as a child process with `env`: (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gpuwarden",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return int(proc.returncode or 0), out.decode(), err.decode()
