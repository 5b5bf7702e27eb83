"""Jobs end to end on the sim cloud with `providers.sim.ssh = "openssh"`: each simulated
instance is a real sshd (its own port, logging in as root with the sandbox as HOME), so the
daemon's whole job path (launch, wait for SSH, upload, detached start, progress, download and
checksum, cancel, the after-job end) meets real OpenSSH. Needs openssh-server and root (CI
has both); skipped with the reason elsewhere, failed in CI."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from jobs_support import job_env, job_settings, sha256
from tests.conftest import eventually, processes_with, unavailable

from gpuwarden.config.settings import Settings
from gpuwarden.control import jobs as api
from gpuwarden.core.model import InstanceState, JobState, TerminationReason
from gpuwarden.sim.openssh import OpensshHost, unavailable_reason

pytestmark = pytest.mark.slow

DONE = {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}


@pytest.fixture(autouse=True)
def _needs_sshd() -> None:
    if (reason := unavailable_reason()) is not None:
        unavailable(reason)


def _openssh(tmp: Path, **jobs: str) -> Settings:
    base = job_settings(tmp, **jobs)
    sim = base.providers.sim.model_copy(update={"ssh": "openssh"})
    return base.model_copy(update={"providers": base.providers.model_copy(update={"sim": sim})})


async def test_a_job_runs_on_a_real_sshd_instance_to_its_checked_image(tmp_path: Path) -> None:
    settings = _openssh(tmp_path)
    async with job_env(tmp_path, settings=settings) as env:
        job_id = await env.submit("a lighthouse on real sshd", seed=7, steps=3)
        job = await env.wait_job(job_id, DONE, timeout=60)
        assert job.state is JobState.SUCCEEDED, job.error
        inst = await env.store.get_instance(job.instance_id or "")
        sim_inst = env.sim.instance(inst.provider_id or "")
        assert sim_inst is not None and isinstance(sim_inst.ssh, OpensshHost)
        # It ran in the instance's sandbox (sshd's HOME for the login), and what arrived is
        # what was made there.
        made = sorted((sim_inst.sandbox / ".gpuwarden" / "jobs" / job_id).rglob("*.png"))
        [image] = job.outputs
        assert [sha256(p) for p in made] == [sha256(Path(image))]
        result = json.loads((tmp_path / "out" / job_id / "result.json").read_text())
        assert result["files"][0]["sha256"] == sha256(Path(image))
        # sshd logged the job's logins as root, by key.
        sshd_log = (sim_inst.sandbox / ".gpuwarden-sim" / "sshd" / "sshd.log").read_text()
        assert "Accepted publickey for root" in sshd_log

        async def ended() -> bool:
            return (await env.store.get_instance(inst.id)).state is InstanceState.TERMINATED

        await eventually(ended, timeout=20, what="the instance to end after the job")
        assert (await env.store.get_instance(inst.id)).reason is TerminationReason.JOB_DONE
        assert not sim_inst.ssh.listening


async def test_a_cancel_on_a_real_sshd_instance_leaves_nothing_of_the_job_alive(
    tmp_path: Path,
) -> None:
    # A warm window: the instance outlives the cancel, so that nothing but the cancel can
    # end the job's processes (ending an instance kills everything on it).
    settings = _openssh(tmp_path, preview_step_delay="0.5s", keep_warm="5m")
    prompt = f"stop me {uuid.uuid4().hex}"
    async with job_env(tmp_path, settings=settings) as env:
        job_id = await env.submit(prompt, steps=400)

        async def running() -> bool:
            return (await env.job(job_id)).progress_step >= 1

        await eventually(running, timeout=60, what="the job to make progress")
        marker = f".gpuwarden/jobs/{job_id}/"
        assert processes_with(marker), "the job's processes should be alive before the cancel"
        out = await api.cancel(env.app, job_id, by="test")
        assert out["cancel_requested"] is True
        job = await env.wait_job(job_id, DONE, timeout=30)
        assert job.state is JobState.CANCELLED
        assert not (tmp_path / "out" / job_id / "image-0.png").exists()

        async def all_gone() -> bool:
            return not processes_with(marker)

        # The process tree, not the wrapper's pid: nothing of the job is left running.
        await eventually(all_gone, timeout=10, what="every process of the job to end")
        inst = await env.store.get_instance(job.instance_id or "")
        assert inst.state is InstanceState.RUNNING  # still warm: the cancel did it
