"""Benchmark (`make bench`): submit-to-running overhead on a warm instance.

The real daemon (`gpuwarden run`, as a process: the Supervisor and every loop) on the
in-process simulated cloud, its boot shrunk to 0.2 s and each job to a few preview steps of
10 ms. A first job rents an instance and leaves it warm (keep_warm 1 h, max_instances 1, so
nothing else is rented); then JOBS jobs are submitted over the control socket one at a time,
each after the previous one has ended (the daemon's own `instance_warm` log line, which the
jobs loop writes after a job: no polling). For each job, from `jobs.submit` returning (this
process's wall clock) to:

- running: the job's `running` transition event, as the daemon recorded it in the store;
- command started: the mtime of the job's `pid` file in the sim sandbox, which the detached
  wrapper writes as the command starts (remote/ssh.py);
- done, minus the job's own run: the job's terminal event, less the command's run time (the
  `exit` file's mtime minus the `pid` file's): how soon the runner notices the end (between
  two status reads, jobs.progress_interval apart, 1 s here, it waits on the instance for the
  end) and fetches the image;
- the job's own run, for scale, and when it was assigned (its `provisioning` event).

All of these are the same machine's wall clock. p50 / p99 / max are printed as a table, with
the load average. Only the small fleet is measured: the scale bench's seeded instances live
on the FakeProvider (no SSH hosts) and its 100,000 queued jobs would be ahead of the
submitted ones in the queue, so a warm-instance figure among them needs a daemon wired with
both clouds and the queue reordered; see the README's Performance section.

GPUWARDEN_BENCH_WARM_JOBS sets the number of measured jobs (default 30).
"""

from __future__ import annotations

import json
import os
import sqlite3
import statistics
import time
from datetime import datetime
from pathlib import Path

from tests.conftest import daemon_env, short_tmp

from gpuwarden.cli.client import ControlClient
from gpuwarden.jobs.spec import remote_dir
from gpuwarden.system.childproc import DaemonProcess

JOBS = int(os.environ.get("GPUWARDEN_BENCH_WARM_JOBS", "30"))
STEPS = 2
TIMEOUT = 60.0  # seconds for one job, however loaded the machine
NAMES = {
    "assigned": "submit -> assigned (provisioning event)",
    "started": "submit -> command started (pid file)",
    "running": "submit -> running (job event)",
    "done_over": "submit -> done, minus the job's run",
    "run": "the job's run (pid -> exit file)",
}


def _config(base: Path) -> Path:
    path = base / "config.toml"
    path.write_text(
        f"""
[daemon]
state_dir = "{base / "state"}"
socket = "{base / "control.sock"}"
shutdown_timeout = "5s"
[providers.sim]
enabled = true
boot_delay = "0.2s"
sandbox_dir = "{base / "sim"}"
[jobs]
keep_warm = "1h"
max_instances = 1
steps = {STEPS}
width = 64
height = 64
preview_step_delay = "0.01s"
output_dir = "{base / "out"}"
"""
    )
    return path


async def _one(daemon: DaemonProcess, client: ControlClient, n: int) -> tuple[str, float]:
    """Submit a job and wait for the daemon to say it is done. (job id, submit returned at)"""
    mark = len(daemon.events)
    got = await client.call("jobs.submit", {"prompt": f"a lighthouse, take {n}", "seed": n})
    returned = time.time()
    await daemon.wait_for("instance_warm", TIMEOUT, after=mark)
    return str(got["id"]), returned


def _at(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def _figures(base: Path, submitted: dict[str, float]) -> dict[str, list[float]]:
    conn = sqlite3.connect(f"file:{base / 'state' / 'gpuwarden.db'}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT entity_id, to_state, at FROM events WHERE kind = 'job' AND to_state IS NOT NULL"
        ).fetchall()
        instances = {r[0] for r in conn.execute("SELECT instance_id FROM jobs")}
        states = {r[0] for r in conn.execute("SELECT state FROM jobs")}
    finally:
        conn.close()
    assert states == {"succeeded"}, states
    assert len(instances) == 1, f"every job should run on the one warm instance: {instances}"
    seen: dict[tuple[str, str], float] = {(jid, to): _at(at) for jid, to, at in rows}
    out: dict[str, list[float]] = {k: [] for k in NAMES}
    for jid, t0 in submitted.items():
        [job_dir] = (base / "sim").glob(f"*/**/{Path(remote_dir(jid)).name}")
        began, ended = (job_dir / "pid").stat().st_mtime, (job_dir / "exit").stat().st_mtime
        out["assigned"].append(seen[(jid, "provisioning")] - t0)
        out["running"].append(seen[(jid, "running")] - t0)
        out["started"].append(began - t0)
        out["done_over"].append(seen[(jid, "succeeded")] - t0 - (ended - began))
        out["run"].append(ended - began)
    return out


def _q(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def test_submit_to_running_on_a_warm_instance() -> None:
    with short_tmp() as base:
        daemon = await DaemonProcess.start(_config(base), daemon_env())
        submitted: dict[str, float] = {}
        try:
            await daemon.wait_for("daemon_ready", TIMEOUT)
            async with ControlClient(base / "control.sock") as client:
                await _one(daemon, client, 0)  # rents the instance; it stays warm
                for n in range(1, JOBS + 1):
                    jid, t0 = await _one(daemon, client, n)
                    submitted[jid] = t0
        finally:
            await daemon.stop(30)
        figures = _figures(base, submitted)
    width = max(len(label) for label in NAMES.values())
    lines = [f"| {'':{width}} | {'p50':>10} | {'p99':>10} | {'max':>10} |"]
    lines.append("| " + " | ".join(["-" * width, *["-" * 10] * 3]) + " |")
    for key, label in NAMES.items():
        v = figures[key]
        cells = [statistics.median(v), _q(v, 0.99), max(v)]
        lines.append(
            f"| {label:{width}} | " + " | ".join(f"{c * 1000:7.1f} ms" for c in cells) + " |"
        )
    load = Path("/proc/loadavg").read_text().split()[:3]
    print(f"\n{JOBS} jobs on a warm sim instance; nproc {os.cpu_count()}, load {' '.join(load)}")
    print("\n".join(lines))
    print(json.dumps({k: round(statistics.median(v), 4) for k, v in figures.items()}))
    # The order the figures must come in, whatever the load: a sanity check, not a goal.
    assert all(s <= r + 0.05 for s, r in zip(figures["started"], figures["running"], strict=True))
    assert all(v > 0 for v in figures["running"])
