"""The control commands that only show what the daemon reports: status, history, costs,
info and events (the list, or followed live).

Kept apart from commands_control.py, which registers every control command and holds the
ones that change something (launch, extend, activity, destroy, reload), because rendering
the daemon's tables is most of the code and changes for different reasons than the actions.
Exit codes: see cli/output.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Iterable, Mapping
from typing import Any

from gpuwarden.cli.client import ControlClient
from gpuwarden.cli.follow import follow
from gpuwarden.cli.output import (
    EX_OK,
    Out,
    Styled,
    duration,
    local_time,
    money,
    parse_time,
    rate,
    run_command,
)

LIVE = ("requested", "provisioning", "running", "terminating")
STATE_STYLE = {
    "requested": "yellow",
    "provisioning": "yellow",
    "booting": "yellow",
    "running": "green",
    "terminating": "magenta",
    "terminated": "dim",
    "launch_failed": "red",
}


# --- status -------------------------------------------------------------------------------


ALL = {"all": True}  # status params for every row (the daemon answers the first 100 without)


def status_rows(result: Any) -> list[dict[str, Any]]:
    """The instance list of a status reply (a list, or {"instances": [...]})."""
    if isinstance(result, Mapping):
        return list(result.get("instances", []))
    return list(result or [])


SOON_S = 15 * 60  # TIME LEFT turns yellow under this


def _time_left(row: Mapping[str, Any], *, reason: bool = True) -> Styled:
    """Time to the next deadline and its reason; yellow under 15 minutes, EXPIRED in red."""
    if row.get("expired"):
        return Styled("EXPIRED", style="bold red")
    left = row.get("time_left_s")
    if left is None:
        return Styled("-")
    live = row.get("state") in LIVE
    if live and left <= 0:
        return Styled("EXPIRED", style="bold red")
    text = duration(left)
    why = row.get("deadline_reason")
    return Styled(
        f"{text} ({why})" if why and reason else text,
        style="yellow" if live and left < SOON_S else "",
    )


def ago(seconds: float) -> str:
    """A short age for a table cell: 45s, 2m, 3h, 1d."""
    secs = int(max(0.0, seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= size:
            return f"{secs // size}{unit}"
    return f"{secs}s"


def probe_cell(row: Mapping[str, Any], now: Any) -> Styled:
    """The watchdog's last word on an instance: 'ok 2m ago, switch armed', '2 strikes' (failed
    probes; policy.watchdog_failures of them end it), or '-' when it was never probed.
    `now` is the daemon's clock (the status reply's `now`), so that ages do not depend on
    this machine's clock."""
    strikes = int(row.get("strikes") or 0)
    if strikes > 0:
        return Styled(f"{strikes} strike{'s' if strikes != 1 else ''}", style="bold red")
    at, now_at = parse_time(row.get("last_probe_at")), parse_time(now)
    if at is None:
        return Styled("-")
    verdict = "ok" if row.get("last_probe_ok") else "failed"
    when = f" {ago((now_at - at).total_seconds())} ago" if now_at is not None else ""
    cell = Styled(verdict + when, style="" if verdict == "ok" else "red")
    if row.get("probe_stale"):  # the watchdog has not got through for several intervals
        cell = Styled(f"{verdict}{when} (stale)", style="yellow")
    switch = row.get("deadman")
    if switch:  # the dead-man switch: armed, or why it cannot protect this instance
        cell.append(f", switch {switch}", style="" if switch == "armed" else "yellow")
    return cell


def shown_state(row: Mapping[str, Any]) -> str:
    """The state as the table shows it: a running instance whose SSH has not answered yet is
    `booting` (the provider says running; we cannot use it yet)."""
    state = str(row.get("state"))
    return "booting" if state == "running" and row.get("ssh_ready") is False else state


def show_status(args: argparse.Namespace) -> int:
    wanted = {
        k: getattr(args, k, None)
        for k in ("limit", "provider", "state", "gpu")
        if getattr(args, k, None) is not None
    } | (ALL if getattr(args, "all", False) else {})
    filtered = bool(wanted.keys() - {"limit", "all"})

    async def once(client: ControlClient, out: Out) -> None:
        result = await client.call("status", wanted)
        rows = status_rows(result)
        left_out = _left_out(result, rows, filtered)
        if out.json_mode:
            _status_json(out, rows, left_out, stream=bool(args.watch))
            return
        now = result.get("now") if isinstance(result, Mapping) else None
        if args.watch:
            if out.is_terminal:  # a pipe gets one snapshot after another
                out.console.clear()
            out.print(Styled(f"every {args.watch:g}s, Ctrl-C ends   {local_time(now)}", "dim"))
        if not rows:
            out.print("No live instance matches." if filtered else "No live instances.")
        else:
            status_table(out, rows, now)
        if left_out:
            out.print(left_out)
        if isinstance(result, Mapping) and result.get("queue_paused"):
            out.print(queue_line(result))

    async def body(client: ControlClient, out: Out) -> int:
        await once(client, out)
        while args.watch:
            await asyncio.sleep(args.watch)
            if not out.json_mode and not out.is_terminal:
                out.print("")
            await once(client, out)
        return EX_OK

    # Ctrl-C is how a watch is meant to end: not an error.
    return run_command(args, body, interrupted=EX_OK if args.watch else 130)


def _status_json(
    out: Out, rows: list[dict[str, Any]], left_out: str | None, *, stream: bool
) -> None:
    if stream:  # --watch: one document per line, a stream a script can read as it comes
        print(json.dumps(rows, default=str), flush=True)
    else:
        out.json(rows)
    if left_out:
        out.hint(left_out)  # on stderr: the JSON stays the rows alone


def _left_out(result: Any, rows: list[dict[str, Any]], filtered: bool) -> str | None:
    """The line that says rows were left out (the daemon's page, or --limit), else None."""
    count = result.get("count") if isinstance(result, Mapping) else None
    if not isinstance(count, int) or count <= len(rows):
        return None
    what = "matching live instances" if filtered else "live instances"
    return f"showing {len(rows):,} of {count:,} {what}; --limit N or --all for more"


FULL_WIDTH = 170  # narrower terminals get the compact table
FULL_COLUMNS = (
    *("ID", "PROVIDER", "GPU", "STATE", "RATE", "UPTIME", "LEASE END", "TIME LEFT", "JOB"),
    *("PROBE", "SSH", "COST NOW", "EST. TOTAL"),
)
COMPACT_COLUMNS = ("ID", "GPU", "STATE", "$/H", "LEFT", "JOB", "COST")


def status_table(out: Out, rows: list[dict[str, Any]], now: Any) -> None:
    """Every column when the terminal is wide (or output is piped); at 80 columns a compact
    table of what decides money: GPU, state, rate, time left, the job on it, cost so far."""
    full = out.width >= FULL_WIDTH
    columns = FULL_COLUMNS if full else COMPACT_COLUMNS
    cells = []
    for r in rows:
        shown = shown_state(r)
        state = Styled(shown, style=STATE_STYLE.get(shown, ""))
        job = r.get("job") or "-"
        if full:
            cells.append(
                [
                    r.get("id", ""),
                    r.get("provider", ""),
                    r.get("gpu", "") or "-",
                    state,
                    rate(r.get("price_per_hour")),
                    duration(r.get("uptime_s")),
                    local_time(r.get("lease_until"), with_date=False),
                    _time_left(r),
                    job,
                    probe_cell(r, now),
                    ssh_cell(r),
                    money(r.get("cost_now")),
                    money(r.get("est_total")),
                ]
            )
        else:
            price = r.get("price_per_hour")
            cells.append(
                [
                    r.get("id", ""),
                    r.get("gpu", "") or "-",
                    state,
                    "-" if price is None else f"{price:.3f}",
                    _time_left(r, reason=False),
                    job,
                    money(r.get("cost_now")),
                ]
            )
    count = f"{len(rows)} instance{'s' if len(rows) != 1 else ''}"
    rate_sum = f"{_sum(rows, 'price_per_hour'):.3f}"
    cost_now, est = money(_sum(rows, "cost_now")), money(_sum(rows, "est_total"))
    totals = (
        ["TOTAL", count, "", "", rate(_sum(rows, "price_per_hour")), *[""] * 6, cost_now, est]
        if full
        else ["TOTAL", count, "", rate_sum, "", "", cost_now]
    )
    out.table(
        columns,
        cells,
        totals=totals,
        right=["RATE", "UPTIME", "COST NOW", "EST. TOTAL", "$/H", "COST"],
    )


def ssh_cell(row: Mapping[str, Any]) -> str:
    """Where to log in, as ssh's own arguments (`gpuwarden ssh ID` does it with the pinned
    host key), or '-' before the instance has an address."""
    target = row.get("ssh")
    if not target or "@" not in str(target):
        return "-"
    login, _, port = str(target).rpartition(":")
    return f"{login} -p {port}"


# --- history and costs --------------------------------------------------------------------


def show_history(args: argparse.Namespace) -> int:
    async def body(client: ControlClient, out: Out) -> int:
        records = await client.call("history", {"hours": args.hours})
        if out.json_mode:
            out.json(records)
        elif not records:
            out.print(f"No terminations in the last {args.hours:g} h.")
        else:
            out.table(
                ["ENDED", "ID", "PROVIDER", "GPU", "REASON", "UPTIME", "RATE", "COST"],
                [
                    [
                        local_time(t.get("at")),
                        t.get("instance_id", ""),
                        t.get("provider", ""),
                        t.get("gpu", "") or "-",
                        _reason_by(t),
                        duration(t.get("uptime_s")),
                        rate(t.get("price_per_hour")),
                        money(t.get("cost")),
                    ]
                    for t in records
                ],
                totals=[
                    "TOTAL",
                    f"{len(records)}",
                    "",
                    "",
                    "",
                    "",
                    "",
                    money(_sum(records, "cost")),
                ],
                right=["UPTIME", "RATE", "COST"],
            )
        return EX_OK

    return run_command(args, body)


def _reason_by(t: Mapping[str, Any]) -> str:
    """The reason, and who asked for a manual end ("manual by alice (uid:1000)")."""
    reason = str(t.get("reason", ""))
    return f"{reason} by {t['by']}" if t.get("by") else reason


def show_costs(args: argparse.Namespace) -> int:
    async def body(client: ControlClient, out: Out) -> int:
        c = await client.call("costs", {"days": args.days})
        if out.json_mode:
            out.json(c)
            return EX_OK
        days = c.get("days", [])
        # Keep-warm: what instances billed standing warm between jobs, and the cold starts
        # the jobs that took them did not wait through.
        right = ["SPEND", "OF WHICH IDLE", "WARM", "WAIT SAVED"]
        out.table(
            ["DAY (UTC)", *right],
            [
                [
                    d.get("day"),
                    money(d.get("total")),
                    money(d.get("idle")),
                    money(d.get("warm_idle")),
                    duration(d.get("wait_saved_s")),
                ]
                for d in days
            ],
            totals=[
                "TOTAL",
                money(c.get("total")),
                money(c.get("idle")),
                money(c.get("warm_idle")),
                duration(c.get("wait_saved_s")),
            ],
            right=right,
            title=f"Spend over the last {args.days} day(s)",
        )
        for title, key in (("BY PROVIDER", "by_provider"), ("BY REASON", "by_reason")):
            part = c.get(key) or {}
            if part:
                out.print("")
                out.table(
                    [title, "SPEND"], [[k, money(v)] for k, v in part.items()], right=["SPEND"]
                )
        if c.get("live"):
            out.print(f"\nIncludes {money(c.get('live'))} so far on live instances.")
        _show_spot(out, c.get("spot") or {})
        out.print("")
        show_money_state(out, c)
        return EX_OK

    return run_command(args, body)


def _show_spot(out: Out, s: dict[str, Any]) -> None:
    """What spot saved and what preemptions cost (nothing when no spot instance ended)."""
    if not s.get("instances"):
        return
    out.print(
        f"\nSpot: {s.get('instances')} instance(s) paid {money(s.get('paid'))};"
        f" on demand {money(s.get('on_demand'))}: saved {money(s.get('saved'))}."
    )
    out.print(
        f"Preemptions: {s.get('preemptions', 0)}; re-run {duration(s.get('rerun_s'))}"
        f" of work, costing {money(s.get('rerun_cost'))}."
    )


# --- daemon -------------------------------------------------------------------------------


def show_info(args: argparse.Namespace) -> int:
    async def body(client: ControlClient, out: Out) -> int:
        r = await client.call("daemon.info")
        if out.json_mode:
            out.json(r)
            return EX_OK
        out.print(
            f"gpuwarden {r.get('version')}  pid {r.get('pid')}  up {duration(r.get('uptime_s'))}"
        )
        out.print(f"installation {r.get('installation')}  socket {r.get('socket')}")
        out.print("providers: " + (", ".join(r.get("providers") or []) or "none"))
        show_money_state(out, r)
        beats = r.get("heartbeats") or {}
        if beats:
            out.table(
                ["LOOP", "LAST BEAT"],
                [
                    [name, Styled(f"{age:.1f}s ago", style="red" if age > 20 else "")]
                    for name, age in beats.items()
                ],
                right=["LAST BEAT"],
            )
        return EX_OK

    return run_command(args, body)


def show_money_state(out: Out, r: Mapping[str, Any]) -> None:
    """The budget windows (limit, spent, committed, left) and the job queue, with why it is
    paused: what decides whether the next rental or job may start."""
    for name, w in (r.get("budget") or {}).items():
        if w.get("limit") is None:
            out.print(
                f"budget {name}: no limit (budget.{name}_limit); spent {money(w.get('spent'))}, "
                f"committed {money(w.get('committed'))}"
            )
        else:
            left = w.get("left") or 0.0
            out.print(
                Styled(
                    f"budget {name}: {money(left)} left of {money(w.get('limit'))} "
                    f"(spent {money(w.get('spent'))}, committed {money(w.get('committed'))})",
                    style="red" if left <= 0 else "",
                )
            )
    out.print(queue_line(r))


def queue_line(r: Mapping[str, Any]) -> Styled:
    if not r.get("queue_paused"):
        return Styled("job queue: running")
    why = r.get("queue_paused_reason") or "unknown"
    since = r.get("queue_paused_since")
    when = f" since {local_time(since)}" if since else ""
    return Styled(
        f"job queue: PAUSED{when} ({why}); 'gpuwarden resume' restarts it", style="yellow"
    )


def event_line(ev: Mapping[str, Any]) -> Styled:
    """One event for humans: local time, entity, what happened, details."""
    when = local_time(ev.get("at")) if ev.get("at") else "-"
    what = str(ev.get("name"))
    if what == "state":
        what = f"{ev.get('from_state') or '∅'} -> {ev.get('to_state')}"
    elif what == "lagged":
        return Styled(
            f"{when}  (fell behind: {ev.get('details', {}).get('dropped')} events not shown)",
            style="yellow",
        )
    line = Styled(f"{when}  {ev.get('kind')} {ev.get('entity_id')}  ")
    line.append(what, style="bold")
    if ev.get("reason"):
        line.append(f"  reason={ev['reason']}")
    details = ev.get("details") or {}
    if details:
        line.append("  " + json.dumps(details, sort_keys=True, default=str), style="dim")
    return line


def show_events(args: argparse.Namespace) -> int:
    params = drop_none({"hours": args.hours, "limit": args.limit, "entity_id": args.entity})

    def show(out: Out, ev: Mapping[str, Any]) -> None:
        if out.json_mode:  # one JSON object per line: a stream a script can read as it comes
            print(json.dumps(ev, default=str), flush=True)
        else:
            out.print(event_line(ev))

    async def body(client: ControlClient, out: Out) -> int:
        if not args.follow:
            events = await client.call("events.list", params)
            if out.json_mode:
                out.json(events)
            else:
                for ev in events:
                    show(out, ev)
            return EX_OK
        await follow(client, out, params, args.entity, show)
        return EX_OK

    # Ctrl-C is how a follower is meant to stop: not an error.
    return run_command(args, body, interrupted=EX_OK if args.follow else 130)


def drop_none(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _sum(rows: Iterable[Mapping[str, Any]], key: str) -> float:
    return sum(float(r.get(key) or 0) for r in rows)


__all__ = [
    "LIVE",
    "drop_none",
    "event_line",
    "probe_cell",
    "show_costs",
    "show_events",
    "show_history",
    "show_info",
    "show_status",
    "status_rows",
]
