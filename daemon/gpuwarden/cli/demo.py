"""`make demo` (`python -m gpuwarden.cli.demo`): the daemon on the example config, end to end.

It makes a temporary state directory, starts `gpuwarden run --config config.example.toml`
as a child process (the simulated cloud only: nothing is rented), shows the daemon's log
events as they happen, runs a list of steps, stops the daemon with SIGTERM and prints a
summary. Everything it made is removed afterwards unless --keep is given.

To add a step, write `async def my_step(demo: Demo) -> str` (return a one-line outcome,
raise DemoFailed to stop the demo) and put it into STEPS. `demo.gpuwarden(...)` runs a CLI
command against the running daemon; `demo.wait_for("event_name")` waits for a log event;
`demo.daemon.events` holds every event so far; `demo.notes` carries results between steps.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import struct
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from gpuwarden.cli.client import ControlClient
from gpuwarden.cli.commands_jobs import TERMINAL
from gpuwarden.cli.commands_views import status_rows
from gpuwarden.cli.demo_spot import outbid_when_running
from gpuwarden.core.clock import SystemClock
from gpuwarden.system.childproc import ChildFailed, DaemonProcess

READY_TIMEOUT = 60.0  # seconds; start-up includes the in-process sim cloud
STOP_TIMEOUT = 15.0
QUIET_KEYS = frozenset({"timestamp", "level", "logger", "event"})
INDENT = "      "


class DemoFailed(Exception):
    """A step could not do what it shows; the message says what went wrong."""


@dataclass
class Demo:
    """What the steps share: paths, the child's environment and the running daemon."""

    config: Path
    workdir: Path
    env: dict[str, str]
    verbose: bool = True
    daemon: DaemonProcess | None = None
    notes: dict[str, Any] = field(default_factory=dict)  # steps may leave results here

    @property
    def state_dir(self) -> Path:
        return self.workdir / "state"

    @property
    def socket(self) -> Path:
        return self.workdir / "control.sock"

    def say(self, text: str) -> None:
        print(f"{INDENT}{text}", flush=True)

    async def gpuwarden(self, *args: str, check: bool = True) -> tuple[int, str, str]:
        """Run `gpuwarden ARGS` with the demo's environment; returns (code, stdout, stderr)."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gpuwarden",
            *args,
            env=self.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        code = proc.returncode if proc.returncode is not None else -1
        if check and code != 0:
            raise DemoFailed(f"gpuwarden {' '.join(args)} exited {code}: {err.decode().strip()}")
        return code, out.decode(), err.decode()

    async def start_daemon(self) -> DaemonProcess:
        self.daemon = await DaemonProcess.start(
            self.config,
            self.env,
            on_event=self._show if self.verbose else None,
            on_stderr=lambda line: print(f"{INDENT}daemon ! {line}", flush=True),
        )
        return self.daemon

    def _show(self, event: dict[str, Any]) -> None:
        print(f"{INDENT}daemon | {describe(event)}", flush=True)

    async def wait_for(self, name: str, timeout: float = READY_TIMEOUT) -> dict[str, Any]:
        """The first log event called `name` (waiting up to `timeout` s for it)."""
        if self.daemon is None:
            raise DemoFailed("the daemon is not running")
        try:
            return await self.daemon.wait_for(name, timeout)
        except ChildFailed as exc:
            raise DemoFailed(str(exc)) from None

    async def stop_daemon(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, then the exit code (SIGKILL and DemoFailed if it does not come in time)."""
        if self.daemon is None:
            return 0
        try:
            return await self.daemon.stop(timeout)
        except ChildFailed as exc:
            raise DemoFailed(f"{exc}; killed") from None


def describe(event: dict[str, Any]) -> str:
    """One readable line for a log event: `event key=value ...`, level when not info."""
    if event.get("event") == "output":
        return str(event.get("text", ""))
    level = str(event.get("level", "info"))
    head = str(event.get("event", "?")) + ("" if level == "info" else f" [{level}]")
    parts = [head]
    for key, value in event.items():
        if key not in QUIET_KEYS:
            text = value if isinstance(value, str) else json.dumps(value)
            parts.append(f"{key}={text}")
    return " ".join(parts)


# --- steps -----------------------------------------------------------------------------------


async def check_config(demo: Demo) -> str:
    code, out, _ = await demo.gpuwarden("check-config", "--json", str(demo.config))
    providers = json.loads(out)["providers"]
    enabled = [name for name, section in providers.items() if section.get("enabled")]
    return f"valid (check-config exited {code}); providers enabled: {', '.join(enabled) or 'none'}"


async def start_daemon(demo: Demo) -> str:
    daemon = await demo.start_daemon()
    return f"started: pid {daemon.pid}"


async def wait_ready(demo: Demo) -> str:
    ready = await demo.wait_for("daemon_ready")
    providers = ", ".join(ready.get("providers") or []) or "none"
    services = ", ".join(ready.get("services") or []) or "none"
    return f"ready: loops {services}; providers {providers}"


async def ask_info(demo: Demo) -> str:
    _, out, _ = await demo.gpuwarden("info", "--json")
    info = json.loads(out)
    loops = info.get("heartbeats") or {}
    fresh = ", ".join(f"{name} {age:.1f}s ago" for name, age in sorted(loops.items()))
    return f"answers on its socket: pid {info.get('pid')}; loop heartbeats: {fresh or 'none'}"


async def open_dashboard(demo: Demo) -> str:
    """`gpuwarden dashboard` prints the URL (with its token); check that the page is served."""
    _, out, _ = await demo.gpuwarden("dashboard", "--config", str(demo.config), "--json")
    url = json.loads(out)["url"]
    base, _, token = url.partition("/?token=")
    demo.notes["dashboard"] = (base, unquote(token))
    async with _dashboard_get(demo, "/api/state") as r:
        if r.status != 200:
            raise DemoFailed(f"the dashboard answered {r.status} to its own token")
    print(f"\n  Dashboard: {url}\n  (open it now to watch the jobs live)\n", flush=True)
    return f"serving at {base}/ (gpuwarden dashboard prints the URL with its token)"


@contextlib.asynccontextmanager
async def _dashboard_get(demo: Demo, path: str) -> AsyncIterator[Any]:
    """GET a dashboard path with the token as a bearer (the response, open)."""
    import aiohttp

    base, token = demo.notes["dashboard"]
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as http, http.get(base + path, headers=headers) as r:
        yield r


async def dashboard_live(demo: Demo) -> str:
    """The page's live feed (its event stream) carries the jobs' events, and its state lists
    every job the demo submitted."""
    ids: list[str] = demo.notes["jobs"]
    seen = None
    async with _dashboard_get(demo, "/api/events") as r:
        try:
            async with asyncio.timeout(WATCH_TIMEOUT):
                while seen is None:
                    line = (await r.content.readline()).decode()
                    if line.startswith("data: "):
                        event = json.loads(line.removeprefix("data: "))
                        if event.get("entity_id") in ids:
                            seen = event
        except TimeoutError:
            raise DemoFailed("no job event reached the dashboard's stream") from None
    async with _dashboard_get(demo, "/api/state") as r:
        listed = {j["id"] for j in (await r.json())["jobs"]}
    if not set(ids) <= listed:
        raise DemoFailed(f"the dashboard lists {sorted(listed)}, not every job of {ids}")
    return f"live: {seen['entity_id']} {seen['name']} arrived on its event stream; all jobs listed"


async def stop_daemon(demo: Demo) -> str:
    code = await demo.stop_daemon()
    if code != 0:
        raise DemoFailed(f"the daemon exited {code}, expected 0")
    stopped = await demo.wait_for("daemon_stopped", timeout=1)
    return f"stopped cleanly (exit {code}, {stopped.get('event')})"


# --- the job steps: submit three jobs (on spot instances: jobs.interruptible), watch them
# (the first one's instance outbid as soon as it runs, through the sim's admin API, so that the
# job runs again elsewhere; the third cancelled midway), show the images, then `status`,
# `history` and `costs` (what spot saved, what the preemption cost) once every instance has
# been given back.

JOBS = [
    # (prompt, steps, seed): the first is outbid as soon as it runs (its progress is read
    # every second: it needs steps enough to be still running then) and runs again
    # elsewhere; the third runs long enough to be cancelled midway
    ("a lighthouse on a cliff at dusk, oil painting", 16, 1),
    ("a red fox in fresh snow, '; touch pwned; ' $(touch pwned)", 8, 2),
    ("a very slow watercolour of a harbour", 60, 3),
]
OUTBID, SUCCEED, CANCEL = 0, 1, 2  # the jobs' parts in the story
WATCH_TIMEOUT = 40.0


async def submit_jobs(demo: Demo) -> str:
    ids = []
    for n, (prompt, steps, seed) in enumerate(JOBS):
        _, out, _ = await demo.gpuwarden(
            "submit", "--prompt", prompt, "--steps", str(steps), "--seed", str(seed), "--json"
        )
        job = json.loads(out)
        ids.append(job["id"])
        demo.say(f"gpuwarden submit --prompt {prompt[:30]!r}... -> {job['id']} ({job['state']})")
        if n == OUTBID:  # watched from now on: the next submits may outlast its first steps
            outbid = outbid_when_running(
                demo.socket, _sim_url(demo), job["id"], say=demo.say, timeout=WATCH_TIMEOUT
            )
            demo.notes["outbid"] = asyncio.create_task(outbid)
    demo.notes["jobs"] = ids
    return f"three jobs queued: {', '.join(ids)}"


def _sim_url(demo: Demo) -> str:
    """Where the daemon's in-process sim cloud listens (its sim_started log event)."""
    started = next(iter(demo.daemon.named("sim_started")), {}) if demo.daemon else {}
    if not started.get("url"):
        raise DemoFailed("the daemon did not log where its sim cloud listens")
    return str(started["url"])


async def watch_jobs(demo: Demo) -> str:
    """Follow the jobs through their states (the first one's spot instance is outbid as soon
    as it runs, and the job runs again elsewhere); cancel the third once it is a few steps in."""
    ids: list[str] = demo.notes["jobs"]
    victim = ids[CANCEL]
    cancelled = False
    seen: dict[str, tuple[str, int]] = {}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WATCH_TIMEOUT
    async with ControlClient(demo.socket) as client:
        while True:
            jobs = {j["id"]: j for j in await client.call("jobs.list", {"limit": 100})}
            for jid in ids:
                job = jobs[jid]
                now = (job["state"], job["progress"]["step"])
                if seen.get(jid) != now:
                    seen[jid] = now
                    total = job["progress"]["total"]
                    where = f" step {now[1]} of {total}" if job["state"] == "running" else ""
                    inst = f" on {job['instance_id']}" if job["instance_id"] else ""
                    demo.say(f"job {jid}: {job['state']}{where}{inst}")
            if not cancelled and jobs[victim]["progress"]["step"] >= 5:
                _, out, _ = await demo.gpuwarden("cancel", victim)
                demo.say(f"gpuwarden cancel {victim} -> {out.strip()}")
                cancelled = True
            if all(jobs[j]["state"] in TERMINAL for j in ids):
                break
            if loop.time() > deadline:
                raise DemoFailed(f"the jobs did not finish within {WATCH_TIMEOUT:.0f} s")
            await asyncio.sleep(0.25)
    states = [seen[j][0] for j in ids]
    if states != ["succeeded", "succeeded", "cancelled"]:
        raise DemoFailed(f"expected succeeded, succeeded, cancelled; got {', '.join(states)}")
    if not await demo.notes["outbid"]:
        raise DemoFailed(f"job {ids[OUTBID]} was not running on a spot instance to outbid")
    preempted = jobs[ids[OUTBID]].get("preemptions", 0)
    if preempted != 1:
        raise DemoFailed(f"expected the first job to recover from one preemption, not {preempted}")
    return (
        "two succeeded (the first after its spot instance was outbid: run again elsewhere),"
        " the third was cancelled midway (its remote process killed)"
    )


def _describe(path: Path) -> str:
    data = path.read_bytes()
    width, height = struct.unpack(">II", data[16:24])
    return f"{path}  {len(data)} bytes, {width}x{height} PNG"


async def show_images(demo: Demo) -> str:
    lines = []
    for jid in (demo.notes["jobs"][OUTBID], demo.notes["jobs"][SUCCEED]):
        _, out, _ = await demo.gpuwarden("job", jid, "--json")
        job: dict[str, Any] = json.loads(out)
        for name in job["outputs"]:
            path = Path(name)
            lines.append(path)
            demo.say(_describe(path))
            result = job["result"]
            demo.say(
                f"  sha256 {result['files'][0]['sha256'][:16]}..., engine {result['engine']},"
                f" GPU {job['gpu_seconds']:.1f} s, cost ${job['cost']:.6f}"
            )
    pwned = list(demo.workdir.rglob("pwned"))
    if pwned:
        raise DemoFailed(f"a prompt ran as a command: {pwned}")
    return f"{len(lines)} images on disk, checksums verified; no prompt ran as a command"


async def wait_instances_ended(demo: Demo) -> str:
    """Instances are kept warm for the keep-warm window (keep_warm auto), then ended."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    async with ControlClient(demo.socket) as client:
        while True:
            if not status_rows(await client.call("status", {"limit": 1})):
                break
            if loop.time() > deadline:
                raise DemoFailed("instances are still live 20 s after the last job")
            await asyncio.sleep(0.25)
    _, out, _ = await demo.gpuwarden("status")
    for line in out.rstrip().splitlines():
        demo.say(line)
    return "no instance left running: each was kept warm briefly, then ended"


async def show_history(demo: Demo) -> str:
    _, out, _ = await demo.gpuwarden("history")
    for line in out.rstrip().splitlines():
        demo.say(line)
    _, js, _ = await demo.gpuwarden("history", "--json")
    rows = json.loads(js)
    rows = rows if isinstance(rows, list) else rows.get("terminations", [])
    reasons = sorted({str(r.get("reason")) for r in rows})
    return f"{len(rows)} instance(s) ended, reasons: {', '.join(reasons) or 'none'}"


async def show_costs(demo: Demo) -> str:
    _, out, _ = await demo.gpuwarden("costs")
    for line in out.rstrip().splitlines():
        demo.say(line)
    return "costs shown"


Step = tuple[str, Callable[[Demo], Awaitable[str]]]

STEPS: list[Step] = [
    ("Check the example configuration", check_config),
    ("Start the daemon on it", start_daemon),
    ("Wait until it reports ready", wait_ready),
    ("Ask it how it is (gpuwarden info)", ask_info),
    ("Open the dashboard (gpuwarden dashboard)", open_dashboard),
    # Three jobs on the sim cloud's spot instances: the first outbid as soon as it runs and
    # run again elsewhere, the third cancelled midway.
    ("Submit three jobs (gpuwarden submit)", submit_jobs),
    ("The dashboard shows them live", dashboard_live),
    ("Watch them run; the first outbid, the third cancelled (gpuwarden cancel)", watch_jobs),
    ("The images (gpuwarden job)", show_images),
    ("Wait for the instances to be given back (gpuwarden status)", wait_instances_ended),
    ("What ended and why (gpuwarden history)", show_history),
    ("What it cost (gpuwarden costs)", show_costs),
    ("Stop it with SIGTERM", stop_daemon),
]


# --- driver ----------------------------------------------------------------------------------


def demo_env(workdir: Path) -> dict[str, str]:
    """The child's environment: paths in the temporary dir and short intervals."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("GPUWARDEN_")
        and k not in ("NOTIFY_SOCKET", "JOURNAL_STREAM", "WATCHDOG_USEC", "WATCHDOG_PID")
        and k != "CREDENTIALS_DIRECTORY"
    }
    env |= {
        "GPUWARDEN_DAEMON__STATE_DIR": str(workdir / "state"),
        "GPUWARDEN_DAEMON__SOCKET": str(workdir / "control.sock"),
        "GPUWARDEN_SOCKET": str(workdir / "control.sock"),  # where `gpuwarden ...` commands go
        "GPUWARDEN_DAEMON__SHUTDOWN_TIMEOUT": "5s",
        "GPUWARDEN_POLICY__POLL_INTERVAL": "2s",
        "GPUWARDEN_PROVIDERS__SIM__BOOT_DELAY": "0.5s",
        "GPUWARDEN_DASHBOARD__LISTEN": f"127.0.0.1:{free_port()}",
        "PYTHONUNBUFFERED": "1",
    }
    return env


def free_port() -> int:
    """A loopback port free now (the daemon binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_config(explicit: str | None) -> Path:
    if explicit:
        return Path(explicit).resolve()
    for base in (Path.cwd(), Path(__file__).resolve().parents[3]):
        candidate = base / "config.example.toml"
        if candidate.is_file():
            return candidate
    raise SystemExit("config.example.toml not found; pass --config PATH")


async def run_demo(
    config: Path, *, keep: bool = False, steps: Sequence[Step] = STEPS, verbose: bool = True
) -> int:
    clock = SystemClock()
    workdir = Path(tempfile.mkdtemp(prefix="gpuwarden-demo-"))
    demo = Demo(config=config, workdir=workdir, env=demo_env(workdir), verbose=verbose)
    print("gpuwarden demo")
    print(f"  config    {config}")
    print(f"  state dir {demo.state_dir}")
    results: list[tuple[str, bool, str, float]] = []
    try:
        for n, (title, step) in enumerate(steps, start=1):
            print(f"\n[{n}/{len(steps)}] {title}", flush=True)
            began = clock.monotonic()
            try:
                outcome = await step(demo)
            except DemoFailed as exc:
                results.append((title, False, str(exc), clock.monotonic() - began))
                demo.say(f"FAILED: {exc}")
                break
            results.append((title, True, outcome, clock.monotonic() - began))
            demo.say(outcome)
    finally:
        with contextlib.suppress(DemoFailed):
            await demo.stop_daemon()
        if keep:
            print(f"\nkept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    ok = len(results) == len(steps) and all(r[1] for r in results)
    print("\nSummary")
    for title, passed, outcome, secs in results:
        print(f"  {'ok ' if passed else 'FAIL'} {title} ({secs:.1f} s): {outcome}")
    for title, _ in steps[len(results) :]:
        print(f"  --   {title}: not run")
    print("\nThe demo ran end to end." if ok else "\nThe demo failed; see above.")
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gpuwarden.cli.demo",
        description="Start the daemon on the example config in a temporary state dir, show "
        "what it does, and stop it cleanly (what `make demo` runs).",
    )
    parser.add_argument("--config", help="config file (default: ./config.example.toml)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--quiet", action="store_true", help="do not echo the daemon's log")
    args = parser.parse_args(argv)
    return asyncio.run(run_demo(find_config(args.config), keep=args.keep, verbose=not args.quiet))


if __name__ == "__main__":
    sys.exit(main())
