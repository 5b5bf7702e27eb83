"""Which services the daemon runs, in start-up order."""

from __future__ import annotations

from gpuwarden.control.server import ControlServer
from gpuwarden.fleet.app import App
from gpuwarden.jobs.service import JobService
from gpuwarden.lifecycle.service import Service
from gpuwarden.loops.guard import Guard
from gpuwarden.loops.reconciler import Reconciler
from gpuwarden.loops.watchdog import Watchdog
from gpuwarden.notify.service import Notifier


def build_services(app: App) -> list[Service]:
    """Services in the order their optional `start()` runs before READY=1."""
    services: list[Service] = []
    # The control socket binds first: a second daemon pointed at the same socket (another
    # state dir, the same installation label) fails here, before its reconciler could take
    # the first daemon's instances for orphans and end them. Connections made now wait in
    # the listen backlog until the loops run, after every start().
    services.append(ControlServer(app))
    # The notifier listens from its start(), so that what the reconciler's first pass finds
    # (an instance that vanished or was ended by its dead-man switch) is told.
    services.append(Notifier(app))
    # Then the cost guard: the reconciler's start() is its first full pass (finds what a
    # crash hid), then the guard, which ends every instance at its deadline.
    services.append(Reconciler(app))
    services.append(Guard(app))
    services.append(Watchdog(app))  # SSH probes of running instances
    # Then jobs: its start() recovers jobs in flight against the reconciled store.
    services.append(JobService(app))
    # The dashboard (and /metrics), only when configured: it serves from a store that the
    # reconciler has already checked and jobs that have been recovered.
    if app.settings.dashboard.listen:
        # Imported only then: aiohttp costs a fifth of a second of every start without it.
        from gpuwarden.web.server import DashboardServer

        services.append(DashboardServer(app))
    return services
