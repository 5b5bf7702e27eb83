"""`gpuwarden run`: start the daemon, supervise its loops, stop it cleanly.

Start-up, in this order, so that a refused start touches nothing:
config (bad, or a provider without its key: exit 78) -> logging -> uvloop -> state dir ->
lock (held: exit 75) -> store (open, integrity check, migrate; the services' modules are
imported in a thread meanwhile) -> the installation label
(fleet/installation.py) -> SSH key -> in-process sim
cloud (if enabled, unless providers.sim.base_url names a standalone `gpuwarden sim`) ->
providers -> App -> each service's start() -> READY=1.

Running: every service's run() is a named task in ONE root TaskGroup, beside the systemd
watchdog task and the config-reload task. Signal handlers only set events (runtime.py).

Failure policy: a loop that raises is logged with its traceback and restarted with capped
exponential backoff (1 s .. 60 s). While it waits it does not beat, so a loop that keeps
failing goes stale: WATCHDOG=1 pings stop, STATUS says which loop stalled, and systemd's
watchdog restarts the daemon. We restart a loop ourselves first because most failures are
passing (a provider's 500, a dropped SSH connection); we let systemd restart the process
when it persists, because a fresh process is the cure we can trust for a wedged one.

Stopping (SIGTERM/SIGINT): STOPPING=1, cancel the root group, drain for at most
daemon.shutdown_timeout, close providers, sim and store, release the lock, exit 0.

SIGHUP reloads the config from the same path (reloader.py): an invalid file is refused with
an error log and the running config stays; a valid one replaces app.settings (loops re-read
it on each pass) and wakes the guard. Settings read only at start-up (paths, providers, SSH)
are reported as needing a restart.

Exit codes: 0 clean stop; 1 start-up failed or shutdown overran its deadline; 75 another
daemon holds the state dir, or another process the database's write lock (EX_TEMPFAIL); 78
invalid config (EX_CONFIG); 130 second SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from gpuwarden.config import paths
from gpuwarden.config import settings as config
from gpuwarden.config.settings import EX_CONFIG, ConfigError, Settings
from gpuwarden.core.clock import Clock, SystemClock
from gpuwarden.core.heartbeat import Heartbeats
from gpuwarden.fleet import installation
from gpuwarden.lifecycle import runtime
from gpuwarden.lifecycle.service import Service
from gpuwarden.store import Store, StoreBusy, StoreCorrupt, StoreUnavailable
from gpuwarden.system import logs as glog
from gpuwarden.system import systemd
from gpuwarden.system.lock import EX_TEMPFAIL, LockHeld, StateLock

if TYPE_CHECKING:
    from gpuwarden.fleet.app import App
    from gpuwarden.lifecycle.reloader import ConfigReloader
    from gpuwarden.providers.base import Provider
    from gpuwarden.sim.server import SimUrls

log = structlog.get_logger(__name__)

ProvidersFactory = Callable[..., "dict[str, Provider]"]  # build_providers' signature

# What the daemon runs, imported while the store opens (see Supervisor._open_store): SSH,
# HTTP, the metrics, every loop and handler. About half of a start was importing them.
SERVICE_MODULES = (
    "gpuwarden.lifecycle.wiring",
    "gpuwarden.lifecycle.reloader",
    "gpuwarden.fleet.app",
    "gpuwarden.providers",
    "gpuwarden.remote.ssh",
)

EXIT_FAILED = 1


class StartupFailed(Exception):
    def __init__(self, code: int, event: str, **details: Any) -> None:
        super().__init__(event)
        self.code = code
        self.event = event
        self.details = details


def main(config_path: str | None = None) -> int:
    """The `gpuwarden run` entry point; returns the process exit code."""
    path = paths.resolve_path(config_path)
    try:
        settings = config.load(path)
        config.check_startable(settings)  # before anything is written, as check-config does
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return EX_CONFIG
    glog.register_secrets_from(settings)
    glog.configure(level=settings.daemon.log_level)
    import uvloop

    sup = Supervisor(settings, path)
    runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    code = runner.run(sup.run())
    if sup.abandoned:
        # A task ignored cancellation past the deadline; closing the loop would wait for it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    runner.close()
    return code


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        config_path: Path,
        clock: Clock | None = None,
        build_services: Callable[[App], list[Service]] | None = None,
        make_providers: ProvidersFactory | None = None,
    ) -> None:
        self.settings = settings
        self.config_path = config_path
        self.clock = clock or SystemClock()
        # Which loops run, given the wired context (tests pass their own; by default
        # wiring.build_services).
        self.build_services = build_services
        # The provider clients, given the settings (the benchmark passes in-memory fakes;
        # by default providers.build_providers).
        self.make_providers = make_providers
        self.notifier = systemd.Notifier.from_env()
        self.stopping = asyncio.Event()
        self.reload_requested = asyncio.Event()
        self.abandoned = False
        self.locked = False  # got as far as holding the state-dir lock
        self.app: App | None = None
        self.reloader: ConfigReloader | None = None
        self.services: list[Service] = []

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        signals = runtime.SignalHandlers(self.stopping, self.reload_requested)
        signals.install(loop)
        try:
            async with contextlib.AsyncExitStack() as stack:
                code = await self._run(stack)
            if self.locked:  # a refused start never began, so it does not "stop"
                log.info("daemon_stopped", code=code)  # after providers, sim, store, lock
            return code
        finally:
            signals.remove(loop)

    async def _run(self, stack: contextlib.AsyncExitStack) -> int:
        try:
            started = await self._until_stopped(self._start(stack))
        except StartupFailed as exc:
            log.error(exc.event, **exc.details)
            return exc.code
        except ConfigError as exc:  # e.g. a provider enabled without its API key
            print(exc.render(), file=sys.stderr)
            log.error("config_invalid", problems=[p[0] for p in exc.problems])
            return EX_CONFIG
        except Exception:
            log.exception("startup_failed")
            return EXIT_FAILED
        if not started:
            log.info("startup_interrupted")
            return 0
        return await self._serve()

    async def _until_stopped(self, coro: Any) -> bool:
        """Run a start-up step; if a stop signal comes first, cancel it. True if it finished."""
        task = asyncio.create_task(coro, name="start-up")
        stop = asyncio.create_task(self.stopping.wait(), name="stop-wait")
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not task.done():
                task.cancel()
                await asyncio.wait({task})
        if task.cancelled():
            return False
        task.result()  # re-raise a start-up failure
        return True

    async def _start(self, stack: contextlib.AsyncExitStack) -> None:
        s = self.settings
        state_dir = s.daemon.state_dir
        lock = StateLock(s.lock_path)
        try:
            state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
            lock.acquire()
        except LockHeld as exc:
            print(f"gpuwarden: {exc}", file=sys.stderr)
            raise StartupFailed(
                EX_TEMPFAIL, "daemon_already_running", lock=str(exc.path), pid=exc.pid
            ) from None
        except OSError as exc:  # read-only, not ours, not a directory, no space
            why = exc.strerror or str(exc)
            print(
                f"gpuwarden: cannot use the state directory {state_dir}: {why}"
                f" ({exc.filename or s.lock_path}); it must be a directory the daemon can"
                " write (daemon.state_dir)",
                file=sys.stderr,
            )
            raise StartupFailed(
                EXIT_FAILED, "state_dir_unusable", path=str(state_dir), error=why
            ) from None
        stack.callback(lock.release)
        self.locked = True
        log.info(
            "daemon_starting",
            pid=os.getpid(),
            state_dir=str(state_dir.absolute()),
            config=str(self.config_path),
        )
        try:
            store = await self._open_store()
        except StoreCorrupt as exc:
            raise StartupFailed(
                EXIT_FAILED, "store_corrupt", path=str(s.db_path), error=str(exc)
            ) from exc
        except StoreBusy as exc:  # a lock held by another process: a later start may pass
            raise StartupFailed(
                EX_TEMPFAIL, "store_busy", path=str(s.db_path), error=str(exc)
            ) from exc
        except StoreUnavailable as exc:  # a full disk, an I/O error: the file is not at fault
            raise StartupFailed(
                EXIT_FAILED, "store_unavailable", path=str(s.db_path), error=str(exc)
            ) from exc
        stack.push_async_callback(_closing, "store", store.close)
        label = await installation.resolve(store, s)
        s = self.settings = installation.pinned(s, label)
        key, public = self._ssh_key()
        sim_urls = await self._start_sim(stack)
        from gpuwarden.fleet.app import App  # imported by now (_open_store)
        from gpuwarden.fleet.terminator import Terminator
        from gpuwarden.lifecycle import wiring
        from gpuwarden.lifecycle.reloader import ConfigReloader
        from gpuwarden.providers import build_providers

        make_providers = self.make_providers or build_providers
        providers = make_providers(s, self.clock, sim_urls=sim_urls)
        for name, provider in providers.items():
            stack.push_async_callback(_closing, f"provider {name}", provider.aclose)
        app = App(
            settings=s,
            clock=self.clock,
            store=store,
            providers=providers,
            heartbeats=Heartbeats(self.clock),
            terminator=Terminator(store, self.clock, providers),
            stopping=self.stopping,
            started_monotonic=self.clock.monotonic(),
            ssh_key=key,
            ssh_public_key=public,
        )
        self.reloader = ConfigReloader(app, self.config_path, self.notifier, self._status)
        app.reload = self.reloader.reload
        self.app = app
        self.services = (self.build_services or wiring.build_services)(app)
        names = [service.name for service in self.services]
        if len(set(names)) != len(names):  # task, heartbeat and STATUS names must be unique
            raise StartupFailed(EXIT_FAILED, "duplicate_service_names", services=names)
        for service in self.services:
            log.debug("service_starting", service=service.name)
            self.notifier.status(f"starting: {service.name}")
            await service.start()

    async def _open_store(self) -> Store:
        """Open the store (integrity check, migrations, the live instances) and, meanwhile,
        import the modules of the services in a thread: SQLite does its part without the
        GIL, so on a machine with two cores the imports cost little of the wall time. An
        import that fails is a start-up failure, as it was when they were imported first."""
        self.notifier.status("starting: opening the database")
        imports = asyncio.create_task(asyncio.to_thread(_import_all, SERVICE_MODULES))
        try:
            store = await Store.open(self.settings.db_path, self.clock)
        except BaseException:
            await asyncio.wait({imports})  # the thread cannot be stopped; let it end first
            if not imports.cancelled() and imports.exception() is not None:
                # The store's failure is the one reported; this one is logged, not left to
                # asyncio's "Task exception was never retrieved".
                log.warning("service_import_failed", error=repr(imports.exception()))
            raise
        try:
            await imports
        except BaseException:
            await store.close()
            raise
        return store

    def _ssh_key(self) -> tuple[Any, str]:
        from gpuwarden.remote import ssh as remote

        pem, path = remote.key_source(self.settings)
        try:
            return remote.load_or_create_key(pem, path)
        except (ValueError, OSError) as exc:  # asyncssh.KeyImportError is a ValueError
            where = "ssh.private_key" if pem else str(path)
            raise StartupFailed(
                EX_CONFIG, "ssh_key_unusable", source=where, error=str(exc)
            ) from None

    async def _start_sim(self, stack: contextlib.AsyncExitStack) -> SimUrls | None:
        sim_settings = self.settings.providers.sim
        if not sim_settings.enabled:
            return None
        from gpuwarden.sim.server import SimCloud, SimUrls  # only when enabled: aiohttp server

        if sim_settings.base_url:
            # A standalone `gpuwarden sim`: its ledger and instances outlive this daemon, so
            # a crash here loses nothing there, and the daemon finds them again on restart.
            log.info("sim_external", url=sim_settings.base_url)
            return SimUrls.at(sim_settings.base_url)

        from gpuwarden.sim.openssh import unavailable_reason

        if sim_settings.ssh == "openssh" and (reason := unavailable_reason()) is not None:
            raise StartupFailed(
                EX_CONFIG, "openssh_unavailable", field="providers.sim.ssh", error=reason
            )
        sandbox = sim_settings.sandbox_dir or self.settings.daemon.state_dir / "sim"
        sim = SimCloud(sim_settings, self.clock, sandbox_root=sandbox)
        urls = await sim.start()
        stack.push_async_callback(_closing, "sim", sim.stop)
        return urls

    async def _serve(self) -> int:
        app = self.app
        assert app is not None
        self.notifier.ready(self._status())
        log.info(
            "daemon_ready",
            pid=os.getpid(),
            services=[s.name for s in self.services],
            providers=sorted(app.providers),
            socket=str(app.settings.daemon.socket.absolute()),
            watchdog_interval=systemd.watchdog_interval(),
        )
        root = asyncio.create_task(self._root(app), name="root")
        stop = asyncio.create_task(self.stopping.wait(), name="stop-wait")
        deadline = app.settings.daemon.shutdown_timeout.total_seconds()
        try:
            await asyncio.wait({root, stop}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # we are being cancelled: take the loops with us
            root.cancel()
            await asyncio.wait({root}, timeout=deadline)
            raise
        finally:
            stop.cancel()
        code = 0
        if root.done() and not root.cancelled() and root.exception() is not None:
            log.error("supervisor_failed", error=repr(root.exception()))
            code = EXIT_FAILED
        self.notifier.stopping(await _stopping_status(app))
        log.info("daemon_stopping")
        root.cancel()
        _, pending = await asyncio.wait({root}, timeout=deadline)
        if pending:
            me = asyncio.current_task()
            stuck = sorted(t.get_name() for t in asyncio.all_tasks() if t is not me)
            log.error("shutdown_deadline_exceeded", timeout_s=deadline, tasks=stuck)
            self.abandoned = True
            code = EXIT_FAILED
        return code

    async def _root(self, app: App) -> None:
        interval = systemd.watchdog_interval()
        assert self.reloader is not None
        async with asyncio.TaskGroup() as tg:
            for service in self.services:
                app.heartbeats.register(service.name)
                tg.create_task(
                    runtime.keep_running(service, app.clock, app.stopping), name=service.name
                )
            tg.create_task(
                runtime.watchdog_loop(
                    self.notifier,
                    app.heartbeats,
                    app.clock,
                    interval=interval,
                    running_status=self._status,
                ),
                name="systemd-watchdog",
            )
            tg.create_task(self.reloader.run(self.reload_requested), name="config-reload")

    def _status(self) -> str:
        app = self.app
        providers = ", ".join(sorted(app.providers)) if app and app.providers else "none"
        return f"running: {len(self.services)} loops; providers: {providers}"


def _import_all(names: tuple[str, ...]) -> None:
    for name in names:
        importlib.import_module(name)


async def _closing(what: str, close: Callable[[], Awaitable[object]]) -> None:
    """Close one resource on the way out; a failure is logged and the others still close."""
    try:
        await close()
    except Exception:
        log.exception("close_failed", what=what)


async def _stopping_status(app: App) -> str:
    """STATUS= for STOPPING=1; with instances still live, a warning with their count and
    hourly burn: nothing ends them on their deadlines until the daemon is back (only the
    dead-man switch on each instance, after policy.deadman_timeout)."""
    try:
        live = await app.store.live_instances()
    except Exception as exc:
        log.warning("stopping_live_unknown", error=repr(exc))
        return "stopping; live instances unknown"
    if not live:
        return "stopping"
    burn = sum(i.price_per_hour for i in live)
    log.warning(
        "stopping_with_instances_billing",
        count=len(live),
        burn_per_hour=round(burn, 4),
        instances=[i.id for i in live],
        deadman_timeout_s=app.limits().deadman_timeout.total_seconds(),
    )
    return f"stopping with {len(live)} instance(s) still billing, ${burn:,.3f}/h"
