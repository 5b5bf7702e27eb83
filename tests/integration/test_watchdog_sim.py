"""Both kill paths on the sim cloud, with the real provider clients and real SSH.

- Daemon side: the watchdog probes over SSH; an instance whose SSH server dies is destroyed
  after exactly two failed probes, with reason watchdog; a pass between two fails resets the
  count; a user's open SSH session counts as activity and keeps the idle rule off.
- Instance side: the dead-man switch (installed by the launcher's start-up script) ends a
  Lambda instance through the API when the operator opted in (the Vast case, against a
  SIGKILLed daemon, is in test_watchdog_daemon_kill.py).

Short timeouts: probes every second, boot 0.2 s, dead-man timeout 3 s."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from sim_support import admin, ledger_row, sim_app
from tests.conftest import eventually

from gpuwarden.config.settings import Settings
from gpuwarden.core.model import EntityKind, Instance, InstanceState, TerminationReason
from gpuwarden.fleet import launcher
from gpuwarden.fleet.app import App
from gpuwarden.loops.guard import Guard
from gpuwarden.loops.watchdog import ProbeResult, SshProber, Watchdog
from gpuwarden.providers.base import ProviderState, Requirements
from gpuwarden.sim.server import SimCloud

pytestmark = pytest.mark.slow


def sim_settings(tmp: Path, api_key: str | None = "sim-key", **policy: Any) -> Settings:
    sim: dict[str, Any] = {"enabled": True, "boot_delay": "0.2s", "sandbox_dir": str(tmp / "sim")}
    if api_key is not None:
        sim["api_key"] = api_key
    return Settings(
        daemon={"state_dir": str(tmp / "state"), "socket": str(tmp / "control.sock")},
        policy={"watchdog_interval": "1s", "probe_timeout": "3s", **policy},
        providers={"sim": sim},
        ssh={"connect_timeout": "2s"},
    )


@dataclass
class Rig:
    app: App
    sim: SimCloud
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self, *services: Any) -> None:
        for s in services:
            self.tasks.append(asyncio.create_task(s.run(), name=s.name))

    async def stop(self, task: asyncio.Task[None]) -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def launch(self, provider: str = "sim-vast") -> Instance:
        """Rent through the launcher (so the dead-man switch goes in), wait for SSH, and mark
        the instance RUNNING with its endpoint, as the reconciler would."""
        client = self.app.providers[provider]
        offers = await client.search_offers(Requirements(min_reliability=0.0, verified=False))
        inst = await launcher.launch(self.app, offers[0], hours=1)
        assert inst.provider_id is not None

        async def reachable() -> bool:
            seen = await client.get(inst.provider_id or "")
            return bool(seen and seen.state is ProviderState.RUNNING and seen.ssh_port)

        await eventually(reachable, timeout=10, what="the instance to boot")
        seen = await client.get(inst.provider_id)
        assert seen is not None
        return await self.app.store.transition_instance(
            inst.id,
            InstanceState.RUNNING,
            ssh_host=seen.ssh_host,
            ssh_port=seen.ssh_port,
            ssh_user=seen.ssh_user,
        )

    async def get(self, iid: str) -> Instance:
        return await self.app.store.get_instance(iid)

    async def event_names(self, iid: str) -> list[str]:
        evs = await self.app.store.events(kind=EntityKind.INSTANCE, entity_id=iid)
        return [e.name for e in evs if e.name != "state"]

    def ledger_row(self, provider_id: str) -> dict[str, Any]:
        return ledger_row(self.sim, provider_id)

    async def admin(self, path: str) -> None:
        await admin(self.sim, "POST", path)


@contextlib.asynccontextmanager
async def rig_for(settings: Settings, tmp: Path) -> AsyncIterator[Rig]:
    async with sim_app(settings, tmp) as base:
        yield Rig(base.app, base.sim, base.tasks)


async def test_dead_ssh_is_destroyed_after_exactly_two_failed_probes(tmp_path: Path) -> None:
    async with rig_for(sim_settings(tmp_path), tmp_path) as rig:
        inst = await rig.launch()
        rig.start(Watchdog(rig.app), Guard(rig.app))

        async def probed_ok() -> bool:
            return (await rig.get(inst.id)).last_probe_ok is True

        await eventually(probed_ok, timeout=10, what="a first good probe")
        await rig.admin(f"/_sim/instances/{inst.provider_id}/kill-ssh")

        async def ended() -> bool:
            return (await rig.get(inst.id)).state is InstanceState.TERMINATED

        await eventually(ended, timeout=15, what="the watchdog to end the instance")
        done = await rig.get(inst.id)
        assert done.reason is TerminationReason.WATCHDOG
        assert done.strikes == 2
        names = await rig.event_names(inst.id)
        assert names.count("strike") == 2
        assert "probe_recovered" not in names
        strikes = [e for e in await rig.app.store.events(entity_id=inst.id) if e.name == "strike"]
        assert [e.details["strike"] for e in strikes] == [1, 2]
        assert all(e.details["error"] in ("refused", "timeout", "error") for e in strikes)
        row = rig.ledger_row(inst.provider_id or "")
        assert row["ended_by"] == "api:account"  # the daemon's destroy, not the switch
        terms = await rig.app.store.terminations(inst.created_at)
        assert [(t.instance_id, t.reason) for t in terms] == [(inst.id, TerminationReason.WATCHDOG)]


class FlakyProber:
    """The real SSH prober, but chosen probes (1-based) go to a closed loopback port: a real
    refused connection."""

    def __init__(self, inner: SshProber, fail: set[int]) -> None:
        self.inner = inner
        self.fail = fail
        self.calls = 0

    async def probe(self, inst: Instance, timeout: float) -> ProbeResult:
        self.calls += 1
        if self.calls in self.fail:
            inst = dataclasses.replace(inst, ssh_port=closed_port())
        return await self.inner.probe(inst, timeout)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_fail_pass_fail_does_not_kill(tmp_path: Path) -> None:
    async with rig_for(sim_settings(tmp_path), tmp_path) as rig:
        inst = await rig.launch()
        wd = Watchdog(rig.app)
        assert isinstance(wd.prober, SshProber)
        flaky = FlakyProber(wd.prober, fail={1, 3})
        wd.prober = flaky
        rig.start(wd, Guard(rig.app))

        async def four_probes() -> bool:
            inst_now = await rig.get(inst.id)
            return flaky.calls >= 4 and inst_now.last_probe_ok is True

        await eventually(four_probes, timeout=15, what="four probes")
        assert (await rig.get(inst.id)).state is InstanceState.RUNNING
        # The first good probe also noted the dead-man switch (one `deadman` event) and the
        # host key it pinned (one `ssh_ready` event).
        names = [n for n in await rig.event_names(inst.id) if n not in ("deadman", "ssh_ready")]
        assert names[:4] == ["strike", "probe_recovered", "strike", "probe_recovered"]
        assert (await rig.get(inst.id)).extra["deadman"] == "armed"  # on sim-vast it can act
        assert rig.ledger_row(inst.provider_id or "")["ended_by"] is None


async def test_a_user_session_keeps_the_instance_from_going_idle(tmp_path: Path) -> None:
    settings = sim_settings(tmp_path, idle_timeout="3s")
    async with rig_for(settings, tmp_path) as rig:
        inst = await rig.launch()
        assert rig.app.ssh_key is not None
        user = await asyncssh.connect(
            inst.ssh_host or "",
            inst.ssh_port or 0,
            username="root",
            client_keys=[rig.app.ssh_key],
            known_hosts=None,
        )
        shell = await user.create_process()  # an interactive shell, as a person would hold
        rig.start(Watchdog(rig.app), Guard(rig.app))
        idle = settings.policy.idle_timeout.total_seconds()
        held_from = rig.app.clock.now()
        try:
            # One and a half idle timeouts pass with the session open: activity keeps it alive.
            async def held_long_enough() -> bool:
                assert (await rig.get(inst.id)).state is InstanceState.RUNNING
                return (rig.app.clock.now() - held_from).total_seconds() >= 1.5 * idle

            await eventually(
                held_long_enough, timeout=3 * idle, what="longer than the idle timeout"
            )
            now = await rig.get(inst.id)
            assert rig.app.clock.now() - now.last_activity < settings.policy.idle_timeout
            acts = [
                e for e in await rig.app.store.events(entity_id=inst.id) if e.name == "activity"
            ]
            assert len(acts) >= 2
            assert acts[0].details["why"] == ["session"]
            assert acts[0].details["sessions"] >= 1
        finally:
            shell.close()
            user.close()
        # The session ends: now the instance does go idle.

        async def ended() -> bool:
            return (await rig.get(inst.id)).state is InstanceState.TERMINATED

        await eventually(ended, timeout=10, what="the idle rule to end it")
        assert (await rig.get(inst.id)).reason is TerminationReason.IDLE


async def test_dead_man_switch_on_lambda_with_the_opt_in(tmp_path: Path) -> None:
    # No providers.sim.api_key: the switch gets the key the sim accepts by default.
    settings = sim_settings(
        tmp_path, api_key=None, deadman_timeout="2s", lambda_deadman_api_key=True
    )
    async with rig_for(settings, tmp_path) as rig:
        inst = await rig.launch("sim-lambda")
        pid = inst.provider_id or ""

        async def ended() -> bool:
            return rig.ledger_row(pid)["ended_by"] is not None

        await eventually(ended, timeout=15, what="the switch to terminate the Lambda instance")
        assert rig.ledger_row(pid)["ended_by"] == "api:account"  # Lambda has no scoped key
