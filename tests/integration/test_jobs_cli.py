"""The job commands against a real daemon (`gpuwarden run` with the in-process sim cloud):
submit --wait prints the image path, jobs/job/cancel/pause/resume answer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from jobs_support import cli
from tests.conftest import daemon_env

from gpuwarden.system.childproc import DaemonProcess

pytestmark = pytest.mark.slow

CONFIG = """
[daemon]
state_dir = "{tmp}/state"
socket = "{tmp}/control.sock"
shutdown_timeout = "3s"

[providers.sim]
enabled = true
boot_delay = "0.2s"

[jobs]
keep_warm = "0s"
progress_interval = "0.2s"
preview_step_delay = "0.02s"
width = 64
height = 64
"""


async def test_submit_wait_and_the_other_job_commands(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(CONFIG.format(tmp=tmp_path))
    env = daemon_env(GPUWARDEN_SOCKET=str(tmp_path / "control.sock"))
    daemon = await DaemonProcess.start(config, env)
    try:
        await daemon.wait_for("daemon_ready", 30)
        code, out, err = await cli(env, "submit", "--prompt", "$(touch pwned)", "--wait")
        assert code == 0, err
        [path] = out.split()
        assert Path(path).is_file() and Path(path).name == "image-0.png"
        assert "done" in err  # the phases went to stderr
        job_id = Path(path).parent.name

        code, out, _ = await cli(env, "job", job_id, "--json")
        job = json.loads(out)
        assert (code, job["state"], job["spec"]["prompt"]) == (0, "succeeded", "$(touch pwned)")
        code, out, _ = await cli(env, "jobs", "--state", "succeeded", "--json")
        assert [j["id"] for j in json.loads(out)] == [job_id]

        assert (await cli(env, "pause"))[1].strip() == "queue paused"
        code, out, _ = await cli(env, "submit", "--prompt", "later")
        queued = out.strip()
        assert code == 0 and queued.startswith("j")
        code, out, _ = await cli(env, "cancel", queued)
        assert (code, out.strip()) == (0, f"{queued} cancelled")
        code, _, err = await cli(env, "cancel", queued)
        assert code == 1 and "already cancelled" in err
        assert (await cli(env, "resume"))[1].strip() == "queue resumed"
        code, _, err = await cli(env, "submit", "--prompt", "x", "--width", "100")
        assert code != 0
    finally:
        await daemon.stop(15)
    assert list(tmp_path.rglob("pwned")) == []
