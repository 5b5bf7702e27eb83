"""`gpuwarden sim`: run the simulated cloud in the foreground until SIGINT/SIGTERM, then print
its billing ledger (the ground truth of what the simulated instances cost)."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used: other commands must not pay for pydantic-settings
    from gpuwarden.config.settings import SimSettings


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "sim",
        help="run the simulated GPU cloud (Vast.ai and Lambda APIs, SSH hosts) in the foreground",
        description=(
            "Serve Vast.ai- and Lambda Cloud-compatible APIs on loopback; every launched "
            "instance is a real SSH server on its own port. Prints the billing ledger at exit."
        ),
    )
    p.add_argument(
        "--port", type=int, metavar="N", help="HTTP port (default: providers.sim.port, 0 = any)"
    )
    p.add_argument(
        "--config", metavar="PATH", help="config file; its [providers.sim] settings are used"
    )
    p.add_argument(
        "--boot-delay", metavar="DURATION", help="time from launch until SSH answers, e.g. 2s"
    )
    p.add_argument(
        "--sandbox", metavar="DIR", help="directory for instance sandboxes (default: a temp dir)"
    )
    p.add_argument(
        "--ssh",
        choices=("asyncssh", "openssh"),
        help="what serves the instances' SSH (openssh: a real sshd each; needs root)",
    )
    p.add_argument(
        "--outbid-rate",
        type=float,
        metavar="N",
        help="outbid running spot instances at random, N per hour each (faults.outbid_rate);"
        " POST /_sim/instances/ID/outbid outbids one now",
    )
    p.add_argument("--json", action="store_true", help="print the URLs and the ledger as JSON")
    p.set_defaults(func=run)


def _settings(args: argparse.Namespace) -> SimSettings:
    from gpuwarden.config.durations import parse_duration
    from gpuwarden.config.settings import SimFaultSettings, SimSettings, load

    sim = SimSettings()
    if args.config:
        sim = load(args.config).providers.sim
    updates: dict[str, Any] = {}
    if args.port is not None:
        updates["port"] = args.port
    if args.boot_delay:
        updates["boot_delay"] = parse_duration(args.boot_delay)
    if args.sandbox:
        updates["sandbox_dir"] = Path(args.sandbox)
    if args.ssh:
        updates["ssh"] = args.ssh
    if args.outbid_rate is not None:
        faults = {**sim.faults.model_dump(), "outbid_rate": args.outbid_rate}
        updates["faults"] = SimFaultSettings.model_validate(faults)
    return sim.model_copy(update=updates) if updates else sim


def run(args: argparse.Namespace) -> int:
    from gpuwarden.config.settings import EX_CONFIG, ConfigError

    try:
        settings = _settings(args)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return EX_CONFIG
    except ValueError as exc:
        print(f"gpuwarden sim: {exc}", file=sys.stderr)
        return 2
    if settings.ssh == "openssh":
        from gpuwarden.sim.openssh import unavailable_reason

        if (reason := unavailable_reason()) is not None:
            print(f"gpuwarden sim: --ssh openssh: {reason}", file=sys.stderr)
            return EX_CONFIG
    return asyncio.run(_serve(settings, as_json=args.json))


async def _serve(settings: SimSettings, *, as_json: bool) -> int:
    from gpuwarden.config.settings import SIM_DEFAULT_KEY
    from gpuwarden.sim import SimCloud
    from gpuwarden.sim.ledger import render
    from gpuwarden.system import logs as gw_logging

    # Logs to stderr: stdout carries only the URLs and the ledger (scriptable with --json).
    gw_logging.configure(stream=sys.stderr)

    # Sandboxes are kept after exit for inspection (what ran, onstart.log, outputs).
    root = settings.sandbox_dir or Path(tempfile.mkdtemp(prefix="gpuwarden-sim-"))
    cloud = SimCloud(settings, sandbox_root=root)
    urls = await cloud.start()
    key_hint = "the providers.sim.api_key setting" if settings.api_key else SIM_DEFAULT_KEY
    if as_json:
        info = {"vast": urls.vast, "lambda": urls.lambda_, "admin": urls.admin,
                "api_key": key_hint, "sandbox": str(root)}  # fmt: skip
        print(json.dumps(info), flush=True)
    else:
        print(f"vast:    {urls.vast}", flush=True)
        print(f"lambda:  {urls.lambda_}", flush=True)
        print(f"admin:   {urls.admin}/_sim/ledger  {urls.admin}/_sim/faults", flush=True)
        print(f"api key: {key_hint}", flush=True)
        print(f"sandbox: {root}", flush=True)
        print("Ctrl-C stops the sim and prints the ledger", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        ledger = await cloud.stop()
    print(json.dumps(ledger) if as_json else render(ledger), flush=True)
    return 0
