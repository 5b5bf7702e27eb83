"""Free space under the state dir: a warning while it runs low, before the database and the
images it holds stop taking writes (a full disk is survived, see fleet/terminator.py, but
the record of what happened then waits in memory until space comes back)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)


def free_bytes(path: Path) -> int | None:
    """Bytes free to us on the file system holding `path`; None when it cannot be read."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


@dataclass
class LowDiskWarning:
    """Logs `state_disk_low` (warning) when a check finds less than the floor free, again at
    most every `repeat` seconds while it stays low, and `state_disk_ok` once it recovers."""

    repeat: float = 600.0
    _warned_at: float | None = None

    def check(self, path: Path, floor_bytes: int, now: float, free: int | None = None) -> bool:
        """Whether `path`'s disk is low (`free` overrides the measurement, for tests)."""
        free = free_bytes(path) if free is None else free
        if floor_bytes <= 0 or free is None:
            return False
        if free >= floor_bytes:
            if self._warned_at is not None:
                log.info("state_disk_ok", path=str(path), free_mb=round(free / 1e6, 1))
                self._warned_at = None
            return False
        if self._warned_at is None or now - self._warned_at >= self.repeat:
            self._warned_at = now
            log.warning(
                "state_disk_low",
                path=str(path),
                free_mb=round(free / 1e6, 1),
                floor_mb=round(floor_bytes / 1e6, 1),
            )
        return True
