"""Loop heartbeats: every service loop beats at least every BEAT_EVERY seconds; the systemd
watchdog ping goes out only while every registered loop is fresh."""

from __future__ import annotations

from dataclasses import dataclass, field

from gpuwarden.core.clock import Clock

BEAT_EVERY = 5.0  # seconds: the longest a loop may sleep between beats
STALE_AFTER = 20.0  # seconds without a beat before a loop counts as stalled


@dataclass
class Heartbeats:
    clock: Clock
    _last: dict[str, float] = field(default_factory=dict)

    def register(self, name: str) -> None:
        """A loop that will beat; it counts as fresh from now."""
        self._last[name] = self.clock.monotonic()

    def unregister(self, name: str) -> None:
        self._last.pop(name, None)

    def beat(self, name: str) -> None:
        self._last[name] = self.clock.monotonic()

    def ages(self) -> dict[str, float]:
        now = self.clock.monotonic()
        return {name: now - t for name, t in sorted(self._last.items())}

    def stale(self, max_age: float = STALE_AFTER) -> list[str]:
        return [name for name, age in self.ages().items() if age > max_age]
