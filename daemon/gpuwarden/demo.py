"""`make demo` (`python -m gpuwarden.demo`): the daemon on the example config, end to end.

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
import sys
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpuwarden import demo_jobs
from gpuwarden.childproc import ChildFailed, DaemonProcess
from gpuwarden.clock import SystemClock

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


async def stop_daemon(demo: Demo) -> str:
    code = await demo.stop_daemon()
    if code != 0:
        raise DemoFailed(f"the daemon exited {code}, expected 0")
    stopped = await demo.wait_for("daemon_stopped", timeout=1)
    return f"stopped cleanly (exit {code}, {stopped.get('event')})"


Step = tuple[str, Callable[[Demo], Awaitable[str]]]

STEPS: list[Step] = [
    ("Check the example configuration", check_config),
    ("Start the daemon on it", start_daemon),
    ("Wait until it reports ready", wait_ready),
    ("Ask it how it is (gpuwarden info)", ask_info),
    # The job steps (engineer F, demo_jobs.py): three jobs on the sim cloud, one cancelled.
    ("Submit three jobs (gpuwarden submit)", demo_jobs.submit_jobs),
    ("Watch them run; cancel the third midway (gpuwarden cancel)", demo_jobs.watch_jobs),
    ("The images (gpuwarden job)", demo_jobs.show_images),
    ("Wait for the instances to be given back (gpuwarden status)", demo_jobs.wait_instances_ended),
    ("What ended and why (gpuwarden history)", demo_jobs.show_history),
    ("What it cost (gpuwarden costs)", demo_jobs.show_costs),
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
        "PYTHONUNBUFFERED": "1",
    }
    return env


def find_config(explicit: str | None) -> Path:
    if explicit:
        return Path(explicit).resolve()
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
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
        prog="python -m gpuwarden.demo",
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
