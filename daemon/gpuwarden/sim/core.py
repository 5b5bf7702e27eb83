"""The simulated cloud's state: instances, their lifecycle, accounts and billing.

Two kinds of time meet here, on purpose:
- *Sim time* (the injected Clock): creation and end times, billing, credit, listing lag.
  Tests step a FakeClock to check billing to the second without waiting.
- *Physical delays* (asyncio.sleep): the boot delay, the Lambda terminating period and the
  latency knob. They stand for work that takes real time on a real host (the SSH server
  really has to start), so they stay on the event loop's clock.

The HTTP layers (vast_api, lambda_api, admin) translate between the wire and this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import asyncssh
import structlog

from gpuwarden.config.settings import SimSettings
from gpuwarden.core.clock import Clock
from gpuwarden.sim import procs
from gpuwarden.sim.faults import FaultState
from gpuwarden.sim.ledger import Ledger, LedgerEntry, ProviderKind
from gpuwarden.sim.openssh import OpensshHost
from gpuwarden.sim.sshhost import SIM_DIR, SshHost, base_env, prepare_sandbox, run_detached

log = structlog.get_logger(__name__)

# Who the providers' clients log in as (sim.ssh = "openssh" serves that very user).
LOGIN_USER: dict[ProviderKind, str] = {"vast": "root", "lambda": "ubuntu"}
# Vast actual_status steps while booting, as fractions of the boot delay.
VAST_BOOT_STEPS = (("created", 0.25), ("loading", 0.25))
OUTBID_TICK = 0.25  # seconds between the random outbid draws (physical time)


@dataclass(eq=False)
class SimInstance:
    kind: ProviderKind
    id: str
    label: str
    price_per_hour: float
    created_at: datetime  # sim time
    sandbox: Path
    details: dict[str, Any]  # provider-specific facts the payload builders need
    onstart: str = ""
    env: dict[str, str] = field(default_factory=dict)
    authorized: Callable[[], Sequence[str]] = tuple
    api_key: str | None = None  # Vast's instance-scoped key
    status: str | None = None  # Vast actual_status / Lambda status
    ssh: SshHost | OpensshHost | None = None
    ssh_port: int | None = None  # kept after kill-ssh: the API still says running
    gone_at: datetime | None = None  # when the provider stopped listing it (sim time)
    snapshot: dict[str, Any] | None = None  # its listing entry just before it went
    boot_task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self.status in ("running", "active")

    @property
    def ended(self) -> bool:
        return self.gone_at is not None or self.status in ("terminating", "terminated")


class SimCore:
    def __init__(self, settings: SimSettings, clock: Clock, sandbox_root: Path) -> None:
        self.settings = settings
        self.clock = clock
        self.sandbox_root = sandbox_root
        self.api_key = settings.effective_api_key()
        self.faults = FaultState(settings.faults)
        self.ledger = Ledger()
        self.token = secrets.token_hex(8)  # tags this sim's processes (see procs.py)
        self.host_key = asyncssh.generate_private_key("ssh-ed25519", comment="gpuwarden-sim")
        self.instances: dict[str, SimInstance] = {}
        self.api_urls: dict[ProviderKind, str] = {"vast": "", "lambda": ""}
        self._next_vast_id = 20_000_000 + secrets.randbelow(60_000_000)
        self._credit_base: dict[ProviderKind, float] = {
            "vast": settings.credit,
            "lambda": settings.credit,
        }
        self._spent_at_set: dict[ProviderKind, float] = {"vast": 0.0, "lambda": 0.0}
        # Account SSH keys: Vast [{id, user_id, key, created_at, deleted_at}], Lambda by id.
        self.vast_keys: list[dict[str, Any]] = []
        self.lambda_keys: dict[str, dict[str, str]] = {}
        self._next_key_id = 5123
        self._tasks: set[asyncio.Task[None]] = set()
        # Listing payload builders: an ended instance stays listed as it was while list_lag lasts.
        self.snapshotters: dict[ProviderKind, Callable[[SimInstance], dict[str, Any]]] = {}

    @property
    def boot_delay(self) -> float:
        return self.settings.boot_delay.total_seconds()

    def now(self) -> datetime:
        return self.clock.now()

    # --- ids ------------------------------------------------------------------------------

    def new_vast_id(self) -> str:
        self._next_vast_id += 1
        return str(self._next_vast_id)

    def new_key_id(self) -> int:
        self._next_key_id += 1
        return self._next_key_id

    def find(self, instance_id: str) -> SimInstance | None:
        return self.instances.get(instance_id)

    def of_kind(self, kind: ProviderKind) -> list[SimInstance]:
        return [i for i in self.instances.values() if i.kind == kind]

    # --- credit ---------------------------------------------------------------------------

    def credit(self, kind: ProviderKind) -> float:
        spent = self.ledger.spent(kind, self.now()) - self._spent_at_set[kind]
        return self._credit_base[kind] - spent

    def set_credit(self, kind: ProviderKind, value: float) -> None:
        self._credit_base[kind] = value
        self._spent_at_set[kind] = self.ledger.spent(kind, self.now())

    async def tick(self, kind: ProviderKind) -> None:
        """Called before each API call: applies what sim time has made due (zero credit)."""
        if self.faults.get(kind).end_on_zero_credit and self.credit(kind) <= 0:
            for inst in self.of_kind(kind):
                if not inst.ended:
                    await self.end(inst, by="credit")

    # --- lifecycle ------------------------------------------------------------------------

    def create(
        self,
        kind: ProviderKind,
        instance_id: str,
        *,
        label: str,
        price_per_hour: float,
        details: dict[str, Any],
        onstart: str,
        env: dict[str, str],
        authorized: Callable[[], Sequence[str]],
        api_key: str | None = None,
    ) -> SimInstance:
        now = self.now()
        sandbox = self.sandbox_root / f"{kind}-{instance_id}"
        prepare_sandbox(sandbox)
        inst = SimInstance(
            kind=kind,
            id=instance_id,
            label=label,
            price_per_hour=price_per_hour,
            created_at=now,
            sandbox=sandbox,
            details=details,
            onstart=onstart,
            env=env,
            authorized=authorized,
            api_key=api_key,
            status=None if kind == "vast" else "booting",
        )
        self.instances[instance_id] = inst
        self.ledger.open(
            LedgerEntry(
                provider=kind,
                instance_id=instance_id,
                label=label,
                price_per_hour=price_per_hour,
                launched_at=now,
                gpu=str(details.get("gpu", "")),
                spot=details.get("bid") is not None,
                storage_per_hour=float(details.get("storage_per_hour") or 0.0),
            )
        )
        inst.boot_task = asyncio.create_task(self._boot(inst), name=f"sim-boot-{instance_id}")
        log.info("sim_instance_created", provider=kind, instance_id=instance_id, label=label)
        return inst

    def process_env(self, inst: SimInstance) -> dict[str, str]:
        extra = {
            "GPUWARDEN_SIM_INSTANCE": inst.id,
            "GPUWARDEN_SIM_CLOUD": self.token,
            "GPUWARDEN_SIM_API": self.api_urls[inst.kind],
        }
        extra.update(inst.env)
        return base_env(inst.sandbox, extra, shims=self.settings.ssh == "asyncssh")

    async def _boot(self, inst: SimInstance) -> None:
        try:
            await self._boot_steps(inst)
        except (OSError, asyncssh.Error) as exc:
            # The machine failed to come up, as real ones sometimes do: it stays, and bills.
            inst.status = "exited" if inst.kind == "vast" else "unhealthy"
            log.warning("sim_boot_failed", instance_id=inst.id, provider=inst.kind, error=str(exc))

    async def _boot_steps(self, inst: SimInstance) -> None:
        delay = self.boot_delay
        if inst.kind == "vast":
            for status, share in VAST_BOOT_STEPS:
                await asyncio.sleep(delay * share)
                inst.status = status
            delay *= 1 - sum(share for _, share in VAST_BOOT_STEPS)
        await asyncio.sleep(delay)
        env = self.process_env(inst)
        common: dict[str, Any] = {
            "instance_id": inst.id,
            "sandbox": inst.sandbox,
            "env": env,
            "host_key": self.host_key,
            "authorized": inst.authorized,
        }
        host: SshHost | OpensshHost
        if self.settings.ssh == "openssh":
            host = OpensshHost(**common, user=LOGIN_USER[inst.kind])
        else:
            host = SshHost(**common, now=self.now)
        inst.ssh = host
        inst.ssh_port = await host.start()
        if inst.onstart.strip():
            await self._run_onstart(inst, env)
        inst.status = "running" if inst.kind == "vast" else "active"
        log.info(
            "sim_instance_running", provider=inst.kind, instance_id=inst.id, port=inst.ssh_port
        )

    async def _run_onstart(self, inst: SimInstance, env: dict[str, str]) -> None:
        script = inst.onstart
        if inst.kind == "lambda":
            # user_data: a script with a #! line runs as itself; #cloud-config is not emulated.
            path = inst.sandbox / SIM_DIR / "user-data"
            path.write_text(script)
            path.chmod(0o700)
            if script.startswith("#cloud-config"):
                (inst.sandbox / SIM_DIR / "onstart.log").write_text(
                    "#cloud-config user_data is not run by the sim\n"
                )
                return
            argv = [str(path)] if script.startswith("#!") else ["bash", str(path)]
        else:
            argv = ["bash", "-c", script]
        await run_detached(argv, sandbox=inst.sandbox, env=env, log_name="onstart.log")
        log.info("sim_onstart_started", instance_id=inst.id, command=shlex.join(argv[:1]))

    async def end(self, inst: SimInstance, *, by: str) -> None:
        """Stop billing and the machine: SSH server down, every process killed, sandbox kept."""
        now = self.now()
        snap = self.snapshotters.get(inst.kind)
        if snap is not None and inst.gone_at is None:
            inst.snapshot = snap(inst)
        self.ledger.close(inst.kind, inst.id, now, by)
        inst.gone_at = inst.gone_at or now
        if inst.kind == "lambda":
            inst.status = "terminated" if by == "outside" else "terminating"
            if inst.status == "terminating":
                self._spawn(self._finish_terminating(inst))
        await self._power_off(inst)
        log.info("sim_instance_ended", provider=inst.kind, instance_id=inst.id, ended_by=by)

    async def _finish_terminating(self, inst: SimInstance) -> None:
        await asyncio.sleep(max(self.boot_delay / 2, 0.05))
        inst.status = "terminated"

    async def _power_off(self, inst: SimInstance) -> None:
        if inst.boot_task is not None and not inst.boot_task.done():
            inst.boot_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await inst.boot_task
        if inst.ssh is not None:
            await inst.ssh.stop()
        await procs.kill_instance_processes(inst.id, self.token)

    # --- spot ---------------------------------------------------------------------------

    @staticmethod
    def is_spot(inst: SimInstance) -> bool:
        return inst.kind == "vast" and inst.details.get("bid") is not None

    async def outbid(self, inst: SimInstance) -> bool:
        """Someone bid more for the spot instance's machine: Vast stops it (cur_state,
        intended_status and next_state `stopped`), its processes die with the container,
        and from now on it bills only its storage, until it is destroyed. False for an
        instance that is not spot, or already stopped or ended."""
        if not self.is_spot(inst) or inst.ended or inst.status == "stopped":
            return False
        now = self.now()
        inst.status = "stopped"
        inst.details["outbid_at"] = now
        self.ledger.stop(inst.kind, inst.id, now)
        await self._power_off(inst)
        log.info("sim_instance_outbid", provider=inst.kind, instance_id=inst.id)
        return True

    async def outbid_loop(self, every: float = OUTBID_TICK) -> None:
        """Outbid running spot instances at random, at faults.outbid_rate per hour of sim
        time (the rate is read on each tick, so a change through the admin API counts)."""
        last: dict[str, datetime] = {}
        while True:
            now = self.now()
            rate = self.faults.get("vast").outbid_rate
            if rate <= 0:  # the default: no walk over every instance ever made, 4 times a second
                last.clear()
                await asyncio.sleep(every)
                continue
            for inst in self.of_kind("vast"):
                if not self.is_spot(inst) or not inst.running or inst.ended:
                    last.pop(inst.id, None)
                    continue
                seen = last.setdefault(inst.id, now)
                hours = max(0.0, (now - seen).total_seconds()) / 3600.0
                last[inst.id] = now
                if self.faults.chance(1.0 - math.exp(-rate * hours)):
                    self.faults.injected["vast:outbid"] += 1
                    await self.outbid(inst)
            await asyncio.sleep(every)

    def start_background(self) -> None:
        self._spawn(self.outbid_loop())

    async def kill_ssh(self, inst: SimInstance) -> None:
        if inst.ssh is not None:
            await inst.ssh.stop()

    def listed(self, inst: SimInstance, now: datetime, lag: timedelta) -> bool:
        """Whether a listing shows it: new ones only after `lag`, ended ones still for `lag`."""
        if inst.gone_at is None:
            return inst.created_at + lag <= now
        if inst.kind == "lambda" and inst.status == "terminating":
            return True
        return now < inst.gone_at + lag

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def shutdown(self) -> None:
        """Stop every SSH server and instance process. Billing records are left as they are."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for inst in self.instances.values():
            await self._power_off(inst)
