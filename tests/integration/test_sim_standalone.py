"""A daemon on a standalone `gpuwarden sim` (providers.sim.base_url): it starts no sim of its
own, rents and runs a job on that one, and what it rented there outlives the daemon (the
sim's ledger survives the daemon's crashes and restarts)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
from sim_support import running_sim, urls
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
base_url = "{base}"

[jobs]
keep_warm = "10m"
progress_interval = "0.2s"
preview_step_delay = "0.02s"
width = 64
height = 64
"""


async def test_the_daemon_uses_the_standalone_sim_it_is_pointed_at(tmp_path: Path) -> None:
    async with running_sim(tmp_path / "standalone", boot_delay=0.2) as cloud:
        config = tmp_path / "config.toml"
        config.write_text(CONFIG.format(tmp=tmp_path, base=urls(cloud).admin))
        env = daemon_env(GPUWARDEN_SOCKET=str(tmp_path / "control.sock"))
        daemon = await DaemonProcess.start(config, env)
        try:
            await daemon.wait_for("daemon_ready", 30)
            assert daemon.named("sim_external")[0]["url"] == urls(cloud).admin
            assert not daemon.named("sim_started")  # it started no sim of its own
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "gpuwarden",
                "submit",
                "--prompt",
                "a fox",
                "--wait",
                env=env,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode == 0, err.decode()
            assert Path(out.decode().strip()).read_bytes().startswith(b"\x89PNG")
        finally:
            assert await daemon.stop(15) == 0
        # The instance it rented (kept warm) lives on in the standalone sim after the daemon.
        [inst] = cloud.core.instances.values()
        assert inst.label.startswith("gpuwarden-main-")
        assert inst.gone_at is None and inst.status == "running"
        assert not (tmp_path / "state" / "sim").exists()
