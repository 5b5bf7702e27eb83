"""The wiring context handed to every service: settings, clock, store, providers, and the
small shared signals through which services meet (they never import each other's internals).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from gpuwarden.clock import Clock
from gpuwarden.config import Settings
from gpuwarden.heartbeat import Heartbeats
from gpuwarden.providers.base import Provider
from gpuwarden.store import Store


@dataclass
class App:
    settings: Settings
    clock: Clock
    store: Store
    providers: dict[str, Provider]
    heartbeats: Heartbeats
    # Set on any change that may move a deadline (launch, extend, activity, state change).
    guard_wake: asyncio.Event = field(default_factory=asyncio.Event)
    # Set when a job is queued or capacity frees up.
    jobs_wake: asyncio.Event = field(default_factory=asyncio.Event)
    # Set by SIGTERM/SIGINT; every loop ends when it is set.
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    started_monotonic: float = 0.0

    @property
    def installation(self) -> str:
        return self.settings.daemon.installation
