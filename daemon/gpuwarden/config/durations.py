"""Durations in settings: "90s", "30m", "4h", "1h30m" or a number of seconds, and back."""

from __future__ import annotations

import math
import re
from datetime import timedelta
from typing import Annotated

from pydantic import BeforeValidator, PlainSerializer

MAX_DURATION_S = 100 * 365 * 86400.0
_PART = r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)"
_DURATION = re.compile(rf"\s*(?:{_PART}\s*)+")  # one or more parts: "30m", "1h30m", "1h 30m"
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: object) -> timedelta:
    """Accept "90s", "30m", "4h", "1.5h", "2d", compounds such as "1h30m", a number of
    seconds, or a timedelta."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool):
        raise ValueError("expected a duration such as '90s', '30m' or '4h'")
    if isinstance(value, int | float):
        return _seconds(float(value))
    if isinstance(value, str) and _DURATION.fullmatch(value):
        parts = re.findall(_PART, value)
        return _seconds(sum(float(n) * _UNIT_SECONDS[u] for n, u in parts))
    raise ValueError(f"{value!r} is not a duration; write it like '90s', '30m', '4h' or '1h30m'")


def _seconds(secs: float) -> timedelta:
    # ValueError, not OverflowError: pydantic turns only the former into a field error, and
    # an uncaught OverflowError would end the daemon on a reload.
    if not math.isfinite(secs):
        raise ValueError("a duration must be a finite number")
    if secs < 0:
        raise ValueError("a duration cannot be negative")
    if secs > MAX_DURATION_S:
        raise ValueError("a duration longer than 100 years is not meant; check the unit")
    return timedelta(seconds=secs)


def format_duration(value: timedelta) -> str:
    secs = value.total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= size and secs % size == 0:
            return f"{int(secs // size)}{unit}"
    return f"{secs:g}s"


Duration = Annotated[
    timedelta,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str, when_used="json"),
]
