"""Two daemons with their own state dirs on one cloud account (issue 17, item 5): neither
sets daemon.installation, so each state dir labels its instances with its own generated
label, and neither takes the other's running instances for orphans."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sim_support import running_sim, urls
from tests.conftest import daemon_env, eventually

from gpuwarden.cli.client import ControlClient
from gpuwarden.sim import SimCloud
from gpuwarden.system.childproc import DaemonProcess

pytestmark = pytest.mark.slow


@pytest.fixture
async def sim(tmp_path: Path) -> AsyncIterator[SimCloud]:
    async with running_sim(tmp_path) as cloud:
        yield cloud


async def start(home: Path, base_url: str) -> tuple[DaemonProcess, Path]:
    sock = home / "c.sock"
    config = home / "config.toml"
    config.write_text(
        f'[daemon]\nstate_dir = "{home / "state"}"\nsocket = "{sock}"\n'
        'shutdown_timeout = "5s"\n'
        '[policy]\npoll_interval = "1s"\nvanish_grace = "1s"\n'
        f'[providers.sim]\nenabled = true\nbase_url = "{base_url}"\n'
    )
    daemon = await DaemonProcess.start(config, daemon_env(GPUWARDEN_SOCKET=str(sock)))
    await daemon.wait_for("daemon_ready", 30)
    return daemon, sock


async def launch(sock: Path) -> str:
    async with ControlClient(sock, timeout=30) as client:
        got: dict[str, Any] = await client.call("launch", {"provider": "sim-vast"})
    return str(got.get("id") or got.get("instance", {}).get("id"))


async def live_labels(sock: Path) -> set[str]:
    async with ControlClient(sock, timeout=10) as client:
        rows = (await client.call("status"))["instances"]
    return {r["label"] for r in rows if r["state"] in ("provisioning", "running")}


async def test_a_second_daemon_leaves_the_first_ones_instances_alone(
    sim: SimCloud, short_dir: Path
) -> None:
    (short_dir / "a").mkdir()
    (short_dir / "b").mkdir()
    first, sock_a = await start(short_dir / "a", urls(sim).admin)
    try:
        mine = await launch(sock_a)
        second, sock_b = await start(short_dir / "b", urls(sim).admin)
        try:
            theirs = await launch(sock_b)
            label_a = first.named("installation_label")[0]["installation"]
            label_b = second.named("installation_label")[0]["installation"]
            assert label_a != label_b
            assert re.fullmatch(r"[0-9a-f]{8}", label_b)

            # The second's reconciler has run passes over the account since (it moved its
            # own instance to running), and the first's instance lives on in both views.
            async def b_running() -> bool:
                return f"gpuwarden-{label_b}-{theirs}" in await live_labels(sock_b)

            await eventually(b_running, timeout=20, what="the second daemon's instance running")

            async def a_running() -> bool:
                return f"gpuwarden-{label_a}-{mine}" in await live_labels(sock_a)

            await eventually(a_running, timeout=20, what="the first daemon's instance running")
            assert not second.named("orphan_found") and not first.named("orphan_found")
            assert all(e.ended_at is None for e in sim.core.ledger.entries())
            assert {e.label for e in sim.core.ledger.entries()} == {
                f"gpuwarden-{label_a}-{mine}",
                f"gpuwarden-{label_b}-{theirs}",
            }
        finally:
            assert await second.stop(timeout=10) == 0
        # A restart of the first keeps its label: its instance is still its own.
        assert await first.stop(timeout=10) == 0
        first, sock_a = await start(short_dir / "a", urls(sim).admin)
        assert first.named("installation_label") == []  # read back, not generated again
        assert f"gpuwarden-{label_a}-{mine}" in await live_labels(sock_a)
        assert all(e.ended_at is None for e in sim.core.ledger.entries())
    finally:
        if first.running:
            assert await first.stop(timeout=10) == 0
        first.kill()
