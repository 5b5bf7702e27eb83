"""The dead-man switch against a real daemon that dies: `gpuwarden run` as a subprocess,
renting from a sim cloud that runs in this test (so the cloud outlives the daemon), is
SIGKILLed after its watchdog has probed the instance; the switch on the instance then ends it
through the Vast API with the instance's own key, and the sim's ledger says so. A new daemon
on the same state dir then finds the instance gone and records the reason `deadman` (not
`vanished`): it had been silent for longer than the switch's timeout."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sqlite3
import sys
import tempfile
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sim_support import until

from gpuwarden.cli.client import ControlClient
from gpuwarden.cli.commands_views import status_rows
from gpuwarden.config.settings import SimSettings
from gpuwarden.core.clock import parse_ts
from gpuwarden.sim.server import SimCloud

pytestmark = pytest.mark.slow

DEADMAN_TIMEOUT = 3.0
SECOND = timedelta(seconds=1)


@pytest.fixture
async def sim(tmp_path: Path) -> AsyncIterator[SimCloud]:
    cloud = SimCloud(
        SimSettings(boot_delay="0.2s", api_key="sim-key"),  # type: ignore[arg-type,unused-ignore]
        sandbox_root=tmp_path / "sim",
    )
    await cloud.start()
    try:
        yield cloud
    finally:
        await cloud.stop()


async def test_sigkilled_daemon_leaves_the_switch_to_end_the_instance(
    tmp_path: Path, sim: SimCloud
) -> None:
    assert sim.urls is not None
    short = Path(tempfile.mkdtemp(prefix="gwk-", dir="/tmp"))  # AF_UNIX paths are short
    sock = short / "control.sock"
    config = tmp_path / "config.toml"
    config.write_text(
        f"""
[daemon]
state_dir = "{tmp_path / "state"}"
socket = "{sock}"

[policy]
watchdog_interval = "1s"
probe_timeout = "3s"
poll_interval = "1s"
deadman_timeout = "{DEADMAN_TIMEOUT:g}s"
vanish_grace = "1s"
# After the restart the dead instance fails its probes; the reconciler, not the
# watchdog, must be the one to find it gone.
watchdog_failures = 20

[providers.vast]
enabled = true
base_url = "{sim.urls.vast}"
api_key = "sim-key"

[ssh]
connect_timeout = "2s"
"""
    )
    env = {**os.environ, "GPUWARDEN_CONFIG": str(config), "GPUWARDEN_SOCKET": str(sock)}
    env.pop("NOTIFY_SOCKET", None)

    async def start_daemon() -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gpuwarden",
            "run",
            "--config",
            str(config),
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )

        async def listening() -> bool:
            assert proc.returncode is None, "the daemon exited"
            return sock.exists()

        await until(listening, 30, "the daemon's control socket")
        return proc

    daemon = await start_daemon()
    try:
        # One launch call over the socket (the CLI's confirm step would search twice, and
        # the Vast client paces searches 6 s apart).
        async with ControlClient(sock, timeout=30) as client:
            launched = await client.call("launch", {"gpu": "4090", "provider": "vast"})
        iid = str(launched.get("id") or launched.get("instance", {}).get("id"))

        async def probed() -> bool:
            async with ControlClient(sock, timeout=10) as client:
                rows = status_rows(await client.call("status"))
            mine = [r for r in rows if r.get("id") == iid]
            return bool(mine) and mine[0].get("last_probe_ok") is True

        await until(probed, 20, "the daemon's watchdog to probe the instance")
        rows = [r for r in sim.ledger()["instances"] if r["ended_by"] is None]
        assert len(rows) == 1
        provider_id = rows[0]["instance_id"]
        box = sim.instance(provider_id)
        assert box is not None
        log = box.sandbox / ".gpuwarden" / "deadman.log"

        # While the daemon probes, the heartbeat stays fresh: the instance outlives the
        # timeout it would not have survived unprobed.
        booted = rows[0]["launched_at"]
        assert isinstance(booted, str)

        async def past_timeout() -> bool:
            age = (sim.clock.now() - datetime.fromisoformat(booted)).total_seconds()
            return age > DEADMAN_TIMEOUT + 2.5

        await until(past_timeout, 10, "the dead-man timeout to pass")
        assert sim.core.ledger.get("vast", provider_id).ended_at is None  # type: ignore[union-attr]
        assert "watching" in log.read_text()

        daemon.send_signal(signal.SIGKILL)  # no shutdown, no destroy: the host "died"
        await asyncio.wait_for(daemon.wait(), 10)
        killed_at = sim.clock.now()

        async def ended() -> bool:
            entry = sim.core.ledger.get("vast", provider_id)
            return entry is not None and entry.ended_at is not None

        await until(ended, 4 * DEADMAN_TIMEOUT + 5, "the dead-man switch to end the instance")
        entry = sim.core.ledger.get("vast", provider_id)
        assert entry is not None and entry.ended_at is not None
        assert entry.ended_by == "api:instance_key"  # the container's own key
        # Not before the heartbeat the last probe left went stale.
        assert (entry.ended_at - killed_at).total_seconds() >= DEADMAN_TIMEOUT - 1.5
        assert "ending instance: no heartbeat" in log.read_text()

        # A new daemon on the same state dir finds the instance gone. It was silent (no good
        # probe) for longer than the switch's timeout before that: the reason is deadman.
        db_uri = f"file:{tmp_path / 'state' / 'gpuwarden.db'}?mode=ro"
        with contextlib.closing(sqlite3.connect(db_uri, uri=True)) as db:
            query = "SELECT last_probe_at, last_probe_ok FROM instances WHERE id = ?"
            probed_at, probed_ok = db.execute(query, (iid,)).fetchone()
        assert probed_ok  # the switch was fed until the kill
        last_probe = parse_ts(probed_at)
        assert last_probe is not None

        async def silent_long_enough() -> bool:  # the switch rounds to whole seconds
            return sim.clock.now() >= last_probe + DEADMAN_TIMEOUT * SECOND + SECOND / 2

        await until(silent_long_enough, 5, "the dead-man timeout since the last probe")
        sock.unlink(missing_ok=True)  # the killed daemon left it; wait for the new one's
        daemon = await start_daemon()

        async def recorded() -> list[dict[str, object]]:
            cli = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "gpuwarden",
                "history",
                "--json",
                "--socket",
                str(sock),
                env=env,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
            )
            out, _ = await asyncio.wait_for(cli.communicate(), 30)
            assert cli.returncode == 0
            return [t for t in json.loads(out) if t["instance_id"] == iid]

        async def terminated() -> bool:
            return bool(await recorded())

        await until(terminated, 30, "the restarted daemon to record the termination", 0.5)
        [record] = await recorded()
        assert record["reason"] == "deadman"
        assert record["provider_id"] == provider_id
    finally:
        if daemon.returncode is None:
            daemon.send_signal(signal.SIGKILL)
            await daemon.wait()
        shutil.rmtree(short, ignore_errors=True)
