"""`jobs.warm_schedule`: windows of the week in which instances are kept warm.

One window (a TOML table in the `[[jobs.warm_schedule]]` array):

    days = "mon-fri"          # mon..sun, ranges and lists: "mon-fri", "sat,sun", "daily"
    hours = "08:00-22:00"     # start-end in the time zone, end after start ("24:00" = midnight)
    timezone = "Europe/Berlin"  # an IANA name (default UTC)
    min_warm = 1              # instances of the class kept warm while the window lasts
    gpu = "RTX 4090"          # the GPU class: a substring of the GPU name (default: any)

A window that runs past midnight is two windows ("mon-fri" 22:00-24:00 and "tue-sat"
00:00-06:00). Every value is checked when the configuration is read, with the field named.
"""

from __future__ import annotations

from datetime import datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gpuwarden.core.gpus import gpu_matches

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def parse_days(text: str) -> frozenset[int]:
    """Weekday numbers (Monday 0) of "mon-fri", "sat,sun", "daily", "mon,wed-fri"."""
    text = text.strip().lower()
    if text in ("daily", "all", "*"):
        return frozenset(range(7))
    out: set[int] = set()
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        if first not in DAYS or (dash and last not in DAYS):
            raise ValueError(f"{part.strip()!r} is not a day or a range of days (mon..sun)")
        a, b = DAYS.index(first), DAYS.index(last or first)
        if b < a:
            raise ValueError(f"{part.strip()!r} runs backwards (days go mon..sun): write 'sat,sun'")
        out.update(range(a, b + 1))
    return frozenset(out)


def _clock(text: str) -> time | None:
    """HH:MM; None for 24:00 (midnight at the end of the day)."""
    hh, sep, mm = text.strip().partition(":")
    if not sep or not (hh.isdigit() and mm.isdigit() and len(mm) == 2):
        raise ValueError(f"{text.strip()!r} is not a time of day (HH:MM)")
    if (int(hh), int(mm)) == (24, 0):
        return None
    if int(hh) > 23 or int(mm) > 59:
        raise ValueError(f"{text.strip()!r} is not a time of day (00:00..24:00)")
    return time(int(hh), int(mm))


def parse_hours(text: str) -> tuple[time, time | None]:
    """(start, end) of "08:00-22:00"; end None for 24:00. The end must come after the start."""
    start_s, sep, end_s = text.partition("-")
    if not sep:
        raise ValueError(f"{text!r} is not a span of hours (HH:MM-HH:MM)")
    start, end = _clock(start_s), _clock(end_s)
    if start is None:
        raise ValueError("a window cannot start at 24:00")
    if end is not None and end <= start:
        raise ValueError(
            f"{text!r} ends before it starts; a window past midnight is two windows"
            " (e.g. 22:00-24:00 and 00:00-06:00 on the next days)"
        )
    return start, end


class WarmWindow(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    days: str = "mon-fri"
    hours: str = "08:00-22:00"
    timezone: str = "UTC"
    min_warm: int = Field(default=1, ge=1, le=64)
    gpu: str | None = None

    @field_validator("days")
    @classmethod
    def _days(cls, v: str) -> str:
        parse_days(v)
        return v

    @field_validator("hours")
    @classmethod
    def _hours(cls, v: str) -> str:
        parse_hours(v)
        return v

    @field_validator("timezone")
    @classmethod
    def _zone(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            msg = f"{v!r} is not a time zone (an IANA name such as Europe/Berlin)"
            raise ValueError(msg) from None
        return v

    def end_if_open(self, now: datetime) -> datetime | None:
        """When the window that holds `now` closes (aware), or None if none holds it."""
        local = now.astimezone(ZoneInfo(self.timezone))
        if local.weekday() not in parse_days(self.days):
            return None
        start, end = parse_hours(self.hours)
        if local.time() < start or (end is not None and local.time() >= end):
            return None
        day = local.replace(hour=0, minute=0, second=0, microsecond=0, tzinfo=None)
        closes = day + timedelta(days=1) if end is None else datetime.combine(day.date(), end)
        # Wall time in the zone (a DST change inside the window moves the end with the clock).
        return closes.replace(tzinfo=ZoneInfo(self.timezone))

    def covers(self, gpu: str) -> bool:
        """Whether an instance with this GPU name is of the window's class: the same whole-word
        match the offer search rents by, so an A100 is not counted in an "A10" window."""
        return gpu_matches(self.gpu, gpu)
