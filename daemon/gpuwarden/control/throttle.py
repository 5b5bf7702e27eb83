"""Log lines that a client can provoke at will (refused connections, a full descriptor table)
are throttled: at most one per kind every few seconds, carrying how many were held back, so
that an abusive or broken client cannot fill the journal."""

from __future__ import annotations

from dataclasses import dataclass, field

from gpuwarden.core.clock import Clock

EVERY = 10.0  # seconds between two lines of one kind


@dataclass
class LogThrottle:
    clock: Clock
    every: float = EVERY
    _last: dict[str, float] = field(default_factory=dict)
    _held: dict[str, int] = field(default_factory=dict)

    def allow(self, kind: str) -> int | None:
        """The number of lines held back since the last one when this one may be logged;
        None when it must be held back too."""
        now = self.clock.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < self.every:
            self._held[kind] = self._held.get(kind, 0) + 1
            return None
        self._last[kind] = now
        return self._held.pop(kind, 0)
