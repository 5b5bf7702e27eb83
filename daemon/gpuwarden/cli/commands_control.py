"""The everyday commands: talk to the daemon over its control socket.

status, offers, launch, extend, activity, destroy, destroy-all, history, costs, reload, info,
events, and `reap` (the emergency one, which needs no daemon: see cli/reap.py).
Every command takes --json, --socket and --config. Exit codes: see cli/output.py.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Mapping
from typing import Any

from rich.text import Text

from gpuwarden.cli.client import DOMAIN_ERROR, ControlClient, RemoteError
from gpuwarden.cli.output import (
    EX_DOMAIN,
    EX_OK,
    Out,
    command,
    duration,
    gigabytes,
    local_time,
    money,
    parse_time,
    positive,
    rate,
    run_command,
)

LIVE = ("requested", "provisioning", "running", "terminating")
STATE_STYLE = {
    "requested": "yellow",
    "provisioning": "yellow",
    "running": "green",
    "terminating": "magenta",
    "terminated": "dim",
    "launch_failed": "red",
}


ID_HELP = "instance id, a unique start of it (4+ characters), or label (see 'gpuwarden status')"


def register(sub: Any) -> None:
    command(sub, "status", "show live instances: uptime, time left, last probe, cost", _status)

    p = command(sub, "offers", "search GPU offers at the enabled providers", _offers)
    p.add_argument("--provider", metavar="P", help="only this provider (e.g. vast, sim-vast)")
    p.add_argument("--gpu", metavar="NAME", help="GPU name contains NAME (e.g. 4090, A100)")
    p.add_argument("--gpu-ram", metavar="GB", type=positive(float), help="at least GB per GPU")
    p.add_argument("--max-price", metavar="X", type=positive(float), help="at most $X per hour")
    p.add_argument(
        "--limit", metavar="N", type=positive(int), default=20, help="at most N (default 20)"
    )

    p = command(
        sub,
        "launch",
        "rent a GPU: shows the estimate, then asks to confirm",
        _launch,
        epilog="Without a terminal, --yes is required.",
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--offer", metavar="ID", help="rent this offer (see 'gpuwarden offers')")
    which.add_argument("--gpu", metavar="NAME", help="rent the cheapest offer with this GPU")
    p.add_argument("--max-price", metavar="X", type=positive(float), help="at most $X per hour")
    p.add_argument("--gpu-ram", metavar="GB", type=positive(float), help="at least GB per GPU")
    p.add_argument("--provider", metavar="P", help="only this provider")
    p.add_argument(
        "--hours",
        metavar="N",
        type=positive(float),
        help="lease in hours (default: policy.lease_default, at most policy.lease_max)",
    )
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")

    p = command(sub, "extend", "extend an instance's lease by HOURS", _extend)
    p.add_argument("id", metavar="ID", help=ID_HELP)
    p.add_argument(
        "hours",
        metavar="HOURS",
        type=positive(float),
        help="hours to add; the whole lease may not pass policy.lease_max",
    )

    p = command(
        sub, "activity", "mark an instance active now (resets its idle deadline)", _activity
    )
    p.add_argument("id", metavar="ID", help=ID_HELP)

    p = command(sub, "destroy", "destroy an instance now (reason manual)", _destroy)
    p.add_argument("id", metavar="ID", help=ID_HELP)

    p = command(sub, "destroy-all", "destroy every live instance", _destroy_all)
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")

    p = command(sub, "history", "terminated instances: when, why, uptime and cost", _history)
    p.add_argument(
        "--hours", metavar="N", type=positive(float), default=24.0, help="the last N (default 24)"
    )

    p = command(sub, "costs", "spend by day, provider and reason; idle spend apart", _costs)
    p.add_argument(
        "--days",
        metavar="N",
        type=positive(int),
        default=7,
        help="the last N UTC days (default 7)",
    )

    command(sub, "reload", "re-read the config (like SIGHUP)", _reload)
    command(sub, "info", "daemon version, uptime, loop heartbeats, providers", _info)

    p = command(sub, "events", "the event log: recent events, or follow them live", _events)
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    p.add_argument(
        "--hours", metavar="N", type=positive(float), default=24.0, help="the last N (default 24)"
    )
    p.add_argument(
        "--limit", metavar="N", type=positive(int), default=50, help="the newest N (default 50)"
    )
    p.add_argument("--id", metavar="ID", dest="entity", help="only events of this instance/job")

    from gpuwarden.cli.reap import register as register_reap

    register_reap(sub)


# --- status -------------------------------------------------------------------------------


def status_rows(result: Any) -> list[dict[str, Any]]:
    """The instance list of a status reply (a list, or {"instances": [...]})."""
    if isinstance(result, Mapping):
        return list(result.get("instances", []))
    return list(result or [])


def _time_left(row: Mapping[str, Any]) -> Text:
    if row.get("expired"):
        return Text("EXPIRED", style="bold red")
    left = row.get("time_left_s")
    if left is None:
        return Text("-")
    if row.get("state") in LIVE and left <= 0:
        return Text("EXPIRED", style="bold red")
    text = duration(left)
    reason = row.get("deadline_reason")
    return Text(f"{text} ({reason})" if reason else text)


def ago(seconds: float) -> str:
    """A short age for a table cell: 45s, 2m, 3h, 1d."""
    secs = int(max(0.0, seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= size:
            return f"{secs // size}{unit}"
    return f"{secs}s"


def probe_cell(row: Mapping[str, Any], now: Any) -> Text:
    """The watchdog's last word on an instance: 'ok 2m ago', '2 strikes' (consecutive failed
    probes; policy.watchdog_failures of them end it), or '-' when it was never probed.
    `now` is the daemon's clock (the status reply's `now`), so that ages do not depend on
    this machine's clock."""
    strikes = int(row.get("strikes") or 0)
    if strikes > 0:
        return Text(f"{strikes} strike{'s' if strikes != 1 else ''}", style="bold red")
    at, now_at = parse_time(row.get("last_probe_at")), parse_time(now)
    if at is None:
        return Text("-")
    verdict = "ok" if row.get("last_probe_ok") else "failed"
    when = f" {ago((now_at - at).total_seconds())} ago" if now_at is not None else ""
    return Text(verdict + when, style="" if verdict == "ok" else "red")


def _status(args: argparse.Namespace) -> int:
    async def body(client: ControlClient, out: Out) -> int:
        result = await client.call("status")
        rows = status_rows(result)
        if out.json_mode:
            out.json(rows)
            return EX_OK
        now = result.get("now") if isinstance(result, Mapping) else None
        if not rows:
            out.print("No live instances.")
        else:
            columns = ["ID", "PROVIDER", "GPU", "STATE", "UPTIME", "TIME LEFT", "PROBE"]
            out.table(
                [*columns, "COST NOW", "EST. TOTAL"],
                [
                    [
                        r.get("id", ""),
                        r.get("provider", ""),
                        r.get("gpu", "") or "-",
                        Text(str(r.get("state")), style=STATE_STYLE.get(str(r.get("state")), "")),
                        duration(r.get("uptime_s")),
                        _time_left(r),
                        probe_cell(r, now),
                        money(r.get("cost_now")),
                        money(r.get("est_total")),
                    ]
                    for r in rows
                ],
                totals=[
                    "TOTAL",
                    f"{len(rows)} instance{'s' if len(rows) != 1 else ''}",
                    *[""] * (len(columns) - 2),
                    money(_sum(rows, "cost_now")),
                    money(_sum(rows, "est_total")),
                ],
                right=["UPTIME", "COST NOW", "EST. TOTAL"],
            )
        if isinstance(result, Mapping) and result.get("queue_paused"):
            out.print(Text("The job queue is paused.", style="yellow"))
        return EX_OK

    return run_command(args, body)


# --- offers and launch ----------------------------------------------------------------------


def _offers(args: argparse.Namespace) -> int:
    params = {
        "provider": args.provider,
        "gpu": args.gpu,
        "gpu_ram_gb": args.gpu_ram,
        "max_price": args.max_price,
        "limit": args.limit,
    }

    async def body(client: ControlClient, out: Out) -> int:
        offers = await client.call("offers", _drop_none(params))
        if out.json_mode:
            out.json(offers)
        elif not offers:
            out.print("No offers match.")
        else:
            out.table(
                ["PROVIDER", "OFFER", "GPU", "GPUS", "GPU RAM", "PRICE", "REGION", "RELIABILITY"],
                [
                    [
                        o.get("provider", ""),
                        o.get("offer_id", ""),
                        o.get("gpu", ""),
                        o.get("num_gpus", 1),
                        gigabytes(o.get("gpu_ram_gb")),
                        rate(o.get("price_per_hour")),
                        o.get("region", ""),
                        f"{float(o.get('reliability') or 0):.1%}",
                    ]
                    for o in offers
                ],
                right=["GPUS", "GPU RAM", "PRICE", "RELIABILITY"],
            )
        return EX_OK

    return run_command(args, body)


def _launch(args: argparse.Namespace) -> int:
    params = _drop_none(
        {
            "offer_id": args.offer,
            "gpu": args.gpu,
            "max_price": args.max_price,
            "gpu_ram_gb": args.gpu_ram,
            "provider": args.provider,
            "hours": args.hours,
        }
    )

    async def body(client: ControlClient, out: Out) -> int:
        est = await client.call("launch", {**params, "dry_run": True})
        if not args.yes:
            _show_estimate(out, est)
        if est.get("refused"):
            # What the launch itself would answer: refused now, before asking to confirm.
            code = str(est.get("refused_code") or "refused")
            raise RemoteError(DOMAIN_ERROR, str(est["refused"]), {"code": code, "estimate": est})
        if not args.yes:
            if not out.interactive:
                out.error("not launching without confirmation: this is not a terminal")
                out.hint("pass --yes to launch from a script")
                return EX_DOMAIN
            if not out.confirm("Launch it?"):
                out.error("not launched")
                return EX_DOMAIN
        inst = await client.call("launch", {**params, "dry_run": False})
        if out.json_mode:
            out.json(inst)
            return EX_OK
        out.print(
            f"Launched {inst.get('id')} on {inst.get('provider')} ({inst.get('gpu') or '?'}, "
            f"{rate(inst.get('price_per_hour'))}); state {inst.get('state')}; "
            f"lease until {local_time(inst.get('lease_until'))}."
        )
        return EX_OK

    return run_command(args, body)


def _show_estimate(out: Out, est: Mapping[str, Any]) -> None:
    """The dry run, on stderr in --json mode so that stdout stays one JSON document."""
    gpus = int(est.get("num_gpus") or 1)
    lines = [
        f"GPU:       {(str(gpus) + ' x ') if gpus > 1 else ''}{est.get('gpu', '?')}"
        f" ({gigabytes(est.get('gpu_ram_gb'))})",
        f"Offer:     {est.get('provider')} {est.get('offer_id')} in {est.get('region') or '?'}",
        f"Rate:      {rate(est.get('price_per_hour'))}",
        f"Duration:  {duration(float(est.get('hours') or 0) * 3600)} lease",
        f"Estimate:  {money(est.get('estimated_cost'))} if kept for the whole lease",
    ]
    if est.get("refused"):
        lines.append(f"Refused:   {est['refused']}")
    console = out.err if out.json_mode else out.console
    for line in lines:
        console.print(line)


# --- lease, activity, destroy --------------------------------------------------------------


def _extend(args: argparse.Namespace) -> int:
    async def body(client: ControlClient, out: Out) -> int:
        r = await client.call("extend", {"id": args.id, "hours": args.hours})
        if out.json_mode:
            out.json(r)
        else:
            out.print(
                f"Extended {r.get('id')} by {args.hours:g} h: lease until "
                f"{local_time(r.get('lease_until'))}; next deadline in "
                f"{duration(r.get('time_left_s'))} ({r.get('deadline_reason')}); "
                f"{float(r.get('still_allowed_h') or 0):g} h more allowed."
            )
        return EX_OK

    return run_command(args, body)


def _activity(args: argparse.Namespace) -> int:
    async def body(client: ControlClient, out: Out) -> int:
        r = await client.call("activity", {"id": args.id})
        if out.json_mode:
            out.json(r)
        else:
            out.print(
                f"Marked {r.get('id')} active; next deadline {local_time(r.get('deadline'))} "
                f"({r.get('deadline_reason')}, in {duration(r.get('time_left_s'))})."
            )
        return EX_OK

    return run_command(args, body)


def _ended(out: Out, r: Mapping[str, Any]) -> None:
    done = "terminated" if r.get("confirmed") else "terminating (the daemon keeps retrying)"
    out.print(f"{r.get('id')} ({r.get('provider')} {r.get('provider_id') or '-'}): {done}")


def _destroy(args: argparse.Namespace) -> int:
    async def body(client: ControlClient, out: Out) -> int:
        r = await client.call("destroy", {"id": args.id})
        if out.json_mode:
            out.json(r)
        else:
            _ended(out, r)
        return EX_OK

    return run_command(args, body)


def _destroy_all(args: argparse.Namespace) -> int:
    async def body(client: ControlClient, out: Out) -> int:
        if not args.yes:
            rows = status_rows(await client.call("status"))
            live = [r for r in rows if r.get("state") in LIVE]
            if not live:
                if out.json_mode:
                    out.json({"instances": [], "count": 0})
                else:
                    out.print("No live instances.")
                return EX_OK
            console = out.err if out.json_mode else out.console
            console.print(
                f"This destroys {len(live)} instance(s): " + ", ".join(r["id"] for r in live)
            )
            if not out.interactive:
                out.error("not destroying without confirmation: this is not a terminal")
                out.hint("pass --yes to destroy from a script")
                return EX_DOMAIN
            if not out.confirm("Destroy them all?"):
                out.error("nothing destroyed")
                return EX_DOMAIN
        r = await client.call("destroy_all")
        if out.json_mode:
            out.json(r)
            return EX_OK
        for item in r.get("instances", []):
            _ended(out, item)
        out.print(f"{r.get('count', 0)} instance(s) destroyed or being destroyed.")
        return EX_OK

    return run_command(args, body)


# --- history and costs --------------------------------------------------------------------


def _history(args: argparse.Namespace) -> int:
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
                        t.get("reason", ""),
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


def _costs(args: argparse.Namespace) -> int:
    async def body(client: ControlClient, out: Out) -> int:
        c = await client.call("costs", {"days": args.days})
        if out.json_mode:
            out.json(c)
            return EX_OK
        days = c.get("days", [])
        out.table(
            ["DAY (UTC)", "SPEND", "OF WHICH IDLE"],
            [[d.get("day"), money(d.get("total")), money(d.get("idle"))] for d in days],
            totals=["TOTAL", money(c.get("total")), money(c.get("idle"))],
            right=["SPEND", "OF WHICH IDLE"],
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
        return EX_OK

    return run_command(args, body)


# --- daemon -------------------------------------------------------------------------------


def _reload(args: argparse.Namespace) -> int:
    async def body(client: ControlClient, out: Out) -> int:
        r = await client.call("config.reload")
        if out.json_mode:
            out.json(r)
        else:
            out.print("Configuration reloaded.")
            for k, v in (r or {}).items():
                out.print(f"  {k}: {v}")
        return EX_OK

    return run_command(args, body)


def _info(args: argparse.Namespace) -> int:
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
        out.print("job queue: " + ("paused" if r.get("queue_paused") else "running"))
        beats = r.get("heartbeats") or {}
        if beats:
            out.table(
                ["LOOP", "LAST BEAT"],
                [
                    [name, Text(f"{age:.1f}s ago", style="red" if age > 20 else "")]
                    for name, age in beats.items()
                ],
                right=["LAST BEAT"],
            )
        return EX_OK

    return run_command(args, body)


def event_line(ev: Mapping[str, Any]) -> Text:
    """One event for humans: local time, entity, what happened, details."""
    when = local_time(ev.get("at")) if ev.get("at") else "-"
    what = str(ev.get("name"))
    if what == "state":
        what = f"{ev.get('from_state') or '∅'} -> {ev.get('to_state')}"
    elif what == "lagged":
        return Text(
            f"{when}  (fell behind: {ev.get('details', {}).get('dropped')} events not shown)",
            style="yellow",
        )
    line = Text(f"{when}  {ev.get('kind')} {ev.get('entity_id')}  ")
    line.append(what, style="bold")
    if ev.get("reason"):
        line.append(f"  reason={ev['reason']}")
    details = ev.get("details") or {}
    if details:
        line.append("  " + json.dumps(details, sort_keys=True, default=str), style="dim")
    return line


def _events(args: argparse.Namespace) -> int:
    params = _drop_none({"hours": args.hours, "limit": args.limit, "entity_id": args.entity})

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
        # Subscribe first, then list the backlog, so that nothing falls between the two.
        stream = await client.open_events()
        try:
            seen = 0
            for ev in await client.call("events.list", params):
                show(out, ev)
                seen = max(seen, int(ev.get("id") or 0))
            async for ev in stream:
                if args.entity and ev.get("entity_id") != args.entity:
                    continue
                if ev.get("id") is not None and int(ev["id"]) <= seen:
                    continue
                show(out, ev)
        finally:
            await stream.aclose()
        return EX_OK

    # Ctrl-C is how a follower is meant to stop: not an error.
    return run_command(args, body, interrupted=EX_OK if args.follow else 130)


def _drop_none(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _sum(rows: Iterable[Mapping[str, Any]], key: str) -> float:
    return sum(float(r.get(key) or 0) for r in rows)


__all__ = ["event_line", "probe_cell", "register", "status_rows"]
