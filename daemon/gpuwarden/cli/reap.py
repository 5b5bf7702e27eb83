"""`gpuwarden reap`: the emergency brake, with no daemon.

It reads the config, builds the provider clients itself, lists every instance whose label
carries our prefix (`gpuwarden-<installation>-`) at each enabled provider, shows them, and
destroys them on confirmation (or --yes). Then, if the daemon's lock is free (the daemon is
down), it opens the database and records what it did: known instances go to TERMINATED with
reason manual (so `history` shows them), unknown ones get a `reaped` event in the log.
With the daemon up, it leaves the database alone (the daemon's reconciler sees the
instances vanish) and says so.

The sim cloud normally runs inside the daemon and dies with it; reap reaches a standalone
`gpuwarden sim` through providers.sim.base_url, or providers.sim.host and a fixed port.

Exit codes: 0 nothing left to reap, 1 something could not be listed or destroyed (or the
user declined), 78 bad config.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gpuwarden.cli.commands_daemon import CONFIG_HELP
from gpuwarden.cli.output import EX_DOMAIN, EX_OK, Out, Styled, iso_utc, local_time, rate

if TYPE_CHECKING:  # imported where used: `gpuwarden status` must not pay for them
    from gpuwarden.config.settings import Settings
    from gpuwarden.core.clock import SystemClock
    from gpuwarden.providers.base import Provider, ProviderInstance


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "reap",
        help="emergency: destroy every instance with our label, straight through the APIs",
        description=(
            "Without the daemon: list every instance labelled gpuwarden-<installation>- at "
            "each enabled provider and destroy them. Records what it did in the database "
            "when the daemon is not running."
        ),
        epilog=(
            "exit codes: 0 nothing of ours is left, 1 something could not be listed or "
            "destroyed (or you declined), 78 invalid config"
        ),
    )
    p.add_argument("--config", metavar="PATH", help=CONFIG_HELP)
    p.add_argument("--yes", "-y", action="store_true", help="destroy without asking")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=main)


@dataclass
class Report:
    found: list[ProviderInstance] = field(default_factory=list)
    destroyed: list[ProviderInstance] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (what, why)
    recorded: str = "not attempted"

    def to_json(self) -> dict[str, Any]:
        return {
            "found": [_pi_json(p) for p in self.found],
            "destroyed": [_pi_json(p) for p in self.destroyed],
            "failed": [{"what": w, "error": e} for w, e in self.failed],
            "recorded": self.recorded,
        }


def _pi_json(p: ProviderInstance) -> dict[str, Any]:
    return {
        "provider": p.provider,
        "provider_id": p.provider_id,
        "label": p.label,
        "state": p.state.value,
        "gpu": p.gpu_name,
        "price_per_hour": p.price_per_hour,
        "started_at": iso_utc(p.started_at),
    }


def main(args: argparse.Namespace) -> int:
    from gpuwarden.config.settings import EX_CONFIG, ConfigError, load

    out = Out(args.json)
    from gpuwarden.system import logs as gw_logging

    # Warnings and errors only, on stderr: stdout carries the table or the JSON.
    gw_logging.configure(mode="console", level="warning", stream=sys.stderr)
    try:
        settings = load(args.config)
    except ConfigError as exc:
        out.error(exc.render())
        return EX_CONFIG
    gw_logging.register_secrets_from(settings)
    try:
        return asyncio.run(reap(settings, out, yes=args.yes))
    except KeyboardInterrupt:
        return 130


async def reap(settings: Settings, out: Out, *, yes: bool) -> int:
    from gpuwarden.config.settings import EX_CONFIG, ConfigError
    from gpuwarden.core.clock import SystemClock
    from gpuwarden.core.model import label_prefix
    from gpuwarden.fleet.installation import LabelUnreadable
    from gpuwarden.providers.base import ProviderState

    clock = SystemClock()
    report = Report()
    try:
        prefix = label_prefix(_installation(settings))
    except LabelUnreadable as exc:  # not a guess: "main" would find none of ours
        report.failed.append(("read the installation label", str(exc)))
        out.error(f"cannot tell which instances are ours: no installation label from {exc}")
        out.hint(
            "set daemon.installation (or GPUWARDEN_DAEMON__INSTALLATION) to the <installation>"
            " in their labels, gpuwarden-<installation>-<id>, and run reap again"
        )
        return _finish(out, report, EX_DOMAIN)
    try:
        providers = build(settings, clock, report)
    except ConfigError as exc:
        out.error(exc.render())
        return EX_CONFIG
    try:
        await _list(providers, prefix, report)
        _show(out, report)
        live = [p for p in report.found if p.state is not ProviderState.TERMINATED]
        if live and not yes:
            if not out.interactive:
                out.error("not destroying without confirmation: this is not a terminal")
                out.hint("pass --yes to reap from a script")
                return _finish(out, report, EX_DOMAIN)
            if not out.confirm(f"Destroy these {len(live)} instance(s)?"):
                out.error("nothing destroyed")
                return _finish(out, report, EX_DOMAIN)
        await _destroy(providers, live, report, out)
    finally:
        for p in providers.values():
            with contextlib.suppress(Exception):
                await p.aclose()
    if report.destroyed:
        report.recorded = await record(settings, clock, report.destroyed)
        if not out.json_mode:
            out.print(f"Database: {report.recorded}.")
    return _finish(out, report, EX_DOMAIN if report.failed else EX_OK)


SIM_UNREACHABLE = (
    "the sim cloud runs inside the daemon, on a port chosen at its start (providers.sim.port "
    "= 0), which reap cannot find, and ends with it; with the daemon up, 'gpuwarden "
    "destroy-all' ends its instances; for a standalone 'gpuwarden sim' set "
    "providers.sim.base_url"
)


def build(settings: Settings, clock: SystemClock, report: Report) -> dict[str, Provider]:
    from gpuwarden.providers import build_providers

    sim = settings.providers.sim
    urls = None
    if sim.enabled:
        base = sim.base_url or (f"http://{sim.host}:{sim.port}" if sim.port else None)
        if base is None:  # a listing we could not make: said, and exit 1, not "none"
            report.failed.append(("list sim-vast and sim-lambda", SIM_UNREACHABLE))
        else:
            from gpuwarden.sim.server import SimUrls

            urls = SimUrls.at(base)
    return build_providers(settings, clock, sim_urls=urls)


async def _list(providers: dict[str, Provider], prefix: str, report: Report) -> None:
    async def one(name: str, p: Provider) -> None:
        try:
            report.found.extend(await p.list_instances(prefix))
        except Exception as exc:  # one provider's failure must not hide the others'
            report.failed.append((f"list {name}", str(exc) or type(exc).__name__))

    await asyncio.gather(*(one(n, p) for n, p in providers.items()))
    report.found.sort(key=lambda p: (p.provider, p.label))


async def _destroy(
    providers: dict[str, Provider], live: list[ProviderInstance], report: Report, out: Out
) -> None:
    async def one(pi: ProviderInstance) -> None:
        try:
            await providers[pi.provider].destroy(pi.provider_id)
        except Exception as exc:
            report.failed.append((f"destroy {pi.provider} {pi.provider_id}", str(exc)))
            out.error(f"could not destroy {pi.label} ({pi.provider} {pi.provider_id}): {exc}")
            return
        report.destroyed.append(pi)
        _log().warning("reap_destroyed", provider=pi.provider, provider_id=pi.provider_id)
        if not out.json_mode:
            out.print(f"destroyed {pi.label} ({pi.provider} {pi.provider_id})")

    await asyncio.gather(*(one(pi) for pi in live))


def _installation(settings: Settings) -> str:
    """The label the daemon on this state dir uses: the config's, else the one its database
    keeps (fleet/installation.py), else (no database, or one from before labels were kept)
    the config's default. LabelUnreadable when the database is there but cannot say."""
    from gpuwarden.fleet import installation

    if installation.set_on_purpose(settings):
        return settings.daemon.installation
    return installation.stored(settings.db_path) or settings.daemon.installation


async def record(settings: Settings, clock: SystemClock, done: list[ProviderInstance]) -> str:
    """Write what reap did into the database, if the daemon is not holding it."""
    from gpuwarden.store import (
        Store,
        StoreBusy,
        StoreCorrupt,
        StoreUnavailable,
        StoreWriteFailed,
    )
    from gpuwarden.system.lock import LockHeld, StateLock

    if not settings.db_path.exists():
        return f"no database at {settings.db_path}; nothing recorded"
    lock = StateLock(settings.lock_path)
    try:
        lock.acquire()
    except LockHeld:
        return "the daemon holds the database; its reconciler will see the instances vanish"
    except OSError as exc:
        return f"cannot lock {settings.lock_path}: {exc.strerror}; nothing recorded"
    try:
        try:
            store = await Store.open(settings.db_path, clock)
        except (StoreCorrupt, StoreBusy, StoreUnavailable) as exc:  # the destroys are done
            return f"the database cannot be opened ({exc}); nothing recorded"
        known = 0
        try:
            for pi in done:
                known += await _record_one(store, pi)
        except StoreWriteFailed as exc:  # a full disk, or a lock held by an sqlite3 shell
            return f"recorded {known} of {len(done)} before a write failed ({exc})"
        finally:
            await store.close()
    finally:
        lock.release()
    return f"recorded {known} known and {len(done) - known} unknown instance(s)"


async def _record_one(store: Any, pi: ProviderInstance) -> int:
    from gpuwarden.core.model import EntityKind, InstanceState, TerminationReason

    details = {"by": "reap", "provider": pi.provider, "provider_id": pi.provider_id}
    inst = await store.find_instance(pi.provider, pi.provider_id)
    if inst is None:
        await store.record(EntityKind.DAEMON, "reap", "reaped", {**details, "label": pi.label})
        _log().warning("reap_unknown_instance", provider=pi.provider, provider_id=pi.provider_id)
        return 0
    if not inst.state.live:
        return 1
    if inst.state is InstanceState.REQUESTED:
        inst = await store.transition_instance(
            inst.id, InstanceState.TERMINATING, reason=TerminationReason.MANUAL, details=details
        )
    await store.transition_instance(
        inst.id,
        InstanceState.TERMINATED,
        reason=inst.reason or TerminationReason.MANUAL,
        details=details,
    )
    return 1


def _show(out: Out, report: Report) -> None:
    from gpuwarden.providers.base import ProviderState

    if out.json_mode:
        return
    if not report.found:
        where = "the providers that could be listed" if report.failed else "any enabled provider"
        out.print(f"No instance with our label at {where}.")
    else:
        out.table(
            ["PROVIDER", "PROVIDER ID", "LABEL", "STATE", "GPU", "RATE", "STARTED"],
            [
                [
                    p.provider,
                    p.provider_id,
                    p.label,
                    Styled(
                        p.state.value, style="green" if p.state is ProviderState.RUNNING else ""
                    ),
                    p.gpu_name or "-",
                    rate(p.price_per_hour),
                    local_time(p.started_at),
                ]
                for p in report.found
            ],
            right=["RATE"],
        )
    for what, why in report.failed:
        out.error(f"{what} failed: {why}")


def _finish(out: Out, report: Report, code: int) -> int:
    if out.json_mode:
        out.json(report.to_json())
    return code


def _log() -> Any:
    """The logger, imported on first use: the other commands never load structlog."""
    import structlog

    return structlog.get_logger(__name__)
