"""The chaos suite (issue 17): a real daemon against a standalone sim behind a fault proxy,
SIGKILLed on a seeded random schedule while it runs jobs and bare rentals, with every sim
fault knob and every proxy fault turned on in turn; then the world recovers, the daemon
drains, and the invariants are checked against the sim's ledger (chaos_support.check).

`make test` runs a bounded run (CHAOS_KILLS, default 6); `make chaos` runs 50 kills. The
figures (kills, instances, jobs, worst overrun, faults) are printed at the end of each run.
Hostile instance results, a full disk and a second daemon have their own tests
(tests/unit/test_jobs_hostile.py, tests/unit/test_guard_disk_full.py,
tests/integration/test_two_daemons.py)."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from chaos_support import TERMINAL, FaultProxy, Figures, World, check, config_text
from tests.conftest import daemon_env, eventually

from gpuwarden.cli.client import RemoteError, Unreachable
from gpuwarden.config.settings import SimSettings
from gpuwarden.sim import SimCloud

KILLS = int(os.environ.get("CHAOS_KILLS", "6"))
SEED = int(os.environ.get("CHAOS_SEED", "17"))
PROXY_RATE = 0.15

# The sim's knobs, one turned on before each kill in turn (so every one is met in a run of
# at least this many kills), each for the next daemon life.
SIM_KNOBS: list[tuple[str, dict[str, Any]]] = [
    ("rate_5xx", {"rate_5xx": 0.15}),
    ("rate_429", {"rate_429": 0.15}),
    ("latency", {"latency": "0.5s"}),
    ("create_error_exists", {"create_error_exists": 1}),
    ("list_lag", {"list_lag": "3s"}),
    ("destroy_noop", {"destroy_noop": 1}),
]
CALM = {
    "rate_5xx": 0.0,
    "rate_429": 0.0,
    "latency": "0s",
    "create_error_exists": 0,
    "list_lag": "0s",
    "destroy_noop": 0,
}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240 + 25 * KILLS)]


@pytest.fixture
async def world(tmp_path: Path, short_dir: Path) -> AsyncIterator[World]:
    sim = SimCloud(
        SimSettings(boot_delay="0.5s"),  # type: ignore[arg-type,unused-ignore]
        sandbox_root=tmp_path / "sim",
    )
    urls = await sim.start()
    proxy = FaultProxy(urls.admin, rate=PROXY_RATE, seed=SEED)
    await proxy.start()
    home = short_dir
    (home / "config.toml").write_text(config_text(home, proxy.url))
    env = daemon_env(GPUWARDEN_SOCKET=str(home / "c.sock"))
    w = World(home=home, sim=sim, proxy=proxy, env=env)
    try:
        yield w
    finally:
        if w.daemon is not None:
            w.daemon.kill()
            await w.daemon.wait(15)
        await proxy.stop()
        await sim.stop()


async def quietly(world: World, method: str, params: dict[str, Any] | None = None) -> Any:
    """A call the kill may cut short: its answer may be lost, and that is allowed."""
    try:
        return await world.call(method, params)
    except (Unreachable, RemoteError, OSError, TimeoutError):
        return None


async def instance_fault(world: World, rng: random.Random, figures: Figures) -> None:
    """Now and then the provider ends an instance by itself, or its SSH server dies."""
    running = [i for i in world.sim.core.instances.values() if i.running]
    if not running or rng.random() < 0.5:
        return
    inst = rng.choice(running)
    if rng.random() < 0.5:
        await world.sim.core.end(inst, by="outside")
        figures.sim_faults.append("provider ended one")
    else:
        await world.sim.core.kill_ssh(inst)
        figures.sim_faults.append("ssh died")


async def test_chaos(world: World) -> None:
    rng = random.Random(SEED)
    figures = Figures()
    prompts = 0
    for kill in range(KILLS):
        name, knob = SIM_KNOBS[kill % len(SIM_KNOBS)]
        world.sim.core.faults.update({**CALM, **knob})
        figures.sim_faults.append(name)
        await world.start()
        for _ in range(rng.randint(1, 2)):
            prompts += 1
            await quietly(world, "jobs.submit", {"prompt": f"chaos {prompts}", "seed": prompts})
        if rng.random() < 0.3:
            provider = rng.choice(["sim-vast", "sim-lambda"])
            await quietly(world, "launch", {"provider": provider})
        await instance_fault(world, rng, figures)
        # A random moment in the daemon's life: booting, running, fetching, ending.
        await asyncio.sleep(rng.uniform(0.2, 5.0))
        await world.kill()
        figures.kills += 1

    # The world recovers: no more faults; the daemon drains what is left.
    world.sim.core.faults.update(CALM)
    world.proxy.rate = 0.0
    await world.start()

    async def drained() -> bool:
        jobs = await world.call("jobs.list", {"limit": 10_000})
        done = all(j["state"] in TERMINAL for j in jobs)
        billing = [e for e in world.sim.core.ledger.entries() if e.ended_at is None]
        return done and not billing

    await eventually(drained, timeout=180, interval=0.5, what="every job done, nothing billing")
    await world.stop()
    figures.proxy_faults = dict(world.proxy.counts)
    check(world, figures)
    print("\n" + figures.line(SEED))
    assert figures.kills == KILLS and figures.jobs >= 1
    assert (
        set(figures.proxy_faults) == {"html200", "empty200", "garbled", "html404", "reset", "slow"}
        or KILLS < 20
    )
    assert figures.violations == [], "\n".join(figures.violations)
