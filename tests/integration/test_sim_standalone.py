"""A daemon on a standalone `gpuwarden sim` (providers.sim.base_url): it starts no sim of its
own, rents and runs a job on that one, and what it rented there outlives the daemon (the
sim's ledger survives the daemon's crashes and restarts)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from jobs_support import cli
from sim_support import running_sim, urls
from tests.conftest import daemon_env

from gpuwarden.system.childproc import DaemonProcess

pytestmark = pytest.mark.slow

CONFIG = '[providers.sim]\nenabled = true\nbase_url = "{base}"\n'
# Quick, small jobs; the instance is kept warm, to be found in the sim after the daemon.
JOBS = {
    f"GPUWARDEN_JOBS__{key.upper()}": value
    for key, value in (
        ("keep_warm", "10m"),
        ("progress_interval", "0.2s"),
        ("preview_step_delay", "0.02s"),
        ("width", "64"),
        ("height", "64"),
    )
}


async def test_the_daemon_uses_the_standalone_sim_it_is_pointed_at(tmp_path: Path) -> None:
    async with running_sim(tmp_path / "standalone", boot_delay=0.2) as cloud:
        config = tmp_path / "config.toml"
        config.write_text(CONFIG.format(base=urls(cloud).admin))
        socket = str(tmp_path / "control.sock")
        env = daemon_env(
            GPUWARDEN_DAEMON__STATE_DIR=str(tmp_path / "state"),
            GPUWARDEN_DAEMON__SOCKET=socket,
            GPUWARDEN_DAEMON__SHUTDOWN_TIMEOUT="3s",
            GPUWARDEN_SOCKET=socket,
            **JOBS,
        )
        daemon = await DaemonProcess.start(config, env)
        try:
            await daemon.wait_for("daemon_ready", 30)
            assert daemon.named("sim_external")[0]["url"] == urls(cloud).admin
            assert not daemon.named("sim_started")  # it started no sim of its own
            code, out, err = await cli(env, "submit", "--prompt", "a fox", "--wait")
            assert code == 0, err
            assert Path(out.strip()).read_bytes().startswith(b"\x89PNG")
        finally:
            assert await daemon.stop(15) == 0
        # The instance it rented (kept warm) lives on in the standalone sim after the daemon.
        [inst] = cloud.core.instances.values()
        # Labelled with the installation generated for this state dir (issue 17, item 5).
        [made] = daemon.named("installation_label")
        assert inst.label.startswith(f"gpuwarden-{made['installation']}-")
        assert re.fullmatch(r"[0-9a-f]{8}", made["installation"])
        assert inst.gone_at is None and inst.status == "running"
        assert not (tmp_path / "state" / "sim").exists()
