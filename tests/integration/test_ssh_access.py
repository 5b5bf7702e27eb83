"""Reaching an instance, on the sim cloud with real SSH: the first good probe pins the host
key the instance showed (extra.host_key, an `ssh_ready` event, <state_dir>/known_hosts) and
puts the operators' keys (ssh.authorized_keys) on it, so an operator's own key logs in with
strict host-key checking against the daemon's file; a different host key later is a strike,
not a new truth."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import asyncssh
import pytest
from sim_support import new_key
from test_watchdog_sim import rig_for, sim_settings
from tests.conftest import eventually

from gpuwarden.loops.watchdog import Watchdog
from gpuwarden.remote import hostkeys

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("provider", ["sim-lambda", "sim-vast"])
async def test_an_operators_key_logs_in_against_the_pinned_host_key(
    tmp_path: Path, provider: str
) -> None:
    operator, operator_pub = new_key()
    settings = sim_settings(tmp_path)
    settings = settings.model_copy(
        update={"ssh": settings.ssh.model_copy(update={"authorized_keys": [operator_pub]})}
    )
    async with rig_for(settings, tmp_path) as rig:
        inst = await rig.launch(provider)
        rig.start(Watchdog(rig.app))

        async def ready() -> bool:
            return "host_key" in (await rig.get(inst.id)).extra

        await eventually(ready, timeout=15, what="the first probe to pin the host key")
        got = await rig.get(inst.id)
        sim_key = hostkeys.key_material(rig.sim.core.host_key.export_public_key().decode())
        assert got.extra["host_key"] == sim_key
        assert got.extra["keys"] == hostkeys.keys_digest([operator_pub])
        assert "ssh_ready" in await rig.event_names(inst.id)
        known = hostkeys.known_hosts_path(settings)
        line = f"[{got.ssh_host}]:{got.ssh_port} {sim_key}"
        assert line in known.read_text().splitlines()
        assert known.stat().st_mode & 0o777 == 0o644

        # The operator's key (not the daemon's), checked strictly against the daemon's file.
        async with asyncssh.connect(
            got.ssh_host or "",
            got.ssh_port or 0,
            username=got.ssh_user,
            client_keys=[operator],
            known_hosts=str(known),
        ) as conn:
            res = await conn.run("echo in", check=True)
            assert str(res.stdout).strip() == "in"
        # A stranger's key is still refused: the keys are added, not opened up.
        stranger, _ = new_key()
        with pytest.raises(asyncssh.PermissionDenied):
            await asyncssh.connect(
                got.ssh_host or "",
                got.ssh_port or 0,
                username=got.ssh_user,
                client_keys=[stranger],
                known_hosts=str(known),
            )


async def test_a_changed_host_key_is_a_strike(tmp_path: Path) -> None:
    async with rig_for(sim_settings(tmp_path), tmp_path) as rig:
        inst = await rig.launch()
        _, other = new_key()  # what the daemon "saw" first; the sim shows its own key
        await rig.app.store.update_instance(
            inst.id, extra={**inst.extra, "host_key": hostkeys.key_material(other)}
        )
        task = asyncio.create_task(Watchdog(rig.app).run())
        try:

            async def struck() -> bool:
                return (await rig.get(inst.id)).strikes >= 1

            await eventually(struck, timeout=15, what="a strike for the wrong host key")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        got = await rig.get(inst.id)
        assert got.extra["host_key"] == hostkeys.key_material(other)  # not replaced
        assert got.last_probe_ok is False
        strike = next(
            e for e in await rig.app.store.events(entity_id=inst.id) if e.name == "strike"
        )
        assert "host key" in strike.details["message"].lower()
        assert "ssh_ready" not in await rig.event_names(inst.id)
