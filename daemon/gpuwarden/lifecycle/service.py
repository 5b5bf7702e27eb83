"""What the supervisor needs from a loop."""

from __future__ import annotations

from typing import Protocol


class Service(Protocol):
    name: str  # the task name, the heartbeat name and the STATUS= word when it stalls

    async def start(self) -> None:
        """Run once before READY=1, in wiring order (a first pass, binding a socket,
        recovering jobs); a loop with nothing to prepare returns at once."""
        ...

    async def run(self) -> None:
        """Run until cancelled. Beat `app.heartbeats.beat(name)` at least every BEAT_EVERY s."""
        ...
