"""The cost guard in real processes: `gpuwarden run` as a subprocess renting from a sim
cloud that runs in this test (so the cloud and its billing ledger outlive the daemon).

- SIGKILL at each crash point of launch and termination (test builds only:
  GPUWARDEN_TEST_CRASHPOINTS=1 and GPUWARDEN_CRASHPOINT=<name>), restart, and the ledger
  shows no instance billed past max(its deadline, the restart) + BOUND;
- insufficient credit destroys everything and pauses the queue;
- the issue's "done when": idle 5 s ends within 2 s of the deadline; a busy, extended
  instance ends at the 20 s hard cap; an orphan left by a kill between launch and record is
  destroyed within one poll of the restart. Each shows in the termination record.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sim_support import KEY, running_sim
from tests.conftest import daemon_env, eventually

from gpuwarden.cli.client import ControlClient
from gpuwarden.core.clock import parse_ts
from gpuwarden.sim.server import SimCloud
from gpuwarden.system.childproc import DaemonProcess
from gpuwarden.system.crashpoints import LAUNCH_POINTS, TERMINATION_POINTS

pytestmark = pytest.mark.slow

POLL = 1.0  # policy.poll_interval in these tests
BOUND = timedelta(seconds=POLL + 1.5)  # a poll, plus a first retry and process slack


@pytest.fixture
async def sim(tmp_path: Path) -> AsyncIterator[SimCloud]:
    async with running_sim(tmp_path, api_key=KEY) as cloud:  # boots in 0.2 s
        yield cloud


@dataclass
class Daemon:
    """One `gpuwarden run` at a time over the same state directory."""

    tmp: Path
    short: Path  # for the socket: AF_UNIX paths are short
    sim: SimCloud
    policy: dict[str, str]
    budget: dict[str, float] = field(default_factory=dict)
    proc: DaemonProcess | None = None
    ready_at: datetime | None = None

    @property
    def sock(self) -> Path:
        return self.short / "control.sock"

    def config(self) -> Path:
        assert self.sim.urls is not None
        path = self.tmp / "config.toml"
        policy = "\n".join(f'{k} = "{v}"' for k, v in self.policy.items())
        budget = "\n".join(f"{k} = {v}" for k, v in self.budget.items())
        path.write_text(
            f"""
[daemon]
state_dir = "{self.tmp / "state"}"
socket = "{self.sock}"

[policy]
poll_interval = "{POLL:g}s"
vanish_grace = "2s"
watchdog_interval = "1h"
{policy}

[budget]
{budget}

[providers.vast]
enabled = true
base_url = "{self.sim.urls.vast}"
api_key = "sim-key"

[ssh]
connect_timeout = "2s"
"""
        )
        return path

    async def start(self, crashpoint: str | None = None) -> None:
        config = self.config()
        env = daemon_env(GPUWARDEN_CONFIG=str(config), GPUWARDEN_SOCKET=str(self.sock))
        if crashpoint:
            env |= {"GPUWARDEN_TEST_CRASHPOINTS": "1", "GPUWARDEN_CRASHPOINT": crashpoint}
        self.sock.unlink(missing_ok=True)  # a SIGKILLed daemon leaves its socket behind
        self.proc = await DaemonProcess.start(config, env)
        # After the reconciler's first pass and the socket's bind: it is "ready".
        await self.proc.wait_for("daemon_ready", 30)
        self.ready_at = self.sim.clock.now()

    async def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        async with ControlClient(self.sock, timeout=30) as client:
            return await client.call(method, params)

    async def died(self, timeout: float = 30) -> int:
        assert self.proc is not None
        return await self.proc.wait(timeout)

    async def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            await self.proc.wait(30)


@pytest.fixture
async def make_daemon(tmp_path: Path, short_dir: Path, sim: SimCloud) -> AsyncIterator[Any]:
    made: list[Daemon] = []

    def make(policy: dict[str, str], budget: dict[str, float] | None = None) -> Daemon:
        d = Daemon(tmp_path, short_dir, sim, policy, budget or {})
        made.append(d)
        return d

    try:
        yield make
    finally:
        for d in made:
            await d.stop()


def ledger(sim: SimCloud) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = sim.ledger()["instances"]
    return rows


def ended_at(row: dict[str, Any]) -> datetime | None:
    return parse_ts(row["ended_at"])


async def all_ended(sim: SimCloud, timeout: float, what: str) -> list[dict[str, Any]]:
    async def done() -> bool:
        return all(r["ended_at"] for r in ledger(sim))

    await eventually(done, timeout=timeout, what=what)
    return ledger(sim)


async def records(d: Daemon, count: int, timeout: float = 10) -> list[dict[str, Any]]:
    """The termination records, once there are `count` (destroy is confirmed after the
    ledger closes)."""

    async def written() -> bool:
        return len(await d.call("history", {"hours": 1})) >= count

    await eventually(written, timeout=timeout, what=f"{count} termination record(s)")
    out: list[dict[str, Any]] = await d.call("history", {"hours": 1})
    return out


async def launch(d: Daemon, **params: Any) -> dict[str, Any]:
    out: dict[str, Any] = await d.call("launch", {"provider": "vast", **params})
    return out


# --- crash points ------------------------------------------------------------------------


@pytest.mark.parametrize("point", LAUNCH_POINTS + TERMINATION_POINTS)
async def test_sigkill_at_each_crash_point_leaks_nothing(
    make_daemon: Any, sim: SimCloud, point: str
) -> None:
    idle = 2.0
    d: Daemon = make_daemon({"idle_timeout": f"{idle:g}s"})
    await d.start(crashpoint=point)
    asked = sim.clock.now()
    if point in LAUNCH_POINTS:
        with pytest.raises(Exception):  # noqa: B017 - the daemon dies mid-call
            await launch(d, hours=1)
    else:
        await launch(d, hours=1)  # dies at its idle deadline, while ending it
    assert await d.died() == -signal.SIGKILL
    await d.start()  # no crash point this time
    assert d.ready_at is not None
    rows = await all_ended(sim, idle + 10, "every billed instance to end")
    deadline = asked + timedelta(seconds=idle)
    for row in rows:
        end = ended_at(row)
        assert end is not None
        assert end <= max(deadline, d.ready_at) + BOUND, (point, row, d.ready_at)
    if point == "after_intent":
        assert rows == []  # the provider was never called
    else:
        assert len(rows) == 1
    history = await records(d, len(rows))
    expected = {
        "after_provider_launch": "orphan",
        "after_record": "idle",
        "after_terminating_commit": "idle",
        "after_destroy_call": "idle",
    }.get(point)
    assert [h["reason"] for h in history] == ([expected] if expected else [])
    assert [h["provider_id"] for h in history] == [r["instance_id"] for r in rows]


# --- credit ------------------------------------------------------------------------------


async def test_insufficient_credit_destroys_everything_and_pauses_the_queue(
    make_daemon: Any, sim: SimCloud
) -> None:
    d: Daemon = make_daemon({"idle_timeout": "10m"}, {"credit_floor": 5.0})
    await d.start()
    # One launch: the Vast client paces offer searches 6 s apart.
    await launch(d, hours=1)
    assert len([r for r in ledger(sim) if r["running"]]) == 1
    sim.core.set_credit("vast", 1.0)  # under the floor
    rows = await all_ended(sim, 10, "the credit stop to end every instance")
    assert len(rows) == 1

    history = await records(d, 1)
    assert (await d.call("daemon.info"))["queue_paused"] is True
    assert {h["reason"] for h in history} == {"insufficient_credit"}


# --- the "done when" -------------------------------------------------------------


async def test_idle_5s_is_destroyed_within_2s_of_its_deadline(
    make_daemon: Any, sim: SimCloud
) -> None:
    d: Daemon = make_daemon({"idle_timeout": "5s"})
    await d.start()
    inst = await launch(d, hours=1)
    deadline = parse_ts(inst["deadline"])
    assert deadline is not None
    assert inst["deadline_reason"] == "idle"
    [row] = await all_ended(sim, 15, "the idle instance to end")
    end = ended_at(row)
    assert end is not None
    assert deadline <= end <= deadline + timedelta(seconds=2)
    [record] = await records(d, 1)
    assert record["reason"] == "idle"
    assert record["instance_id"] == inst["id"]


async def test_a_busy_extended_instance_ends_at_the_20s_hard_cap(
    make_daemon: Any, sim: SimCloud
) -> None:
    d: Daemon = make_daemon(
        {
            "idle_timeout": "5s",
            "lease_min": "5s",
            "lease_default": "10s",
            "lease_max": "20s",
            "hard_cap": "20s",
        }
    )
    await d.start()
    inst = await launch(d)
    created = parse_ts(inst["created_at"])
    assert created is not None
    extended = await d.call("extend", {"id": inst["id"], "hours": 10 / 3600})
    assert parse_ts(extended["lease_until"]) == created + timedelta(seconds=20)
    while not ledger(sim)[0]["ended_at"]:  # kept busy: activity every second
        try:
            await d.call("activity", {"id": inst["id"]})
        except Exception:
            break
        await asyncio.sleep(1.0)
    [row] = await all_ended(sim, 10, "the hard cap")
    end = ended_at(row)
    assert end is not None
    cap = created + timedelta(seconds=20)
    assert cap <= end <= cap + timedelta(seconds=2)
    [record] = await records(d, 1)
    assert record["reason"] == "hard_timeout"


async def test_an_orphan_from_a_kill_between_launch_and_record_is_destroyed_within_a_poll(
    make_daemon: Any, sim: SimCloud
) -> None:
    d: Daemon = make_daemon({"idle_timeout": "10m"})
    await d.start(crashpoint="after_provider_launch")
    with pytest.raises(Exception):  # noqa: B017 - the daemon dies mid-call
        await launch(d, hours=1)
    await d.died()
    [row] = ledger(sim)
    assert row["ended_at"] is None  # billing, and no database knows its id
    await d.start()
    assert d.ready_at is not None
    [row] = await all_ended(sim, 10, "the orphan to be destroyed")
    end = ended_at(row)
    assert end is not None
    assert end <= d.ready_at + timedelta(seconds=POLL)
    [record] = await records(d, 1)
    assert record["reason"] == "orphan"
    assert record["provider_id"] == row["instance_id"]
