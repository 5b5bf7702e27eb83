"""warm_plan: what jobs.warm_schedule rents by itself and which warm instance it rolls over,
at fixed times (no clock)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from gpuwarden.config.schedule import WarmWindow
from gpuwarden.jobs.warm_plan import Held, Rental, kept, rentals, retire

# Monday 2026-01-05, winter (UTC+1): 08:00-22:00 Berlin is 07:00-21:00 UTC.
WINDOW = WarmWindow(
    days="mon-fri", hours="08:00-22:00", timezone="Europe/Berlin", min_warm=2, gpu="4090"
)
OPENS = datetime(2026, 1, 5, 7, 0, tzinfo=UTC)
NOON = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
CLOSES = datetime(2026, 1, 5, 21, 0, tzinfo=UTC)
LEAD = timedelta(minutes=6)
FAR = NOON + timedelta(days=1)
NEW = Rental("4090")


def warm(iid: str, ends_at: datetime = FAR, gpu: str = "RTX 4090") -> Held:
    return Held(iid, gpu, ends_at, idle=True)


def busy(iid: str, ends_at: datetime = FAR) -> Held:
    return Held(iid, "RTX 4090", ends_at, idle=False)


@pytest.mark.parametrize(
    ("now", "held", "pending", "room", "refused_until", "want"),
    [
        # Before the window opens: nothing.
        (OPENS - timedelta(minutes=1), [], [], 4, None, []),
        # The window opens with nothing kept: min_warm rentals of its class.
        (OPENS, [], [], 4, None, [NEW, NEW]),
        # One rental already under way counts.
        (OPENS, [], [NEW], 4, None, [NEW]),
        # Two kept (warm or busy): nothing more.
        (NOON, [warm("a"), busy("b")], [], 4, None, []),
        # One of them lost (no longer live): rent one back.
        (NOON, [warm("a")], [], 4, None, [NEW]),
        # Instances of another class do not count.
        (NOON, [warm("x", gpu="A100"), warm("y", gpu="A100")], [], 4, None, [NEW, NEW]),
        # max_instances leaves room for one.
        (NOON, [], [], 1, None, [NEW]),
        (NOON, [], [], 0, None, []),
        # The budget refused a rental: nothing until the hold passes, then the rentals.
        (NOON, [], [], 4, NOON + timedelta(minutes=5), []),
        (NOON + timedelta(minutes=5), [], [], 4, NOON + timedelta(minutes=5), [NEW, NEW]),
        # The window closed: the adaptive rule alone, nothing rented.
        (CLOSES, [], [], 4, None, []),
    ],
)
def test_rentals_bring_an_open_window_to_min_warm(
    now: datetime,
    held: list[Held],
    pending: list[Rental],
    room: int,
    refused_until: datetime | None,
    want: list[Rental],
) -> None:
    got = rentals([WINDOW], held, pending, now, room=room, lead=LEAD, refused_until=refused_until)
    assert got == want


@pytest.mark.parametrize(
    ("now", "held", "want"),
    [
        # A warm instance whose end (hard cap or lease) is within the lead: a replacement.
        (NOON, [warm("a", NOON + timedelta(minutes=5)), warm("b")], [Rental("4090", "a")]),
        # Not yet within the lead.
        (NOON, [warm("a", NOON + timedelta(minutes=7)), warm("b")], []),
        # Busy: never moved mid-job (the guard ends it at its cap).
        (NOON, [busy("a", NOON + timedelta(minutes=5)), warm("b")], []),
        # Its end comes after the window closes: it outlives the need, no replacement.
        (CLOSES - timedelta(minutes=3), [warm("a", CLOSES + timedelta(minutes=2)), warm("b")], []),
        # Already replaced (the fresh one boots): no second replacement, nor a new rental.
        (
            NOON,
            [
                warm("a", NOON + timedelta(minutes=5)),
                Held("c", "RTX 4090", FAR, idle=False, replaces="a"),
                warm("b"),
            ],
            [],
        ),
    ],
)
def test_a_warm_instance_near_its_end_is_rolled_over(
    now: datetime, held: list[Held], want: list[Rental]
) -> None:
    assert rentals([WINDOW], held, [], now, room=4, lead=LEAD) == want


def test_a_replaced_instance_does_not_count_twice() -> None:
    held = [warm("a"), Held("c", "RTX 4090", FAR, idle=False, replaces="a")]
    assert kept(WINDOW, held, []) == 1
    # So one more is rented for min_warm 2; a replacement under way counts instead of a.
    assert rentals([WINDOW], held, [], NOON, room=4, lead=LEAD) == [NEW]
    assert kept(WINDOW, [warm("a")], [Rental("4090", "a")]) == 1


def test_the_old_instance_ends_once_its_replacement_is_warm_and_never_mid_job() -> None:
    fresh = Held("c", "RTX 4090", FAR, idle=True, replaces="a")
    assert retire([warm("a"), fresh]) == ["a"]
    booting = Held("c", "RTX 4090", FAR, idle=False, replaces="a")
    assert retire([warm("a"), booting]) == []
    assert retire([busy("a"), fresh]) == []
    assert retire([fresh]) == []  # the old one is gone already
