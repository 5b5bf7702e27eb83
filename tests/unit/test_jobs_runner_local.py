"""The runner for real against a stand-in instance on this machine (remote_support.LocalConn):
the real txt2img.py (preview engine) and the real detached-job scripts, run the way a
Debian or Ubuntu image runs them: dash as the login shell and as `sh`, a welcome banner
printed before every command's output, and no Python on the SSH session's PATH. Real Store,
FakeClock (the runner's polls are stepped; the processes run in real time)."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest
from jobs_fakes import add_instance, add_job, cancel_midway, drive, settings
from remote_support import (
    LocalConn,
    LocalConnector,
    LocalShell,
    bare_path,
    kill_leftovers,
    wait_all_gone,
)
from tests.conftest import MakeApp, unavailable

from gpuwarden.core.clock import FakeClock
from gpuwarden.core.model import JobState
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
        unavailable("dash is not installed here (apt-get install dash)")
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
        outcome = await cancel_midway(clock, runner, job, inst, instance_shell.home)
        assert outcome is Outcome.CANCELLED
        await wait_all_gone(marker)
    finally:
        kill_leftovers(marker)


async def test_a_wait_that_outlives_its_bound_is_a_pause_not_a_dropped_connection(
    instance_shell: LocalShell,
) -> None:
    """An instance so slow that the wait's checks outlast the command's timeout: False (look
    at the status as before), never the timeout the runner counts as a dropped connection."""
    real_sleep = shutil.which("sleep")
    assert real_sleep is not None and instance_shell.path is not None
    slow = Path(instance_shell.path) / "sleep"  # every check takes a second, not a tenth
    slow.unlink()
    slow.write_text(f"#!/bin/sh\nexec {real_sleep} 1\n")
    slow.chmod(0o755)
    job = instance_shell.home / ".gpuwarden/jobs/slow"
    job.mkdir(parents=True)
    (job / "pid").write_text(f"{os.getpid()}\n")  # a live process, no exit file: running
    conn = LocalConn(instance_shell)
    conn.timeout = 0.6
    assert not await conn.wait_end(".gpuwarden/jobs/slow", 5.0)
