"""jobs.warm_schedule: the windows' format and its checks (a bad value names its field and
exits 78), when a window holds a time (in its zone), and which instance it keeps warm."""

from __future__ import annotations

from datetime import UTC, datetime, time
from pathlib import Path

import pytest

from gpuwarden.cli import main
from gpuwarden.config import settings as config
from gpuwarden.config.schedule import WarmWindow, parse_days, parse_hours
from gpuwarden.jobs.weighing import scheduled_until

BERLIN_WEEKDAYS = WarmWindow(days="mon-fri", hours="08:00-22:00", timezone="Europe/Berlin")


@pytest.mark.parametrize(
    ("text", "days"),
    [
        ("mon-fri", {0, 1, 2, 3, 4}),
        ("sat,sun", {5, 6}),
        ("Mon,wed-fri", {0, 2, 3, 4}),
        ("daily", set(range(7))),
        ("tue", {1}),
    ],
)
def test_days(text: str, days: set[int]) -> None:
    assert parse_days(text) == days


@pytest.mark.parametrize("text", ["fri-mon", "monday", "", "mon-", "mon,,fri"])
def test_days_that_are_not(text: str) -> None:
    with pytest.raises(ValueError, match="day"):
        parse_days(text)


def test_hours() -> None:
    assert parse_hours("08:00-22:00") == (time(8), time(22))
    assert parse_hours("00:00-24:00") == (time(0), None)
    for bad in ("22:00-06:00", "8-22", "08:00", "24:00-24:00", "08:60-09:00", "25:00-26:00"):
        with pytest.raises(ValueError):
            parse_hours(bad)


@pytest.mark.parametrize(
    ("window", "field"),
    [
        ({"days": "fri-mon"}, "jobs.warm_schedule.0.days"),
        ({"hours": "22:00-06:00"}, "jobs.warm_schedule.0.hours"),
        ({"timezone": "Mars/Olympus"}, "jobs.warm_schedule.0.timezone"),
        ({"min_warm": 0}, "jobs.warm_schedule.0.min_warm"),
        ({"weekends": True}, "jobs.warm_schedule.0.weekends"),
    ],
)
def test_a_bad_window_is_refused_with_its_field_and_exit_78(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], window: dict[str, object], field: str
) -> None:
    path = tmp_path / "config.toml"
    lines = [f"{k} = {_toml(v)}" for k, v in window.items()]
    path.write_text("[[jobs.warm_schedule]]\n" + "\n".join(lines) + "\n")
    with pytest.raises(config.ConfigError) as exc:
        config.load(path)
    assert field in exc.value.render()
    with pytest.raises(SystemExit) as ended:
        main(["check-config", str(path)])
    assert ended.value.code == 78
    assert field in capsys.readouterr().err


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value) if isinstance(value, int) else f'"{value}"'


def test_a_good_schedule_loads(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        "[[jobs.warm_schedule]]\n"
        'days = "mon-fri"\nhours = "08:00-22:00"\ntimezone = "Europe/Berlin"\n'
        'min_warm = 2\ngpu = "RTX 4090"\n'
    )
    [window] = config.load(path).jobs.warm_schedule
    assert window.min_warm == 2 and window.covers("NVIDIA GeForce RTX 4090")
    assert not window.covers("A100 PCIE")
    assert config.Settings().jobs.warm_schedule == []  # none by default


@pytest.mark.parametrize(
    ("now", "closes"),
    [
        # Monday 2026-01-05, winter (UTC+1): 08:00 Berlin is 07:00 UTC, 22:00 is 21:00 UTC.
        (datetime(2026, 1, 5, 6, 59, tzinfo=UTC), None),
        (datetime(2026, 1, 5, 7, 0, tzinfo=UTC), datetime(2026, 1, 5, 21, 0, tzinfo=UTC)),
        (datetime(2026, 1, 5, 20, 59, tzinfo=UTC), datetime(2026, 1, 5, 21, 0, tzinfo=UTC)),
        (datetime(2026, 1, 5, 21, 0, tzinfo=UTC), None),
        (datetime(2026, 1, 10, 12, 0, tzinfo=UTC), None),  # Saturday
        # Summer (UTC+2): Monday 2026-07-06, 22:00 Berlin is 20:00 UTC.
        (datetime(2026, 7, 6, 12, 0, tzinfo=UTC), datetime(2026, 7, 6, 20, 0, tzinfo=UTC)),
    ],
)
def test_a_window_holds_its_hours_in_its_zone(now: datetime, closes: datetime | None) -> None:
    got = BERLIN_WEEKDAYS.end_if_open(now)
    assert got == closes


def test_a_window_to_midnight_closes_at_the_next_day() -> None:
    window = WarmWindow(days="daily", hours="20:00-24:00")
    got = window.end_if_open(datetime(2026, 1, 5, 23, 30, tzinfo=UTC))
    assert got == datetime(2026, 1, 6, 0, 0, tzinfo=UTC)


def test_the_schedule_keeps_up_to_min_warm_of_its_class() -> None:
    noon = datetime(2026, 1, 5, 11, 0, tzinfo=UTC)  # Monday, inside the window
    closes = datetime(2026, 1, 5, 21, 0, tzinfo=UTC)
    two_4090 = WarmWindow(
        days="mon-fri", hours="08:00-22:00", timezone="Europe/Berlin", min_warm=2, gpu="4090"
    )
    # Nothing else kept: this one is.
    assert scheduled_until([two_4090], "RTX 4090", [], noon) == closes
    # One other 4090 kept: room for a second.
    assert scheduled_until([two_4090], "RTX 4090", ["RTX 4090"], noon) == closes
    # Two others kept: the schedule is met, the keep-warm window alone applies.
    assert scheduled_until([two_4090], "RTX 4090", ["RTX 4090", "RTX 4090"], noon) is None
    # Other classes do not count, and are not kept.
    assert scheduled_until([two_4090], "RTX 4090", ["A100", "A100"], noon) == closes
    assert scheduled_until([two_4090], "A100", [], noon) is None
    # Outside the window: nothing kept.
    assert scheduled_until([two_4090], "RTX 4090", [], noon.replace(hour=22)) is None
    # Of two open windows, the later close wins.
    late = WarmWindow(days="mon", hours="10:00-23:00", timezone="UTC")
    assert scheduled_until([two_4090, late], "RTX 4090", [], noon) == noon.replace(hour=23)


def test_a_window_counts_its_gpu_model_as_the_offer_search_rents_it() -> None:
    """An "A10" window counts A10s only: an A100 kept warm does not fill it (the search that
    rents for the window would never take an A100 for "A10" either)."""
    window = WarmWindow(days="daily", hours="00:00-24:00", min_warm=1, gpu="A10")
    assert window.covers("NVIDIA A10") and window.covers("A10 PCIe")
    assert not window.covers("NVIDIA A100-SXM4-80GB") and not window.covers("A100X")
    assert WarmWindow(days="daily", hours="00:00-24:00", min_warm=1).covers("A100X")
