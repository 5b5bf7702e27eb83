"""The watchdog's pure parts: when each instance is probed (stable slots spread over the
interval), how far activity must move to be written, and what a probe's answer means."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

ACTIVITY_STEP = timedelta(minutes=1)  # smaller moves of last_activity are not written
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


# --- pure parts ------------------------------------------------------------------------------


ONE_US = timedelta(microseconds=1)


def _offset_us(instance_id: str, interval_us: int) -> int:
    digest = hashlib.sha256(instance_id.encode()).digest()
    return interval_us * int.from_bytes(digest[:8], "big") >> 64


def probe_offset(instance_id: str, interval: float) -> float:
    """Seconds into each interval at which this instance is probed: a stable hash of its id
    (not Python's hash(), which changes per process)."""
    return _offset_us(instance_id, round(interval * 1e6)) / 1e6


def next_probe_at(instance_id: str, interval: float, after: datetime) -> datetime:
    """The first probe slot strictly after `after`. Slots sit at offset + k * interval from
    the epoch (integer microseconds, so a slot compares exactly with the clock)."""
    interval_us = max(1, round(interval * 1e6))
    offset_us = _offset_us(instance_id, interval_us)
    elapsed_us = (after - _EPOCH) // ONE_US - offset_us
    k = elapsed_us // interval_us + 1
    return _EPOCH + timedelta(microseconds=offset_us + k * interval_us)


def activity_step(idle_timeout: timedelta) -> timedelta:
    """The smallest move of last_activity worth an event: a minute, or a quarter of the idle
    timeout when that is shorter (so activity always lands well before the idle deadline)."""
    return min(ACTIVITY_STEP, idle_timeout / 4)


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """What a good probe saw on the instance."""

    sessions: int = 0  # interactive sessions other than ours
    gpu_util: float | None = None  # the busiest GPU, percent; None without nvidia-smi
    runners: int = 0  # our job runners alive
    heartbeat: bool = True  # the dead-man heartbeat file was refreshed
    deadman: bool | None = None  # the dead-man switch is running
    deadman_state: str | None = None  # "armed" | "unable": whether it can end the instance
    host_key: str | None = None  # the host key the instance showed ('type base64')
    keys: str | None = None  # the digest of the operators' keys now on it (hostkeys.keys_digest)

    def switch(self) -> str | None:
        """The dead-man switch as the daemon shows it: armed (running, able to end the
        instance), unable (running, but it cannot: no key, no HTTP client), running (a
        switch that does not say), absent (not running), or None (not known)."""
        if self.deadman is None:
            return None
        if not self.deadman:
            return "absent"
        return self.deadman_state or "running"

    def activity(self, gpu_busy_percent: float) -> list[str]:
        """Why this probe counts as activity (empty: idle)."""
        why = []
        if self.gpu_util is not None and self.gpu_util > gpu_busy_percent:
            why.append("gpu")
        if self.sessions > 0:
            why.append("session")
        if self.runners > 0:
            why.append("runner")
        return why

    def to_json(self) -> dict[str, Any]:
        return {
            "sessions": self.sessions,
            "gpu_util": self.gpu_util,
            "runners": self.runners,
            "heartbeat": self.heartbeat,
            "deadman": self.deadman,
            "deadman_state": self.deadman_state,
        }


class ProbeFailed(Exception):
    """No good answer from the instance. `kind`: timeout, refused, auth, no_endpoint, error,
    bad_answer."""

    def __init__(self, kind: str, message: str = "") -> None:
        super().__init__(f"{kind}: {message}" if message else kind)
        self.kind = kind
        self.message = message


def parse_probe(stdout: str) -> ProbeResult:
    """The probe's JSON line (the last non-empty line: a login banner may come first)."""
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    if not lines:
        raise ProbeFailed("bad_answer", "no output")
    try:
        data = json.loads(lines[-1])
        gpu = data.get("gpu_util")
        deadman = data.get("deadman")
        state = data.get("deadman_state")
        return ProbeResult(
            sessions=max(0, int(data.get("sessions", 0))),
            gpu_util=None if gpu is None else float(gpu),
            runners=max(0, int(data.get("runners", 0))),
            heartbeat=bool(data.get("heartbeat", False)),
            deadman=None if deadman is None else bool(deadman),
            deadman_state=state if state in ("armed", "unable") else None,
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise ProbeFailed("bad_answer", lines[-1][:200]) from exc
