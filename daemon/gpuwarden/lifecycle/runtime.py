"""The supervisor's moving parts, kept apart so each can be tested with fakes: signal
handling, the restart-with-backoff wrapper around a service loop, and the systemd watchdog
task that pings only while every loop's heartbeat is fresh."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable

import structlog

from gpuwarden.core.clock import Clock
from gpuwarden.core.heartbeat import BEAT_EVERY, Heartbeats
from gpuwarden.lifecycle.service import Service
from gpuwarden.system.systemd import Notifier

log = structlog.get_logger(__name__)

BACKOFF_FIRST = 1.0  # seconds before the first restart of a failed loop
BACKOFF_CAP = 60.0  # the longest wait between restarts
HEALTHY_AFTER = 60.0  # a loop that ran this long before failing starts its backoff afresh
EXIT_FORCED = 130  # a second SIGINT: 128 + SIGINT, as shells report an interrupted program


def backoff(failures: int, first: float = BACKOFF_FIRST, cap: float = BACKOFF_CAP) -> float:
    """Seconds to wait after the `failures`-th consecutive failure (1-based): 1, 2, 4 ... cap."""
    return float(min(cap, first * 2 ** max(0, failures - 1)))


def _force_exit(code: int) -> None:
    log.warning("forced_exit", code=code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class SignalHandlers:
    """SIGTERM and SIGINT set `stopping`; a second SIGINT exits at once with 130 (the operator
    insists); SIGHUP sets `reload`. Handlers only set events: the work happens in tasks."""

    def __init__(
        self,
        stopping: asyncio.Event,
        reload: asyncio.Event,
        *,
        force_exit: Callable[[int], None] = _force_exit,
    ) -> None:
        self.stopping = stopping
        self.reload = reload
        self._force_exit = force_exit
        self._sigints = 0
        self._installed: list[signal.Signals] = []

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig, handler in (
            (signal.SIGTERM, self.on_stop),
            (signal.SIGINT, self.on_stop),
            (signal.SIGHUP, self.on_hup),
        ):
            loop.add_signal_handler(sig, handler, sig)
            self._installed.append(sig)

    def remove(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in self._installed:
            loop.remove_signal_handler(sig)
        self._installed.clear()

    def on_stop(self, sig: signal.Signals) -> None:
        if sig == signal.SIGINT:
            self._sigints += 1
            if self._sigints > 1:
                self._force_exit(EXIT_FORCED)
                return
        if self.stopping.is_set():
            log.info("stop_already_requested", signal=sig.name)
            return
        log.info("stop_requested", signal=sig.name)
        self.stopping.set()

    def on_hup(self, sig: signal.Signals) -> None:
        log.info("reload_requested", signal=sig.name)
        self.reload.set()


async def keep_running(
    service: Service,
    clock: Clock,
    stopping: asyncio.Event,
    *,
    first: float = BACKOFF_FIRST,
    cap: float = BACKOFF_CAP,
    healthy_after: float = HEALTHY_AFTER,
) -> None:
    """Run `service.run()` until the daemon stops, restarting it after a failure.

    A loop that raises is logged with its traceback and restarted after 1, 2, 4 ... 60 s.
    It does not beat while it waits, so a loop that keeps failing goes stale, the watchdog
    pings stop, and systemd restarts the whole daemon: a clean process is the better cure
    for whatever keeps breaking. Cancellation (shutdown) passes straight through.
    """
    failures = 0
    while True:
        started = clock.monotonic()
        try:
            await service.run()
        except Exception:
            if clock.monotonic() - started >= healthy_after:
                failures = 0
            failures += 1
            delay = backoff(failures, first, cap)
            log.exception(
                "service_failed", service=service.name, failures=failures, restart_in=delay
            )
        else:
            if stopping.is_set():
                return  # it saw the stop and ended: that is the clean way out
            failures += 1
            delay = backoff(failures, first, cap)
            log.error("service_exited", service=service.name, restart_in=delay)
        await clock.sleep(delay)
        log.info("service_restarting", service=service.name, failures=failures)


async def watchdog_loop(
    notifier: Notifier,
    heartbeats: Heartbeats,
    clock: Clock,
    *,
    interval: float | None,
    running_status: Callable[[], str],
) -> None:
    """Send WATCHDOG=1 every `interval` s (WatchdogSec/2) while no loop is stale.

    When loops stall it stops pinging, says STATUS=stalled: <names> once, and logs it; when
    they recover it pings again and restores the running STATUS. With no systemd watchdog
    (`interval` None) it still watches and reports, every BEAT_EVERY seconds.
    """
    stalled: list[str] = []
    while True:
        stale = heartbeats.stale()
        if stale:
            if stale != stalled:
                ages = {name: round(age, 1) for name, age in heartbeats.ages().items()}
                log.error("loops_stalled", loops=stale, ages=ages)
                notifier.status("stalled: " + ", ".join(stale))
        else:
            if interval is not None:
                notifier.watchdog()
            if stalled:
                log.info("loops_recovered", loops=stalled)
                notifier.status(running_status())
        stalled = stale
        await clock.sleep(interval if interval is not None else BEAT_EVERY)
