"""A job detached on a sim instance holds none of its SSH session's pipes, also when the sim
runs under uvloop (as inside the daemon), whose children inherit extra copies of their pipe
ends: sshd gives a command only stdin, stdout and stderr, so a detached `setsid ... &` with
its output redirected lets the command (and its channel) end at once."""

from __future__ import annotations

import asyncio
import os
import signal
from datetime import UTC, datetime
from pathlib import Path

import asyncssh
import pytest
import uvloop
from sim_support import new_key

from gpuwarden.sim.sshhost import SshHost, base_env

pytestmark = pytest.mark.slow


async def _detached_fds(sandbox: Path) -> list[str]:
    """Start a detached sleep over SSH; what its descriptors point at (it is killed after)."""
    key, pub = new_key()
    host = SshHost(
        instance_id="detach-test",
        sandbox=sandbox,
        env=base_env(sandbox, {}),
        host_key=asyncssh.generate_private_key("ssh-ed25519"),
        authorized=lambda: [pub],
        now=lambda: datetime.now(UTC),
    )
    port = await host.start()
    pid = 0
    try:
        async with asyncssh.connect(
            "127.0.0.1", port, username="root", client_keys=[key], known_hosts=None
        ) as conn:
            # (The sleep never runs out in a test: it is killed below.)
            cmd = "setsid sleep 300 </dev/null >/dev/null 2>&1 &\necho $!"
            got = await asyncio.wait_for(conn.run(cmd, check=True), 30)
        pid = int(str(got.stdout).strip())
        fd_dir = Path(f"/proc/{pid}/fd")
        return sorted(f"{fd.name} -> {os.readlink(fd)}" for fd in fd_dir.iterdir())
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
        await host.stop()


def test_a_detached_job_holds_no_pipe_of_the_session_under_uvloop(tmp_path: Path) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        fds = runner.run(_detached_fds(tmp_path / "sandbox"))
    assert fds == ["0 -> /dev/null", "1 -> /dev/null", "2 -> /dev/null"], fds
