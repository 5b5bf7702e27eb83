"""Which services the daemon runs, in start-up order."""

from __future__ import annotations

from gpuwarden.control.server import ControlServer
from gpuwarden.fleet.app import App
from gpuwarden.jobs.service import JobService
from gpuwarden.lifecycle.service import Service
from gpuwarden.loops.guard import Guard
from gpuwarden.loops.reconciler import Reconciler
from gpuwarden.loops.watchdog import Watchdog


def build_services(app: App) -> list[Service]:
    """Services in the order their optional `start()` runs before READY=1."""
    services: list[Service] = []
    # Cost guard first: the reconciler's start() is its first full pass (finds what a crash
    # hid), then the guard, which ends every instance at its deadline.
    services.append(Reconciler(app))
    services.append(Guard(app))
    # After the reconciler's first pass (the socket answers from a reconciled store) and
    # before job recovery.
    services.append(ControlServer(app))
    services.append(Watchdog(app))  # SSH probes of running instances (no start())
    # Jobs last: its start() recovers jobs in flight against the reconciled store.
    services.append(JobService(app))
    return services
