"""The CLI's output helpers and the status rendering, without a daemon."""

from __future__ import annotations

import argparse
import io
from datetime import UTC, datetime
from typing import Any

import pytest

from gpuwarden.cli import commands_views as cc
from gpuwarden.cli.client import RemoteError, Unreachable
from gpuwarden.cli.commands_control import lease_hours
from gpuwarden.cli.output import (
    EX_DOMAIN,
    EX_UNAVAILABLE,
    EX_USAGE,
    Out,
    duration,
    iso_utc,
    money,
    remote_error,
    unreachable,
)


@pytest.mark.parametrize(
    ("secs", "text"),
    [
        (None, "-"),
        (0, "0s"),
        (-5, "0s"),
        (59.9, "59s"),
        (60, "1m 00s"),
        (3599, "59m 59s"),
        (3600, "1h 00m"),
        (8 * 3600 + 61, "8h 01m"),
        (86400 + 7200, "1d 02h"),
    ],
)
def test_duration(secs: float | None, text: str) -> None:
    assert duration(secs) == text


@pytest.mark.parametrize(
    ("value", "text"),
    [(None, "-"), (0, "$0.00"), (0.004, "$0.0040"), (1.5, "$1.50"), (1234.5, "$1,234.50")],
)
def test_money(value: float | None, text: str) -> None:
    assert money(value) == text


def test_iso_utc_for_json() -> None:
    assert iso_utc("2026-01-01T01:00:00+01:00") == "2026-01-01T00:00:00Z"
    assert iso_utc(datetime(2026, 1, 1, tzinfo=UTC)) == "2026-01-01T00:00:00Z"
    assert iso_utc(None) is None


def _row(**kw: Any) -> dict[str, Any]:
    return {"state": "running", "time_left_s": 600.0, "deadline_reason": "idle", **kw}


def test_time_left_shows_expired_in_red_when_a_live_instance_is_past_its_deadline() -> None:
    expired = cc._time_left(_row(expired=True))
    assert expired.plain == "EXPIRED" and "red" in str(expired.style)
    past = cc._time_left(_row(time_left_s=-3.0))
    assert past.plain == "EXPIRED"
    ok = cc._time_left(_row())
    assert ok.plain == "10m 00s (idle)"
    ended = cc._time_left(_row(state="terminated", time_left_s=-3.0))
    assert ended.plain != "EXPIRED"


def test_probe_cell_shows_the_last_probe_its_age_and_strikes() -> None:
    now = "2026-01-01T12:00:00Z"
    never = cc.probe_cell(_row(last_probe_at=None, last_probe_ok=None, strikes=0), now)
    assert never.plain == "-"
    ok = cc.probe_cell(_row(last_probe_at="2026-01-01T11:58:00Z", last_probe_ok=True), now)
    assert ok.plain == "ok 2m ago"
    assert cc.probe_cell(
        _row(last_probe_at="2026-01-01T11:59:15Z", last_probe_ok=True), now
    ).plain == ("ok 45s ago")
    struck = cc.probe_cell(
        _row(last_probe_at="2026-01-01T11:59:00Z", last_probe_ok=False, strikes=2), now
    )
    assert struck.plain == "2 strikes" and "red" in str(struck.style)
    one = cc.probe_cell(_row(last_probe_at=now, last_probe_ok=False, strikes=1), now)
    assert one.plain == "1 strike"
    armed = cc.probe_cell(_row(last_probe_at=now, last_probe_ok=True, deadman="armed"), now)
    assert armed.plain == "ok 0s ago, switch armed"
    unable = cc.probe_cell(_row(last_probe_at=now, last_probe_ok=True, deadman="unable"), now)
    assert unable.plain == "ok 0s ago, switch unable"
    assert any("yellow" in style for _, style in unable.parts)
    # Without the daemon's time the age is left out rather than guessed from this machine.
    assert cc.probe_cell(_row(last_probe_at=now, last_probe_ok=True), None).plain == "ok"


@pytest.mark.parametrize(
    ("secs", "text"),
    [(-1, "0s"), (59, "59s"), (60, "1m"), (3599, "59m"), (7200, "2h"), (90000, "1d")],
)
def test_ago(secs: float, text: str) -> None:
    assert cc.ago(secs) == text


def test_status_rows_accepts_both_reply_shapes() -> None:
    assert cc.status_rows({"instances": [{"id": "a"}]}) == [{"id": "a"}]
    assert cc.status_rows([{"id": "b"}]) == [{"id": "b"}]
    assert cc.status_rows(None) == []


def test_table_off_a_terminal_is_plain_and_whole() -> None:
    buf = io.StringIO()
    out = Out(stdout=buf, stderr=io.StringIO())
    out.table(["ID", "GPU"], [["abcdef0123456789" * 4, "RTX 4090"]], totals=["TOTAL", "1"])
    text = buf.getvalue()
    assert "abcdef0123456789" * 4 in text  # not cut to 80 columns
    assert "\x1b[" not in text  # no colour in a pipe
    assert "TOTAL" in text


def test_error_exit_codes_and_messages() -> None:
    err = io.StringIO()
    out = Out(stdout=io.StringIO(), stderr=err)
    code = unreachable(out, Unreachable("/run/x.sock", "no such socket"))
    assert code == EX_UNAVAILABLE
    assert "/run/x.sock" in err.getvalue()
    assert "systemctl status gpuwarden" in err.getvalue()
    assert remote_error(out, RemoteError(1, "no instance 'x'", {"code": "not_found"})) == EX_DOMAIN
    assert remote_error(out, RemoteError(-32602, "invalid params: hours")) == EX_USAGE
    assert "no instance 'x'" in err.getvalue()


def test_a_refusal_comes_with_a_hint_on_what_to_do() -> None:
    err = io.StringIO()
    out = Out(stdout=io.StringIO(), stderr=err)
    remote_error(out, RemoteError(1, "no offer matching the requirements", {"code": "no_offer"}))
    assert "hint: 'gpuwarden offers' shows what is available" in err.getvalue()
    remote_error(out, RemoteError(1, "over", {"code": "budget_exceeded"}))
    assert "budget.daily_limit" in err.getvalue()
    remote_error(out, RemoteError(1, "'abcd' matches 2 instances", {"code": "ambiguous"}))
    assert "give more characters of the id" in err.getvalue()
    quiet = io.StringIO()
    remote_error(Out(stdout=io.StringIO(), stderr=quiet), RemoteError(1, "odd", {"code": "x"}))
    assert "hint" not in quiet.getvalue()  # no hint rather than a wrong one


def test_json_mode_prints_the_error_object_for_scripts() -> None:
    buf = io.StringIO()
    out = Out(True, stdout=buf, stderr=io.StringIO())
    remote_error(out, RemoteError(1, "too long", {"code": "lease_max_exceeded"}))
    assert '"code": "lease_max_exceeded"' in buf.getvalue()


def test_event_line_for_humans() -> None:
    line = cc.event_line(
        {
            "at": "2026-01-01T00:00:00Z",
            "kind": "instance",
            "entity_id": "ab12",
            "name": "state",
            "from_state": "running",
            "to_state": "terminating",
            "reason": "idle",
            "details": {"by": "guard"},
        }
    )
    assert "instance ab12" in line.plain
    assert "running -> terminating" in line.plain
    assert "reason=idle" in line.plain
    lagged = cc.event_line({"name": "lagged", "details": {"dropped": 7}})
    assert "7 events not shown" in lagged.plain


@pytest.mark.parametrize(
    ("text", "hours"), [("30m", 0.5), ("1h30m", 1.5), ("2", 2.0), ("0.25", 0.25), ("90m", 1.5)]
)
def test_extend_takes_a_duration_or_hours(text: str, hours: float) -> None:
    assert lease_hours(text) == hours


@pytest.mark.parametrize("text", ["lots", "-1", "0", "0m", "nan", "inf"])
def test_extend_refuses_what_is_not_a_positive_time(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        lease_hours(text)


def _status_row(iid: str, **kw: Any) -> dict[str, Any]:
    return {
        "id": iid,
        "provider": "sim-lambda",
        "gpu": "RTX 6000Ada",
        "state": "provisioning",
        "price_per_hour": 1.253,
        "uptime_s": 3725.0,
        "lease_until": "2026-01-01T16:00:00Z",
        "time_left_s": 1799.0,
        "deadline_reason": "idle",
        "job": "j0123456789",
        "strikes": 0,
        "last_probe_at": "2026-01-01T11:58:00Z",
        "last_probe_ok": True,
        "cost_now": 12.3456,
        "est_total": 123.45,
        **kw,
    }


def _render_status(width: int) -> str:
    buf = io.StringIO()
    out = Out(stdout=buf, width=width)
    rows = [_status_row("de38ba3c"), _status_row("0a1b2c3d", job=None, time_left_s=60.0)]
    cc.status_table(out, rows, "2026-01-01T12:00:00Z")
    return buf.getvalue()


def test_status_fits_80_columns_without_cutting_a_cell() -> None:
    text = _render_status(80)
    lines = text.splitlines()
    assert max(len(ln) for ln in lines) <= 80, text
    assert "…" not in text  # no cell cut
    head = lines[0].split()
    assert head == ["ID", "GPU", "STATE", "$/H", "LEFT", "JOB", "COST"]
    first = next(ln for ln in lines if ln.startswith("de38ba3c"))
    for cell in ("RTX 6000Ada", "provisioning", "1.253", "29m 59s", "j0123456789", "$12.35"):
        assert cell in first, first
    assert "2.506" in lines[-1]  # the hourly burn of all of them


def test_status_shows_every_column_when_wide() -> None:
    text = _render_status(200)
    assert "…" not in text
    for col in ("RATE", "LEASE END", "TIME LEFT", "JOB", "PROBE", "EST. TOTAL"):
        assert col in text.splitlines()[0]
    first = next(ln for ln in text.splitlines() if ln.startswith("de38ba3c"))
    assert "$1.253/h" in first and "29m 59s (idle)" in first and "j0123456789" in first


def test_time_left_turns_yellow_under_15_minutes() -> None:
    assert "yellow" in str(cc._time_left(_row(time_left_s=14 * 60)).style)
    assert "yellow" not in str(cc._time_left(_row(time_left_s=16 * 60)).style)
    assert cc._time_left(_row(time_left_s=60), reason=False).plain == "1m 00s"


def test_the_money_state_shows_each_budget_window_and_why_the_queue_is_paused() -> None:
    buf = io.StringIO()
    cc.show_money_state(
        Out(stdout=buf),
        {
            "budget": {
                "daily": {"limit": 10.0, "spent": 1.5, "committed": 2.0, "left": 8.0},
                "monthly": {"limit": None, "spent": 1.5, "committed": 2.0, "left": None},
            },
            "queue_paused": True,
            "queue_paused_reason": "insufficient_credit",
            "queue_paused_since": None,
        },
    )
    text = buf.getvalue()
    assert "budget daily: $8.00 left of $10.00 (spent $1.50, committed $2.00)" in text
    assert "budget monthly: no limit (budget.monthly_limit)" in text
    assert "job queue: PAUSED (insufficient_credit); 'gpuwarden resume' restarts it" in text


def test_launch_hours_take_a_duration_too() -> None:
    from gpuwarden.cli import build_parser

    args = build_parser().parse_args(["launch", "--gpu", "4090", "--hours", "90m"])
    assert args.hours == 1.5
