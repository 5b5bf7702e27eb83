"""Which services the daemon runs, in start-up order. Each engineer adds their loop here."""

from __future__ import annotations

from gpuwarden.app import App
from gpuwarden.services.base import Service


def build_services(app: App) -> list[Service]:
    """Services in the order their optional `start()` runs before READY=1."""
    services: list[Service] = []
    return services
