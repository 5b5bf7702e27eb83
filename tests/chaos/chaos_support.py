"""The chaos suite's parts: a fault proxy in front of the sim's provider APIs, the world a run
drives (sim, proxy, one daemon killed and restarted on a seeded schedule), and the invariants
checked against the sim's ledger at the end.

The invariants (issue 17):
- while a daemon was alive, no instance billed past its deadline (its last activity plus
  idle_timeout, its lease end) by more than BOUND seconds;
- nothing bills at the end;
- no instance is marked terminated while the ledger still bills it;
- every job the daemon accepted is in exactly one terminal state, and a succeeded one has
  its images once (no leftovers, no duplicates).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import shutil
import sqlite3
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from aiohttp import web

from gpuwarden.cli.client import ControlClient
from gpuwarden.core.clock import parse_ts
from gpuwarden.sim import SimCloud
from gpuwarden.system.childproc import DaemonProcess

# Seconds an instance may bill past its deadline while a daemon is alive: a pass of the guard
# (it wakes on the deadline), destroy retries through a proxy that garbles one answer in
# several and answers some slowly, and the start-up of a daemon restarted just before.
BOUND = 25.0
IDLE_TIMEOUT = 12.0
TERMINAL = ("succeeded", "failed", "cancelled")
FAULTS = ("html200", "empty200", "garbled", "html404", "reset", "slow")
# Daemon events that show a fault was met, counted in the figures.
MET = (
    "credit_stop",
    "instance_vanished",
    "orphan_found",
    "instance_adopted",
    "termination_intent_unwritten",
    "job_failed",
    "job_ssh_dropped",
    "destroy_failed",
)


@dataclass
class FaultProxy:
    """Forwards /vast/... and /lambda/... to the sim; answers a share `rate` of them with a
    fault drawn from FAULTS (seeded): an HTML or empty 200, a cut-off JSON body, an HTML 404,
    a reset connection, or a slow answer. Garbled answers are sent after the sim acted (the
    call happened, its answer is lost), resets half before and half after. /_sim/... passes."""

    target: str
    rate: float
    seed: int
    counts: dict[str, int] = field(default_factory=dict)
    _runner: web.AppRunner | None = None
    _client: httpx.AsyncClient | None = None
    url: str = ""

    async def start(self) -> str:
        self._rng = random.Random(self.seed)
        self._client = httpx.AsyncClient(base_url=self.target, timeout=30)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._client is not None:
            await self._client.aclose()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        fault = None
        if not request.path.startswith("/_sim") and self._rng.random() < self.rate:
            fault = self._rng.choice(FAULTS)
            self.counts[fault] = self.counts.get(fault, 0) + 1
        if fault == "reset" and self._rng.random() < 0.5:
            return self._reset(request)
        if fault == "slow":
            await asyncio.sleep(2.0)
        try:
            answer = await self._forward(request)
        except (ConnectionError, httpx.HTTPError):  # the daemon went away mid-request
            return self._reset(request)
        if fault == "reset":
            return self._reset(request)
        if fault == "html200":
            return web.Response(
                text="<html><body>Bad gateway</body></html>", content_type="text/html"
            )
        if fault == "empty200":
            return web.Response(body=b"", content_type="application/json")
        if fault == "garbled":
            return web.Response(
                body=answer.content[: len(answer.content) // 2] or b"{",
                content_type="application/json",
            )
        if fault == "html404":
            return web.Response(status=404, text="<html>Not Found</html>", content_type="text/html")
        return web.Response(
            status=answer.status_code,
            body=answer.content,
            content_type=answer.headers.get("content-type", "application/json").split(";")[0],
        )

    async def _forward(self, request: web.Request) -> httpx.Response:
        assert self._client is not None
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() in ("authorization", "content-type")
        }
        return await self._client.request(
            request.method,
            request.path_qs,
            content=await request.read(),
            headers=headers,
        )

    @staticmethod
    def _reset(request: web.Request) -> web.Response:
        transport = request.transport
        if transport is not None:
            transport.abort()
        return web.Response(status=500)


# What a lying instance leaves as result.json instead of the runner's (issue 17, item 4).
HOSTILE_RESULTS: list[Any] = [
    {"files": [{"name": "..", "sha256": "0" * 64}]},
    {"files": [{"name": "", "sha256": "0" * 64}]},
    {"files": [{"name": "../../../../outside.png", "sha256": "0" * 64}]},
    {"files": [{"name": 7, "sha256": "0" * 64}]},
    {"files": [{"name": "a\x00b.png", "sha256": "0" * 64}]},
    {"files": [{"name": f"i{n}.png", "sha256": "0" * 64} for n in range(5000)]},
    {"files": [{"name": "missing.png", "sha256": "0" * 64}]},
]


class Liar:
    """Makes every third instance of the sim lie: each result.json its runner writes is
    replaced at once by one of HOSTILE_RESULTS (a race with the daemon's read that the
    watcher, polling every 20 ms against the daemon's 300 ms, mostly wins)."""

    def __init__(self, sim: SimCloud) -> None:
        self.sim = sim
        self.replaced = 0
        self._done: set[Path] = set()

    async def run(self) -> None:
        while True:
            for n, inst in enumerate(sorted(self.sim.core.instances.values(), key=lambda i: i.id)):
                if n % 3 == 0:
                    self._lie(inst.sandbox)
            await asyncio.sleep(0.02)

    def _lie(self, sandbox: Path) -> None:
        for result in sandbox.glob(".gpuwarden/jobs/*/result.json"):
            if result in self._done:
                continue
            self._done.add(result)
            lie = HOSTILE_RESULTS[self.replaced % len(HOSTILE_RESULTS)]
            result.write_text(json.dumps(lie))
            self.replaced += 1


@dataclass
class Figures:
    kills: int = 0
    restarts: int = 0
    jobs: int = 0
    instances: int = 0
    worst_overrun_s: float = 0.0
    violations: list[str] = field(default_factory=list)
    proxy_faults: dict[str, int] = field(default_factory=dict)
    sim_faults: list[str] = field(default_factory=list)
    met: dict[str, int] = field(default_factory=dict)  # World.met
    lies: int = 0  # result.json files a lying instance replaced
    refused_results: int = 0  # jobs failed because their result.json was refused

    def line(self, seed: int) -> str:
        faults = ", ".join(f"{k} {v}" for k, v in sorted(self.proxy_faults.items()))
        knobs = ", ".join(f"{k} {v}" for k, v in Counter(self.sim_faults).items())
        return (
            f"chaos seed {seed}: {self.kills} kills, {self.instances} instances, {self.jobs} jobs, "
            f"worst overrun {self.worst_overrun_s:.1f} s (bound {BOUND:g} s), "
            f"{len(self.violations)} violations; {self.lies} lying results "
            f"({self.refused_results} jobs failed for them); proxy faults: {faults or 'none'}; "
            f"sim faults: {knobs or 'none'}; daemon events: "
            f"{', '.join(f'{k} {v}' for k, v in sorted(self.met.items())) or 'none'}"
        )


def config_text(home: Path, sim_url: str) -> str:
    return f"""
[daemon]
state_dir = "{home / "state"}"
socket = "{home / "c.sock"}"
shutdown_timeout = "5s"

[policy]
idle_timeout = "{IDLE_TIMEOUT:g}s"
poll_interval = "1s"
watchdog_interval = "2s"
probe_timeout = "3s"
watchdog_failures = 3
vanish_grace = "3s"

[providers.sim]
enabled = true
base_url = "{sim_url}"

[jobs]
keep_warm = "0s"
engine = "preview"
steps = 4
progress_interval = "0.3s"
preview_step_delay = "0.2s"
ssh_wait = "60s"
max_attempts = 5
"""


@dataclass
class World:
    """One run: the sim, the proxy in front of it, and the daemon's home; the daemon's alive
    windows (wall clock, as the ledger's) are kept for the overrun check."""

    home: Path
    sim: SimCloud
    proxy: FaultProxy
    env: dict[str, str]
    daemon: DaemonProcess | None = None
    alive: list[tuple[datetime, datetime | None]] = field(default_factory=list)
    # Run each daemon under this command (e.g. nsenter into a mount namespace), and read what
    # it wrote through `root` (the namespace's view of the file system, /proc/PID/root).
    prefix: list[str] = field(default_factory=list)
    root: Path = Path("/")
    # How often the daemons logged the events that show a fault was met (over all lives).
    met: Counter[str] = field(default_factory=Counter)

    def seen(self, path: Path | str) -> Path:
        """`path` as the daemon sees it, from here."""
        return self.root / Path(path).relative_to("/")

    @property
    def sock(self) -> Path:
        return self.home / "c.sock"

    async def start(self) -> None:
        self.sock.unlink(missing_ok=True)  # a killed daemon leaves it
        self.alive.append((datetime.now(UTC), None))
        argv = [*self.prefix, sys.executable, "-m", "gpuwarden", "run"]
        proc = await asyncio.create_subprocess_exec(
            *argv,
            "--config",
            str(self.home / "config.toml"),
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        self.daemon = DaemonProcess(proc)
        await self.daemon.wait_for("daemon_ready", 60)

    def _count(self, daemon: DaemonProcess) -> None:
        for event in daemon.events:
            if event.get("event") in MET:
                self.met[str(event["event"])] += 1

    async def kill(self) -> None:
        assert self.daemon is not None
        self.daemon.kill()
        await self.daemon.wait(15)
        self._count(self.daemon)
        start, _ = self.alive[-1]
        self.alive[-1] = (start, datetime.now(UTC))
        self.daemon = None

    async def stop(self) -> None:
        if self.daemon is not None:
            code = await self.daemon.stop(15)
            self._count(self.daemon)
            start, _ = self.alive[-1]
            self.alive[-1] = (start, datetime.now(UTC))
            self.daemon = None
            assert code == 0

    async def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        async with ControlClient(self.sock, timeout=20) as client:
            return await client.call(method, params or {})

    def alive_between(self, start: datetime, end: datetime) -> float:
        """Seconds of [start, end] during which a daemon was alive."""
        total = 0.0
        for a, b in self.alive:
            lo, hi = max(a, start), min(b or datetime.now(UTC), end)
            total += max(0.0, (hi - lo).total_seconds())
        return total


@contextlib.contextmanager
def database(path: Path) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        yield conn
    finally:
        conn.close()


def check(world: World, figures: Figures) -> None:
    """The invariants against the sim's ledger and the daemon's database (read-only)."""
    now = datetime.now(UTC)
    figures.met = dict(world.met)
    entries = world.sim.core.ledger.entries()
    figures.instances = len(entries)
    # A copy (the daemon has stopped): SQLite cannot open a file through /proc/PID/root.
    copy = world.home / "db-copy"
    copy.mkdir(exist_ok=True)
    for part in world.seen(world.home / "state").glob("gpuwarden.db*"):
        shutil.copyfile(part, copy / part.name)
    with database(copy / "gpuwarden.db") as db:
        rows = {r["provider_id"]: r for r in db.execute("SELECT * FROM instances")}
        jobs = list(db.execute("SELECT * FROM jobs"))
        ends = [
            (e["entity_id"], e["to_state"])
            for e in db.execute("SELECT entity_id, to_state FROM events WHERE kind = 'job'")
            if e["to_state"] in TERMINAL
        ]
    for entry in entries:
        name = f"{entry.label} ({entry.provider} {entry.instance_id})"
        if entry.ended_at is None:
            figures.violations.append(f"{name} still bills at the end")
        ended = entry.ended_at or now
        row = rows.get(entry.instance_id)
        if row is None:
            figures.violations.append(f"{name} is not in the database")
            continue
        last = parse_ts(row["last_activity"])
        lease = parse_ts(row["lease_until"])
        assert last is not None and lease is not None
        deadline = min(last + timedelta(seconds=IDLE_TIMEOUT), lease)
        over = world.alive_between(deadline, ended)
        figures.worst_overrun_s = max(figures.worst_overrun_s, over)
        if over > BOUND:
            figures.violations.append(f"{name} billed {over:.1f} s past its deadline")
        terminated = parse_ts(row["terminated_at"]) if row["terminated_at"] else None
        if (
            row["state"] == "terminated"
            and terminated is not None
            and ended > terminated + timedelta(seconds=1)
        ):
            figures.violations.append(f"{name} was marked terminated while it still billed")
    figures.jobs = len(jobs)
    for job in jobs:
        count = sum(1 for jid, _ in ends if jid == job["id"])
        if job["state"] not in TERMINAL or count != 1:
            figures.violations.append(
                f"job {job['id']} is {job['state']} with {count} terminal events"
            )
        if job["state"] == "succeeded":
            figures.violations += images_once(world, job)
        if job["state"] == "failed" and "result.json" in (job["error"] or ""):
            figures.refused_results += 1
    outside = world.home.parent / "outside.png"
    if outside.exists() or any(world.seen(world.home).rglob("outside.png")):
        figures.violations.append("a lying instance's path was written")


def images_once(world: World, job: sqlite3.Row) -> list[str]:
    outputs = [world.seen(p) for p in json.loads(job["outputs"] or "[]")]
    spec = json.loads(job["spec"])
    if len(outputs) != int(spec.get("count", 1)) or len(set(outputs)) != len(outputs):
        return [f"job {job['id']} has outputs {outputs}"]
    if not all(p.is_file() for p in outputs):
        return [f"job {job['id']} lacks an output file"]
    folder = outputs[0].parent
    extra = {p.name for p in folder.iterdir()} - {p.name for p in outputs} - {"result.json"}
    return [f"job {job['id']} left {sorted(extra)}"] if extra else []
