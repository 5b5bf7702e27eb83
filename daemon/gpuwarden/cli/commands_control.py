"""The everyday commands: talk to the daemon over its control socket.

status, offers, launch, extend, activity, destroy, destroy-all, history, costs, reload, info,
events, and `reap` (the emergency one, which needs no daemon: see cli/reap.py). `register`
adds them all, in the order `gpuwarden --help` lists them; this module holds the ones that
ask or change something (offers, launch, extend, activity, destroy, destroy-all, reload), and
commands_views.py the ones that only show what the daemon reports.
Every command takes --json, --socket and --config. Exit codes: see cli/output.py.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from typing import Any

from gpuwarden.cli import commands_views as views
from gpuwarden.cli.client import DOMAIN_ERROR, ControlClient, RemoteError
from gpuwarden.cli.commands_views import LIVE, drop_none, status_rows
from gpuwarden.cli.launch_wait import WAIT_TIMEOUT_S, wait_ready
from gpuwarden.cli.output import (
    EX_DOMAIN,
    EX_OK,
    Out,
    command,
    duration,
    gigabytes,
    local_time,
    money,
    positive,
    rate,
    run_command,
)

ID_HELP = "instance id, a unique start of it (4+ characters), or label (see 'gpuwarden status')"


def register(sub: Any) -> None:
    p = command(
        sub, "status", "show live instances: uptime, time left, last probe, cost", views.show_status
    )
    p.add_argument("--limit", type=positive(int), metavar="N", help="show at most N instances")
    p.add_argument("--provider", metavar="P", help="only this provider (e.g. vast, sim-vast)")
    p.add_argument("--state", choices=sorted(LIVE), help="only instances in this state")
    p.add_argument("--gpu", metavar="NAME", help="only this GPU model (4090, A100)")
    p.add_argument(
        "--watch",
        "-w",
        metavar="SECONDS",
        type=positive(float),
        nargs="?",
        const=2.0,
        default=None,
        help="refresh every SECONDS (default 2) until Ctrl-C",
    )

    p = command(sub, "offers", "search GPU offers at the enabled providers", _offers)
    p.add_argument("--provider", metavar="P", help="only this provider (e.g. vast, sim-vast)")
    p.add_argument(
        "--gpu",
        metavar="NAME",
        help="this GPU model: whole words of its name (4090, A100; A10 is not A100)",
    )
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
    which.add_argument(
        "--gpu", metavar="NAME", help="rent the cheapest offer with this GPU model (see offers)"
    )
    p.add_argument("--max-price", metavar="X", type=positive(float), help="at most $X per hour")
    p.add_argument("--gpu-ram", metavar="GB", type=positive(float), help="at least GB per GPU")
    p.add_argument("--provider", metavar="P", help="only this provider")
    p.add_argument(
        "--hours",
        metavar="N",
        type=lease_hours,
        help="lease: hours, or a duration such as 90m or 1h30m (default: "
        "policy.lease_default, at most policy.lease_max)",
    )
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    p.add_argument(
        "--wait",
        action="store_true",
        help="then wait until the instance runs and its SSH answers (exit 0), has ended "
        "(exit 1) or --wait-timeout passed (exit 75: it is still booting, and billing)",
    )
    p.add_argument(
        "--wait-timeout",
        metavar="DURATION",
        type=seconds_arg,
        default=WAIT_TIMEOUT_S,
        help="how long --wait waits: a duration as config writes it (10m, the default; 90s; "
        "1h) or a number of seconds",
    )

    p = command(sub, "extend", "extend an instance's lease by DURATION", _extend)
    p.add_argument("id", metavar="ID", help=ID_HELP)
    p.add_argument(
        "hours",
        metavar="DURATION",
        type=lease_hours,
        help="time to add: 30m, 2h, 1h30m, or a number of hours; the whole lease may not "
        "pass policy.lease_max",
    )

    p = command(
        sub, "activity", "mark an instance active now (resets its idle deadline)", _activity
    )
    p.add_argument("id", metavar="ID", help=ID_HELP)

    p = command(sub, "destroy", "destroy an instance now (reason manual)", _destroy)
    p.add_argument("id", metavar="ID", help=ID_HELP)

    p = command(sub, "destroy-all", "destroy every live instance", _destroy_all)
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")

    p = command(
        sub, "history", "terminated instances: when, why, uptime and cost", views.show_history
    )
    p.add_argument(
        "--hours", metavar="N", type=positive(float), default=24.0, help="the last N (default 24)"
    )

    p = command(
        sub, "costs", "spend by day, provider and reason; idle spend apart", views.show_costs
    )
    p.add_argument(
        "--days",
        metavar="N",
        type=positive(int),
        default=7,
        help="the last N UTC days (default 7)",
    )

    command(sub, "reload", "re-read the config (like SIGHUP)", _reload)
    command(sub, "info", "daemon version, uptime, loop heartbeats, providers", views.show_info)

    p = command(
        sub, "events", "the event log: recent events, or follow them live", views.show_events
    )
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    p.add_argument(
        "--hours", metavar="N", type=positive(float), default=24.0, help="the last N (default 24)"
    )
    p.add_argument(
        "--limit", metavar="N", type=positive(int), default=50, help="the newest N (default 50)"
    )
    p.add_argument(
        "--id",
        metavar="ID",
        dest="entity",
        help="only events of this instance or job (its id, a unique start of it, or a label)",
    )

    from gpuwarden.cli.reap import register as register_reap

    register_reap(sub)


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
        found = await client.call("offers", drop_none(params))
        offers = found.get("offers", [])
        for warning in found.get("warnings", []):
            out.warn(warning)
        if out.json_mode:
            out.json(found)
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
    params = drop_none(
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
        # With --yes too, so that what was rented, at what rate, is always on record.
        _show_estimate(out, est, to_stderr=out.json_mode or args.yes)
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
        if not out.json_mode:
            out.print(
                f"Launched {inst.get('id')} on {inst.get('provider')} ({inst.get('gpu') or '?'}, "
                f"{rate(inst.get('price_per_hour'))}); state {inst.get('state')}; "
                f"lease until {local_time(inst.get('lease_until'))}."
            )
        if not args.wait:
            if out.json_mode:
                out.json(inst)
            return EX_OK
        return await wait_ready(client, out, inst, args.wait_timeout)

    return run_command(args, body)


def _show_estimate(out: Out, est: Mapping[str, Any], *, to_stderr: bool) -> None:
    """The dry run: on stderr in --json mode (stdout stays one JSON document) and with --yes
    (stdout is the launch's own answer). Then a warning per provider whose search failed."""
    gpus = int(est.get("num_gpus") or 1)
    lines = [
        f"GPU:       {(str(gpus) + ' x ') if gpus > 1 else ''}{est.get('gpu', '?')}"
        f" ({gigabytes(est.get('gpu_ram_gb'))})",
        f"Offer:     {est.get('provider')} {est.get('offer_id')} in {est.get('region') or '?'}",
        f"Rate:      {rate(est.get('price_per_hour'))}",
        f"Duration:  {duration(float(est.get('hours') or 0) * 3600)} lease",
        f"Estimate:  {money(est.get('estimated_cost'))} if kept for the whole lease",
        f"Ends:      after {duration(est.get('idle_timeout_s'))} idle, at the lease end, and"
        f" at the latest {float(est.get('hard_cap_h') or 0):g} h after launch (hard cap)",
        "Budget:    " + _budget_left(est),
    ]
    if est.get("refused"):
        lines.append(f"Refused:   {est['refused']}")
    console = out.err if to_stderr else out.console
    for line in lines:
        console.print(line)
    for warning in est.get("warnings", []):
        out.warn(warning)


def _budget_left(est: Mapping[str, Any]) -> str:
    if est.get("daily_limit") is None:
        return (
            f"no daily limit (budget.daily_limit); {money(est.get('daily_committed'))} "
            "spent or committed today"
        )
    return (
        f"{money(est.get('daily_left'))} left today of {money(est.get('daily_limit'))} "
        f"(spent {money(est.get('daily_spent'))}, committed {money(est.get('daily_committed'))})"
    )


# --- lease, activity, destroy --------------------------------------------------------------


def _extend(args: argparse.Namespace) -> int:
    async def body(client: ControlClient, out: Out) -> int:
        r = await client.call("extend", {"id": args.id, "hours": args.hours})
        if out.json_mode:
            out.json(r)
        else:
            out.print(
                f"Extended {r.get('id')} by {duration(args.hours * 3600)}: lease until "
                f"{local_time(r.get('lease_until'))}; next deadline in "
                f"{duration(r.get('time_left_s'))} ({r.get('deadline_reason')}); "
                f"{float(r.get('still_allowed_h') or 0):g} h more allowed."
            )
        return EX_OK

    return run_command(args, body)


def _duration_arg(text: str, bare_unit_s: float) -> float:
    """A duration as config writes it ("30m", "1h30m") or a bare number of `bare_unit_s`
    units, in seconds, finite and greater than 0; else an argparse error naming why."""
    try:
        seconds = float(text) * bare_unit_s
    except ValueError:
        try:
            from gpuwarden.config.durations import parse_duration  # pydantic: only when needed

            seconds = parse_duration(text).total_seconds()
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    if not (seconds > 0 and math.isfinite(seconds)):  # NaN fails the first test
        raise argparse.ArgumentTypeError("must be a finite time greater than 0")
    return seconds


def lease_hours(text: str) -> float:
    """An argparse type: a duration, or a bare number of hours ("2", "0.5"), as hours."""
    return _duration_arg(text, 3600) / 3600


def seconds_arg(text: str) -> float:
    """An argparse type: a duration, or a bare number of seconds ("600"), as seconds."""
    return _duration_arg(text, 1)


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
            _show_doomed(out, live)
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
        items = r.get("instances", [])
        for item in items:
            _ended(out, item)
        done = sum(1 for i in items if i.get("confirmed"))
        pending = len(items) - done
        out.print(
            f"Destroyed {done}/{len(items)}"
            + (f"; {pending} still terminating (the daemon keeps retrying)." if pending else ".")
        )
        return EX_OK

    return run_command(args, body)


def _show_doomed(out: Out, live: list[dict[str, Any]]) -> None:
    """What destroy-all is about to end, with what each costs, before it asks (on stderr in
    --json mode)."""
    lines = [
        f"  {r.get('id')}  {r.get('gpu') or '-'}  {r.get('state')}  "
        f"{rate(r.get('price_per_hour'))}  {money(r.get('cost_now'))} so far"
        for r in live
    ]
    burn = sum(float(r.get("price_per_hour") or 0) for r in live)
    console = out.err if out.json_mode else out.console
    console.print(f"This destroys {len(live)} instance(s), together {rate(burn)}:")
    for line in lines:
        console.print(line)


# --- daemon -------------------------------------------------------------------------------


def _reload(args: argparse.Namespace) -> int:
    async def body(client: ControlClient, out: Out) -> int:
        r = await client.call("config.reload")
        if out.json_mode:
            out.json(r)
        if not r.get("reloaded"):
            out.error("configuration refused; the running configuration stays")
            for problem in r.get("problems", []):
                out.err.print(f"  {problem}")
            out.hint("'gpuwarden check-config' checks a file before a reload")
            return EX_DOMAIN
        if not out.json_mode:
            changed = r.get("changed") or []
            out.print(
                "Configuration reloaded: "
                + (", ".join(changed) + " changed." if changed else "nothing changed.")
            )
            if r.get("needs_restart"):
                out.print("Needs a restart to take effect: " + ", ".join(r["needs_restart"]))
        return EX_OK

    return run_command(args, body)


__all__ = ["register"]
