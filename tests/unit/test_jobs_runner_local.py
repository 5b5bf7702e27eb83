"""The runner for real against a stand-in instance on this machine (remote_support.LocalConn):
the real txt2img.py (preview engine) and the real detached-job scripts, run the way a
Debian or Ubuntu image runs them: dash as the login shell and as `sh`, a welcome banner
printed before every command's output, and no Python on the SSH session's PATH. Real Store,
FakeClock (the runner's polls are stepped; the processes run in real time)."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from pathlib import Path

import pytest
from jobs_fakes import add_instance, add_job, drive, settings
from remote_support import LocalConnector, LocalShell, bare_path, kill_leftovers, wait_all_gone
from tests.conftest import MakeApp

from gpuwarden.core.clock import FakeClock
from gpuwarden.core.model import EntityKind, JobState
from gpuwarden.fleet.app import App
from gpuwarden.jobs.runner import Outcome, Runner
from gpuwarden.remote.ssh import PYTHON_CANDIDATES

BANNER = (
    "Welcome to Ubuntu 22.04.4 LTS (GNU/Linux x86_64)\n\n * Documentation: https://help.ubuntu.com"
)


@pytest.fixture
def instance_shell(tmp_path: Path) -> LocalShell:
    dash = shutil.which("dash")
    if dash is None:
        pytest.skip("dash is not installed here (apt-get install dash)")
    fixed = [p for p in PYTHON_CANDIDATES if "/" in p]
    if not any(Path(p).is_file() for p in fixed):
        pytest.skip(f"no Python at any of {', '.join(fixed)} on this machine")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sh").symlink_to(dash)
    home = tmp_path / "home"
    home.mkdir()
    return LocalShell(home, shell=str(bin_dir / "sh"), path=bare_path(bin_dir), banner=BANNER)


async def _app(tmp_path: Path, make_app: MakeApp, delay: str) -> tuple[App, FakeClock]:
    clock = FakeClock()
    conf = settings(tmp_path, preview_step_delay=delay, width=64, height=64)
    return await make_app(conf, clock), clock


@pytest.fixture
async def quick(tmp_path: Path, make_app: MakeApp) -> tuple[App, FakeClock]:
    return await _app(tmp_path, make_app, "0s")


async def test_a_job_runs_on_a_dash_instance_with_a_banner_and_python_off_the_path(
    quick: tuple[App, FakeClock], instance_shell: LocalShell
) -> None:
    app, clock = quick
    inst = await add_instance(app)
    job = await add_job(app, state=JobState.PROVISIONING, instance_id=inst.id)
    runner = Runner(app, LocalConnector(instance_shell), poll=1.0, reattach=60.0)
    outcome = await drive(clock, runner.execute(job, inst))
    done = await app.store.get_job(job.id)
    assert outcome is Outcome.SUCCEEDED, done.error
    [image] = done.outputs
    assert Path(image).read_bytes().startswith(b"\x89PNG")


async def test_a_cancel_on_a_dash_instance_ends_the_runner_itself(
    tmp_path: Path, make_app: MakeApp, instance_shell: LocalShell
) -> None:
    """Cancel midway: the runner's Python process is gone afterwards, not only its wrapper."""
    app, clock = await _app(
        tmp_path, make_app, "30s"
    )  # each step takes 30 s: it is running when cancelled
    job_id = f"j{uuid.uuid4().hex[:10]}"
    marker = f".gpuwarden/jobs/{job_id}/"
    try:
        inst = await add_instance(app)
        job = await add_job(app, job_id, state=JobState.PROVISIONING, instance_id=inst.id)
        runner = Runner(app, LocalConnector(instance_shell), poll=1.0, reattach=60.0)

        async def cancel_once_running() -> None:
            progress = instance_shell.home / marker / "progress.jsonl"
            while not (progress.is_file() and progress.read_bytes()):  # the runner has begun
                await asyncio.sleep(0.02)
            await app.store.record(EntityKind.JOB, job_id, "cancel_requested")

        async def run_and_cancel() -> Outcome:
            outcome, _ = await asyncio.gather(runner.execute(job, inst), cancel_once_running())
            return outcome

        outcome = await drive(clock, run_and_cancel())
        assert outcome is Outcome.CANCELLED
        await wait_all_gone(marker)
    finally:
        kill_leftovers(marker)
