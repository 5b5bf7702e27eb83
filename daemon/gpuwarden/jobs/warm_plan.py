"""Pure decisions that make `jobs.warm_schedule` keep instances warm by itself: how many to
rent now so that each open window has `min_warm` of its class, which warm instance to roll
over to a fresh one before its hard cap or lease ends it, and which old one to end once its
replacement is warm. No I/O and no clock reads: the instances and `now` come in.

The rules:
- Inside an open window, the instances of its class that are live (warm, busy or booting)
  or being rented count towards `min_warm`; an old instance whose replacement is counted
  does not count twice. What is missing is rented, within `room` (what `max_instances`
  leaves). A budget refusal holds every rental until `refused_until`.
- A warm (idle) instance inside an open window whose end (the earliest of its hard cap and
  lease) comes within `lead` (long enough for a cold start), and before the window closes,
  gets a replacement. A busy one never does: a job is never moved.
- The old instance is ended once its replacement is warm, if it is still idle then; the
  guard ends it at its deadline in any case.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from gpuwarden.config.schedule import WarmWindow


@dataclass(frozen=True, slots=True)
class Held:
    """A live instance of the jobs loop, as the schedule counts it."""

    id: str
    gpu: str
    ends_at: datetime  # the earliest of its hard cap and lease: when the guard ends it
    idle: bool  # warm with no job (booting or busy: False)
    replaces: str | None = None  # the warm instance it was rented to replace


@dataclass(frozen=True, slots=True)
class Rental:
    """A rental the schedule wants: for a window's class (None: any GPU), new or a
    replacement of the instance `replaces`."""

    gpu: str | None
    replaces: str | None = None


def _counts(window: WarmWindow, gpu: str | None) -> bool:
    if gpu is None:  # a rental for any GPU counts only for a window of any GPU
        return window.gpu is None
    return window.covers(gpu)


def kept(window: WarmWindow, held: Sequence[Held], pending: Sequence[Rental]) -> int:
    """Instances of the window's class counted towards its `min_warm`: the live ones and
    the rentals under way, an old instance whose replacement is counted left out."""
    replaced = {h.replaces for h in held} | {r.replaces for r in pending}
    live = sum(1 for h in held if h.id not in replaced and window.covers(h.gpu))
    return live + sum(1 for r in pending if _counts(window, r.gpu))


def rentals(
    windows: Sequence[WarmWindow],
    held: Sequence[Held],
    pending: Sequence[Rental],
    now: datetime,
    *,
    room: int,
    lead: timedelta,
    refused_until: datetime | None = None,
) -> list[Rental]:
    """The rentals to start now: replacements for warm instances about to reach their end
    inside an open window first, then new instances up to each open window's `min_warm`;
    at most `room` in all, none while a budget refusal holds (`refused_until`)."""
    if room <= 0 or (refused_until is not None and now < refused_until):
        return []
    out: list[Rental] = []
    replaced = {h.replaces for h in held} | {r.replaces for r in pending}
    for h in held:
        if not h.idle or h.id in replaced or h.ends_at - lead > now:
            continue
        for window in windows:
            closes = window.end_if_open(now) if window.covers(h.gpu) else None
            if closes is not None and h.ends_at < closes:
                out.append(Rental(window.gpu, replaces=h.id))
                break
    for window in windows:
        if window.end_if_open(now) is None:
            continue
        missing = window.min_warm - kept(window, held, [*pending, *out])
        out += [Rental(window.gpu)] * max(0, missing)
    return out[:room]


def retire(held: Sequence[Held]) -> list[str]:
    """Old instances to end now: idle ones whose replacement is warm (never a busy one)."""
    idle = {h.id for h in held if h.idle}
    return sorted(
        h.replaces for h in held if h.idle and h.replaces is not None and h.replaces in idle
    )
