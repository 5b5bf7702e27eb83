"""The daemon SIGKILLed in the middle of a job and started again (a real `gpuwarden run`
subprocess): the job finishes once, one image lands, and nothing is rented twice.

The sim cloud runs here in the test process (not inside the daemon, which the SIGKILL would
take with it), and the daemon reaches it through its real Vast client at the sim's URL."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import daemon_env, eventually

from gpuwarden.cli.client import ControlClient
from gpuwarden.config.settings import Settings
from gpuwarden.core.clock import SystemClock
from gpuwarden.core.model import EntityKind
from gpuwarden.sim.server import SimCloud
from gpuwarden.store import Store
from gpuwarden.system.childproc import DaemonProcess

pytestmark = pytest.mark.slow

TERMINAL = ("succeeded", "failed", "cancelled")

CONFIG = """
[daemon]
state_dir = "{tmp}/state"
socket = "{tmp}/control.sock"
shutdown_timeout = "3s"

[providers.vast]
enabled = true
base_url = "{vast}"
api_key = "sim-key"

[jobs]
engine = "preview"
keep_warm = "0s"
progress_interval = "0.2s"
preview_step_delay = "0.1s"
width = 64
height = 64
ssh_wait = "20s"
"""


@pytest.fixture
async def sim(tmp_path: Path) -> AsyncIterator[SimCloud]:
    settings = Settings(providers={"sim": {"enabled": True, "boot_delay": "0.2s"}})
    cloud = SimCloud(settings.providers.sim, SystemClock(), sandbox_root=tmp_path / "sim")
    await cloud.start()
    try:
        yield cloud
    finally:
        await cloud.stop()


async def job_state(sock: Path, job_id: str) -> dict[str, Any]:
    async with ControlClient(sock, timeout=10) as client:
        job: dict[str, Any] = await client.call("jobs.get", {"id": job_id})
        return job


async def wait_job(sock: Path, job_id: str, pred: Any, timeout: float, what: str) -> dict[str, Any]:
    async def reached() -> dict[str, Any] | None:
        job = await job_state(sock, job_id)
        return job if pred(job) else None

    job: dict[str, Any] = await eventually(reached, timeout=timeout, interval=0.1, what=what)
    return job


async def test_sigkill_mid_job_then_restart_finishes_it_once(tmp_path: Path, sim: SimCloud) -> None:
    assert sim.urls is not None
    config = tmp_path / "config.toml"
    config.write_text(CONFIG.format(tmp=tmp_path, vast=sim.urls.vast))
    sock = tmp_path / "control.sock"
    env = daemon_env()

    first = await DaemonProcess.start(config, env)
    try:
        await first.wait_for("daemon_ready", 30)
        async with ControlClient(sock, timeout=10) as client:
            job = await client.call("jobs.submit", {"prompt": "survive me", "steps": 40})
        job_id = str(job["id"])
        await wait_job(sock, job_id, lambda j: j["progress"]["step"] >= 5, 30, "progress")
    finally:
        first.kill()  # SIGKILL: no shutdown, no cleanup
        await first.wait(10)

    second = await DaemonProcess.start(config, env)
    try:
        await second.wait_for("daemon_ready", 30)
        done = await wait_job(
            sock, job_id, lambda j: j["state"] in ("succeeded", "failed", "cancelled"), 60, "end"
        )
    finally:
        await second.stop(15)

    assert done["state"] == "succeeded", done["error"]
    assert done["attempt"] == 0  # continued, not retried
    out = tmp_path / "state" / "outputs" / job_id
    assert sorted(p.name for p in out.iterdir()) == ["image-0.png", "result.json"]
    ledger = sim.ledger()
    assert len(ledger["instances"]) == 1  # no second rental
    [entry] = ledger["instances"]
    box = sim.instance(entry["instance_id"])
    assert box is not None
    progress = (box.sandbox / ".gpuwarden" / "jobs" / job_id / "progress.jsonl").read_text()
    assert [json.loads(ln)["event"] for ln in progress.splitlines()].count("start") == 1
    # One terminal state in the event log, across both daemons.
    store = await Store.open(tmp_path / "state" / "gpuwarden.db", SystemClock())
    try:
        events = await store.events(kind=EntityKind.JOB, entity_id=job_id)
    finally:
        await store.close()
    ends = [e.to_state for e in events if e.name == "state" and e.to_state in TERMINAL]
    assert ends == ["succeeded"]
