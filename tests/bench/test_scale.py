"""Benchmark (`make bench`): the whole daemon at 100, 1,000 and 10,000 live instances.

For each size: a database seeded with N RUNNING instances on the fake provider and 100,000
queued jobs (GPUWARDEN_BENCH_JOBS), of which PLANTED instances have their lease end at known
times; then the real daemon (tests/bench/scale_daemon.py: the Supervisor and every loop, the
fake cloud in place of a provider) is started and measured:

- start to READY (spawn to the `daemon_ready` log line);
- a guard pass's CPU time (in this process, on the same database, before the daemon starts:
  the first pass and one with nothing changed);
- CPU with nothing due (% of a core over IDLE_WINDOW, from /proc, once no instance is being
  launched) and RSS at rest;
- `status` over the socket as the CLI asks by default (the first page of 100 rows, with the
  totals over every instance): p50 / p99 of sequential calls;
- the whole list, `status --all`, over the socket (p50 / p99) and RSS after 8 concurrent
  whole-list calls;
- `gpuwarden status` through the CLI, a whole process (plain and --json: the first page;
  --all: every row);
- deadline -> destroy call lag, p50 / p99 / max, over the planted deadlines;
- whether any loop stalled (`loops_stalled`: systemd's watchdog would have been starved).

Then the burst: 1,000 instances whose deadlines all fall within 10 s, through the whole daemon.
The last test prints one table and the growth from 1,000 to 10,000 for each figure.

GPUWARDEN_BENCH_SIZES picks the sizes (default "100,1000,10000"; the 10,000 run takes about
two minutes). The package is byte-compiled first (compileall, in place), as pip does when it
installs the wheel a real daemon runs from: with PYTHONDONTWRITEBYTECODE set and an editable
install, every start would otherwise compile each module from source again. The CLI is run
as the installed `gpuwarden` console script. The disk is flushed (os.sync) before each
daemon starts, so that the destroys' fsyncs do not wait on the seeding's writeback.
Submit-to-running on a warm instance is not measured here (the fake cloud has no SSH hosts
to run a job on) but in test_warm_submit.py, on the sim cloud, which prints its own table.
"""

from __future__ import annotations

import asyncio
import compileall
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from tests.bench.scale_seed import migrate, plant, seed
from tests.conftest import daemon_env, open_app, short_tmp

from gpuwarden.cli.client import ControlClient, RemoteError
from gpuwarden.cli.commands_views import ALL
from gpuwarden.config.settings import load
from gpuwarden.core.clock import SystemClock
from gpuwarden.loops.guard import Guard
from gpuwarden.system.childproc import DaemonProcess

ROOT = Path(__file__).resolve().parents[2]
SIZES = [int(s) for s in os.environ.get("GPUWARDEN_BENCH_SIZES", "100,1000,10000").split(",")]
JOBS = int(os.environ.get("GPUWARDEN_BENCH_JOBS", "100000"))
PLANTED = 200
WINDOW = timedelta(seconds=20)  # the planted deadlines spread over this
BURST = (1000, timedelta(seconds=10))  # instances, all of them due within this
IDLE_WINDOW = 5.0
STATUS_BUDGET = 8.0  # seconds of sequential status calls (at least 5 calls)
TICK = os.sysconf("SC_CLK_TCK")

RESULTS: dict[str, dict[str, Any]] = {}
# The installed console script, as a user runs it (python -m where there is none).
SCRIPT = Path(sys.executable).parent / "gpuwarden"
CLI = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "gpuwarden"]

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")


@pytest.fixture(scope="module", autouse=True)
def _compiled() -> None:
    for folder in (ROOT / "daemon" / "gpuwarden", ROOT / "tests" / "bench"):
        assert compileall.compile_dir(folder, quiet=1), f"could not compile {folder}"


def _config(base: Path, level: str = "info") -> Path:
    path = base / "config.toml"
    path.write_text(
        f"""
[daemon]
state_dir = "{base / "state"}"
socket = "{base / "control.sock"}"
log_level = "{level}"
[policy]
idle_timeout = "8h"
[providers.sim]
enabled = false
"""
    )
    return path


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def _rss_mb(pid: int, key: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _q(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def _destroys(path: Path) -> dict[str, float]:
    if not path.exists():
        return {}
    out: dict[str, float] = {}
    for line in path.read_text().splitlines():
        pid, _, at = line.partition(" ")
        if at:
            out.setdefault(pid, float(at))
    return out


async def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    await fn()
    return time.perf_counter() - t0


async def _latencies(sock: Path, params: dict[str, Any], most: int) -> list[float]:
    """Sequential `status` calls for STATUS_BUDGET seconds (at least 5, at most `most`)."""
    lat: list[float] = []
    async with ControlClient(sock) as client:
        t_end = time.perf_counter() + STATUS_BUDGET
        while len(lat) < 5 or (time.perf_counter() < t_end and len(lat) < most):
            lat.append(await _timed(lambda: client.call("status", params)))
    return lat


async def _status_figures(sock: Path, pid: int) -> dict[str, Any]:
    inf = float("inf")
    out: dict[str, Any] = {}
    try:
        lat = await _latencies(sock, {}, 500)  # the default call: the first page
        out |= {
            "status_p50": statistics.median(lat),
            "status_p99": _q(lat, 0.99),
            "status_calls": len(lat),
        }
    except (RemoteError, TimeoutError) as exc:  # e.g. past the daemon's request timeout
        print(f"\nstatus (first page) failed: {exc}")
        out |= {"status_p50": inf, "status_p99": inf}
    try:  # the whole list: its failure keeps the first page's figures
        every = await _latencies(sock, ALL, 100)
        out |= {"all_p50": statistics.median(every), "all_p99": _q(every, 0.99)}
    except (RemoteError, TimeoutError) as exc:
        print(f"\nstatus --all failed: {exc}")
        return out | {"all_p50": inf, "all_p99": inf}
    clients = [ControlClient(sock) for _ in range(8)]

    async def one(c: ControlClient) -> None:
        async with c:
            await c.call("status", ALL)  # the worst case: 8 whole lists at once

    await asyncio.gather(*(one(c) for c in clients))
    return out | {"rss_8_status": _rss_mb(pid), "rss_peak": _rss_mb(pid, "VmHWM")}


async def _settled(sock: Path, limit: float = 30.0) -> None:
    """Until no instance is being launched: the jobs loop rents a few for the queued jobs at
    start, and while one boots the reconciler lists every 3 s, which is not "nothing due"."""
    give_up = time.perf_counter() + limit
    async with ControlClient(sock) as client:
        while time.perf_counter() < give_up:
            booting = 0
            for state in ("requested", "provisioning"):
                got = await client.call("status", {"state": state, "limit": 1})
                booting += int(got["count"])
            if not booting:
                return
            await asyncio.sleep(0.5)


async def _cli(sock: Path, *args: str) -> float:
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *CLI,
        "status",
        "--socket",
        str(sock),
        *args,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=daemon_env(),
    )
    _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return time.perf_counter() - t0


async def _guard_pass_cpu(cfg: Path) -> tuple[float, float]:
    """CPU seconds of a first guard pass and of a second one with nothing changed."""
    settings = load(cfg)
    async with open_app(settings) as app:
        guard = Guard(app)
        times = []
        async with asyncio.TaskGroup() as tasks:
            for _ in range(2):
                t0 = time.process_time()
                await guard.pass_once(tasks)
                times.append(time.process_time() - t0)
    return times[0], times[1]


@contextlib.contextmanager
def _base() -> Iterator[Path]:
    with short_tmp() as base:
        (base / "state").mkdir()
        yield base


async def _run(count: int, planted: int, window: timedelta, *, full: bool) -> dict[str, Any]:
    with _base() as base:
        cfg = _config(base)
        clock = SystemClock()
        db = base / "state" / "gpuwarden.db"
        await migrate(db, clock)
        planted_at = seed(
            db,
            installation="main",
            now=clock.now(),
            count=count,
            deadlines=[clock.now() + timedelta(hours=1)] * planted,
            queued_jobs=JOBS,
        )
        # Far enough ahead that start-up and the status figures are done before the first.
        lead = timedelta(seconds=(70 + 8 * count / 1000) if full else 15 + count / 1000)
        first = clock.now() + lead
        planted_at = {
            pid: first + window * (n / planted) for n, pid in enumerate(sorted(planted_at))
        }
        plant(db, planted_at)
        # The seeding (and the run before) left hundreds of MB for the kernel to write back;
        # flushed first, so that the destroys' fsyncs (intent before action) measure this
        # daemon, not the last run's writeback.
        os.sync()
        out: dict[str, Any] = {}
        if full:
            out["guard_pass_first"], out["guard_pass_next"] = await _guard_pass_cpu(cfg)
        t0 = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.bench.scale_daemon",
            str(cfg),
            cwd=ROOT,
            env=daemon_env(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        daemon = DaemonProcess(proc)
        try:
            await daemon.wait_for("daemon_ready", 120)
            out["ready_s"] = time.perf_counter() - t0
            sock = base / "control.sock"
            if full:
                await asyncio.sleep(3)  # past start-up's first passes
                await _settled(sock)
                c0 = _cpu_s(proc.pid)
                await asyncio.sleep(IDLE_WINDOW)
                out["idle_cpu"] = (_cpu_s(proc.pid) - c0) / IDLE_WINDOW
                out["rss_rest"] = _rss_mb(proc.pid)
                out |= await _status_figures(sock, proc.pid)
                out["cli_status"] = statistics.median([await _cli(sock) for _ in range(3)])
                out["cli_json"] = statistics.median([await _cli(sock, "--json") for _ in range(3)])
                out["cli_all"] = statistics.median([await _cli(sock, "--all") for _ in range(3)])
            out["overran"] = clock.now() > first
            log = base / "state" / "destroys.log"
            give_up = time.time() + (first - clock.now() + window).total_seconds() + 240
            while time.time() < give_up and len(_destroys(log).keys() & planted_at) < planted:
                await asyncio.sleep(0.2)
            called = _destroys(log)
            lags = [called[p] - due.timestamp() for p, due in planted_at.items() if p in called]
            out["missed"] = planted - len(lags)
            out["early"] = sum(1 for lag in lags if lag < 0)
            out["lag_p50"] = statistics.median(lags) if lags else float("nan")
            out["lag_p99"] = _q(lags, 0.99)
            out["lag_max"] = max(lags, default=float("nan"))
            out["stalls"] = len(daemon.named("loops_stalled"))
        finally:
            with contextlib.suppress(Exception):
                await daemon.stop(30)
    return out


@pytest.mark.parametrize("count", SIZES)
async def test_scale(count: int) -> None:
    got = await _run(count, min(PLANTED, count), WINDOW, full=True)
    RESULTS[f"{count:,}"] = got
    print(f"\n{count:,} live instances: " + ", ".join(f"{k} {_fmt(k, v)}" for k, v in got.items()))
    assert got["early"] == 0, "a destroy came before its deadline"


async def test_burst() -> None:
    count, window = BURST
    got = await _run(count, count, window, full=False)
    RESULTS[f"burst {count:,} in {window.total_seconds():g} s"] = got
    print("\nburst: " + ", ".join(f"{k} {_fmt(k, v)}" for k, v in got.items()))
    assert got["early"] == 0


COLUMNS = [
    ("lag_p50", "lag p50"),
    ("lag_p99", "lag p99"),
    ("lag_max", "lag max"),
    ("missed", "missed"),
    ("ready_s", "to READY"),
    ("guard_pass_first", "guard pass 1st"),
    ("guard_pass_next", "guard pass next"),
    ("idle_cpu", "idle CPU"),
    ("rss_rest", "RSS rest"),
    ("rss_8_status", "RSS 8 status"),
    ("status_p50", "status p50"),
    ("status_p99", "status p99"),
    ("cli_status", "CLI status"),
    ("cli_json", "CLI --json"),
    ("all_p50", "status --all p50"),
    ("all_p99", "status --all p99"),
    ("cli_all", "CLI --all"),
    ("stalls", "stalls"),
]


def _fmt(key: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    if value == float("inf"):
        return "failed"
    if key.startswith("rss"):
        return f"{value:.0f} MB"
    if key == "idle_cpu":
        return f"{value * 100:.1f}%"
    if isinstance(value, bool | int):
        return str(value)
    if value >= 1:
        return f"{value:.2f} s"
    return f"{value * 1000:.1f} ms"


def _row(cells: list[str], widths: list[int]) -> str:
    return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"


def test_print_table() -> None:
    if not RESULTS:
        pytest.skip("no scale figures (run with the other tests)")
    rows = list(RESULTS)
    widths = [max(22, *(len(r) for r in rows)), *(max(len(h), 9) for _, h in COLUMNS)]
    lines = [_row(["", *(h for _, h in COLUMNS)], widths), _row(["-" * w for w in widths], widths)]
    for r in rows:
        cells = [r, *(_fmt(k, RESULTS[r].get(k)) for k, _ in COLUMNS)]
        lines.append(_row(cells, widths))
    small, big = RESULTS.get("1,000"), RESULTS.get("10,000")
    if small and big:
        growth = ["growth 1,000 -> 10,000"]
        for k, _ in COLUMNS:
            a, b = small.get(k), big.get(k)
            ok = isinstance(a, float) and isinstance(b, float) and a > 0
            growth.append(f"x{b / a:.1f}" if ok else "-")  # type: ignore[operator]
        lines.append(_row(growth, widths))
    load = Path("/proc/loadavg").read_text().split()[:3]
    print(f"\nnproc {os.cpu_count()}, load {' '.join(load)}\n" + "\n".join(lines))
