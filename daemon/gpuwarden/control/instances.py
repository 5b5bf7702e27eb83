"""The cost guard's service functions: what the control socket and the CLI expose.

Each takes the App and keyword arguments (the control socket passes its params by name) and
returns JSON-friendly data (dicts, lists, ISO 8601 strings, floats). A request that cannot be
done raises an errors.DomainError subclass with a stable code. Each action takes `by`, who
asked (the control socket's caller, as `Caller.by` gives it), and its event records it.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any

from gpuwarden.control import warm as warm_spend
from gpuwarden.control.offers import offer_dict, requirements_for, search
from gpuwarden.control.rows import deadline_fields, instance_dict
from gpuwarden.core import errors, policy
from gpuwarden.core.clock import format_ts
from gpuwarden.core.gpus import gpu_matches
from gpuwarden.core.model import (
    QUEUE_PAUSED_FLAG,
    EntityKind,
    Instance,
    InstanceState,
    Termination,
    TerminationReason,
    label_prefix,
)
from gpuwarden.fleet import budget, launcher
from gpuwarden.fleet.app import App
from gpuwarden.fleet.busy import jobs_on_instances, observations
from gpuwarden.jobs import spot
from gpuwarden.providers.base import Requirements
from gpuwarden.store import NotFoundError

# --- lookups -----------------------------------------------------------------------------


MIN_PREFIX = 4  # the shortest id prefix accepted, as with git's short hashes


async def resolve_instance(app: App, ref: str) -> Instance:
    """The instance `ref` names: its full id, its full label, or a unique prefix of its id
    of at least MIN_PREFIX characters. A prefix that several instances share names the one
    of them that is live, if exactly one is (ended instances stay in the history, and only
    a live one can be extended or destroyed); otherwise it is refused as Ambiguous, with the
    candidates. Raises NotFound when nothing matches."""
    try:
        return await app.store.get_instance(ref)
    except NotFoundError:
        pass
    prefix = label_prefix(app.installation)
    if ref.startswith(prefix):
        try:
            return await app.store.get_instance(ref.removeprefix(prefix))
        except NotFoundError:
            pass
    elif len(ref) >= MIN_PREFIX:
        found = [i for i in await app.store.instances() if i.id.startswith(ref)]
        live = [i for i in found if i.state.live]
        if len(found) == 1:
            return found[0]
        if len(live) == 1:
            return live[0]
        if found:
            raise ambiguous(ref, "instances", [(i.id, i.state.value) for i in found])
    short = len(ref) < MIN_PREFIX and not ref.startswith(prefix)
    hint = f" (an id prefix needs at least {MIN_PREFIX} characters)" if short else ""
    raise errors.NotFound(f"no instance {ref!r}{hint}", id=ref)


def ambiguous(ref: str, what: str, found: list[tuple[str, str]]) -> errors.Ambiguous:
    """The refusal of an id prefix that several (id, state) share, with the candidates."""
    shown = ", ".join(f"{i} ({state})" for i, state in found)
    return errors.Ambiguous(
        f"{ref!r} matches {len(found)} {what}: {shown}; give more of the id",
        id=ref,
        candidates=[{"id": i, "state": state} for i, state in found],
    )


# --- offers and launch -------------------------------------------------------------------


async def offers(
    app: App,
    *,
    requirements: Requirements | None = None,
    provider: str | None = None,
    limit: int = 20,
    gpu: str | None = None,
    gpu_ram_gb: float | None = None,
    max_price: float | None = None,
) -> dict[str, Any]:
    """{"offers": cheapest first, at most `limit`, "warnings": providers that failed}."""
    want = requirements_for(
        app,
        requirements=requirements,
        gpu=gpu,
        gpu_ram_gb=gpu_ram_gb,
        max_price=max_price,
        limit=limit,
    )
    found, warnings = await search(app, provider, want)
    return {"offers": [offer_dict(o) for o in found[:limit]], "warnings": warnings}


async def launch(
    app: App,
    *,
    offer_id: str | None = None,
    provider: str | None = None,
    requirements: Requirements | None = None,
    hours: float | None = None,
    dry_run: bool = False,
    gpu: str | None = None,
    gpu_ram_gb: float | None = None,
    max_price: float | None = None,
    by: str,
) -> dict[str, Any]:
    """Rent `offer_id`, or the cheapest offer matching the requirements across the enabled
    providers. `dry_run`: only the estimate (gpu, rate, hours, estimated cost)."""
    want = requirements_for(
        app,
        requirements=requirements,
        gpu=gpu,
        gpu_ram_gb=gpu_ram_gb,
        max_price=max_price,
        limit=500,
    )
    if offer_id is not None:
        want = Requirements(min_reliability=0.0, verified=False, limit=500, num_gpus=1)
    found, warnings = await search(app, provider, want)
    if offer_id is not None:
        found = [o for o in found if o.offer_id == offer_id]
    if not found:
        what = f"offer {offer_id!r}" if offer_id else "an offer matching the requirements"
        raise errors.NoOffer("; ".join([f"no {what} is available", *warnings]))
    offer = found[0]
    limits = app.limits()
    lease = policy.initial_lease(hours, limits)
    if dry_run:
        refused: errors.DomainError | None = None
        now = app.clock.now()
        try:
            await budget.check_new(app, offer.price_per_hour, lease, offer.billing, now)
        except errors.DomainError as exc:
            refused = exc
        return {
            "dry_run": True,
            **offer_dict(offer),
            "hours": lease / policy.HOUR,
            "estimated_cost": round(policy.estimate(offer.price_per_hour, lease, offer.billing), 6),
            # What will end it before the lease does: idle, or the hard cap from creation.
            "idle_timeout_s": limits.idle_timeout.total_seconds(),
            "hard_cap_h": limits.hard_cap / policy.HOUR,
            **(await _budget_today(app, now)),
            # What a real launch would answer (message and error code), or None.
            "refused": refused.message if refused else None,
            "refused_code": refused.code if refused else None,
            "warnings": warnings,
        }
    inst = await launcher.launch(app, offer, hours=hours, by=by)
    return {
        **(
            instance_dict(
                inst,
                app.clock.now(),
                limits=app.limits(),
                watchdog_interval=app.settings.policy.watchdog_interval,
            )
        ),
        "warnings": warnings,
    }


async def _budget_today(app: App, now: datetime) -> dict[str, Any]:
    """The daily window of budget_json, flat: daily_limit, _spent, _committed, _left."""
    return {f"daily_{k}": v for k, v in (await budget_json(app, now))["daily"].items()}


async def budget_json(app: App, now: datetime) -> dict[str, dict[str, float | None]]:
    """Each budget window (daily, monthly): its limit, the spend recorded, the spend
    committed (what live instances can still bill), and what is left for new rentals
    (None without a limit)."""
    out: dict[str, dict[str, float | None]] = {}
    for w in (await budget.state(app, now)).windows():
        left = None if w.limit is None else round(max(0.0, w.limit - w.committed), 6)
        out[w.name] = {
            "limit": w.limit,
            "spent": round(w.spent, 6),
            "committed": round(w.committed, 6),
            "left": left,
        }
    return out


async def queue_pause(app: App) -> dict[str, Any]:
    """Whether the job queue is paused, why (insufficient_credit, user, ...) and since when:
    the flag's last event."""
    paused = bool(await app.store.get_flag(QUEUE_PAUSED_FLAG, False))
    found = (
        await app.store.events(entity_id=QUEUE_PAUSED_FLAG, limit=1, newest=True) if paused else []
    )
    last = found[0] if found else None
    return {
        "queue_paused": paused,
        "queue_paused_reason": last.reason if last else None,
        "queue_paused_since": format_ts(last.at) if last else None,
    }


# --- lease and activity ------------------------------------------------------------------


async def extend(app: App, id: str, hours: float, *, by: str) -> dict[str, Any]:
    """Extend the lease by `hours` (counts as activity). Refusals say how much is allowed."""
    inst = await resolve_instance(app, id)
    now = app.clock.now()
    limits = app.limits()
    new_lease = policy.extend(inst, hours, limits, now)
    await budget.check_extension(app, inst, new_lease, now)
    await app.store.record(
        EntityKind.INSTANCE,
        inst.id,
        "extended",
        {
            "hours": hours,
            "from": format_ts(inst.lease_until),
            "to": format_ts(new_lease),
            "by": by,
        },
        updates={"lease_until": new_lease, "last_activity": now},
    )
    after = await app.store.get_instance(inst.id)
    return {
        "id": after.id,
        "lease_until": format_ts(after.lease_until),
        "extended_by_h": hours,
        "still_allowed_h": round(policy.lease_room(after, limits) / policy.HOUR, 6),
        **deadline_fields(after, policy.Observations(), limits, now),
    }


async def activity(app: App, id: str, *, by: str) -> dict[str, Any]:
    """Mark the instance active now (resets its idle deadline)."""
    inst = await resolve_instance(app, id)
    if inst.state not in (
        InstanceState.REQUESTED,
        InstanceState.PROVISIONING,
        InstanceState.RUNNING,
    ):
        raise errors.InvalidState(
            f"instance {inst.id} is {inst.state.value}", state=inst.state.value
        )
    now = app.clock.now()
    limits = app.limits()
    if policy.decide(inst, policy.Observations(), limits, now).terminate is not None:
        raise errors.InvalidState(f"instance {inst.id} is past its deadline; it is being ended")
    await app.store.record(
        EntityKind.INSTANCE, inst.id, "activity", {"by": by}, updates={"last_activity": now}
    )
    after = await app.store.get_instance(inst.id)
    return {"id": after.id, **deadline_fields(after, policy.Observations(), limits, now)}


# --- destroy -----------------------------------------------------------------------------


async def destroy(app: App, id: str, *, by: str) -> dict[str, Any]:
    """End the instance (reason manual; an instance already ending keeps its reason)."""
    inst = await resolve_instance(app, id)
    if not inst.state.live:
        raise errors.InvalidState(
            f"instance {inst.id} is already {inst.state.value}", state=inst.state.value
        )
    after = await app.terminator.end(inst.id, TerminationReason.MANUAL, {"by": by})
    return _ended_dict(after)


async def destroy_all(app: App, *, by: str) -> dict[str, Any]:
    term = app.terminator
    live = await app.store.live_instances()
    begun = [
        await term.begin(i.id, TerminationReason.MANUAL, {"by": by, "all": True}) for i in live
    ]
    await asyncio.gather(*(term.drive(i) for i in begun if i.provider_id is not None))
    after = [await app.store.get_instance(i.id) for i in begun]
    return {"instances": [_ended_dict(i) for i in after], "count": len(after)}


def _ended_dict(inst: Instance) -> dict[str, Any]:
    return {
        "id": inst.id,
        "provider": inst.provider,
        "provider_id": inst.provider_id,
        "state": inst.state.value,
        "reason": inst.reason.value if inst.reason else None,
        "confirmed": inst.state is InstanceState.TERMINATED,
    }


# --- status, history, costs --------------------------------------------------------------


STATUS_CHUNK = 250  # rows built between two yields to the event loop
STATUS_PAGE = 100  # rows `status` shows unless asked for more (`limit`, or `all`)


async def status(
    app: App,
    *,
    limit: int | None = None,
    all: bool = False,  # the socket's parameter, as `gpuwarden status --all` names it
    provider: str | None = None,
    state: str | None = None,
    gpu: str | None = None,
    id: str | None = None,
) -> dict[str, Any]:
    """The live instances matching the filters, in creation order: the first `limit` of
    them (STATUS_PAGE by default; `all`: every one) in `instances`, with `count` (every
    match), `shown`, and totals over every match. Read from the store's memory: no query
    of the instances. Without a filter, the totals are the ones the store keeps as rows
    change (core/totals.py) and the page is read without a walk of the fleet, so the
    default call costs the page, not the fleet. One answer is built at a time
    (`app.status_gate`): at 10,000 rows each holds tens of MB while it is built."""
    size = None if all else (limit or STATUS_PAGE)
    async with app.status_gate:
        return await _status(app, size=size, provider=provider, state=state, gpu=gpu, id=id)


async def _status(
    app: App,
    *,
    size: int | None,
    provider: str | None,
    state: str | None,
    gpu: str | None,
    id: str | None,
) -> dict[str, Any]:
    on = await jobs_on_instances(app)
    busy = frozenset(on)
    # Read after the await: totals asked at an earlier `now` than another caller's are
    # computed instance by instance (core/totals.py), which the default call must not do.
    now = app.clock.now()
    limits = app.limits()
    interval = app.settings.policy.watchdog_interval
    live = app.store.live
    if provider is None and state is None and gpu is None and id is None:
        count = len(live)
        shown = live.select() if size is None else live.first(size)
        rate, cost_now = live.cost_per_hour(), live.cost_now(now)
        est = live.est_total(busy, limits, now)
    else:
        one = None if id is None else live.get(id)
        found = [
            i
            for i in (live.select() if id is None else [one] if one else [])
            if (provider is None or i.provider == provider)
            and (state is None or i.state.value == state)
            and gpu_matches(gpu, i.gpu)
        ]
        count = len(found)
        shown = found if size is None else found[:size]
        rate = sum(i.price_per_hour for i in found if i.provider_id)
        cost_now = est = 0.0
        for n, inst in enumerate(found):
            if n % STATUS_CHUNK == STATUS_CHUNK - 1:
                await asyncio.sleep(0)  # thousands of rows: let a due deadline go first
            cost_now += policy.cost_so_far(inst, now)
            est += policy.est_total(inst, observations(inst, busy), limits, now)
    money = await budget_json(app, now)
    rows: list[dict[str, Any]] = []
    for n, inst in enumerate(shown):
        if n % STATUS_CHUNK == STATUS_CHUNK - 1:
            await asyncio.sleep(0)
        # "job": the job running on it now (job_id is the job it was rented for).
        row = instance_dict(inst, now, busy, limits=limits, watchdog_interval=interval)
        rows.append({**row, "job": on.get(inst.id)})
    return {
        "now": format_ts(now),
        "instances": rows,
        "count": count,
        "shown": len(rows),
        "cost_per_hour": round(rate, 6),
        "cost_now": round(cost_now, 6),
        "est_total": round(est, 6),
        "budget": money,
        **(await queue_pause(app)),
    }


def termination_dict(t: Termination) -> dict[str, Any]:
    return {
        "at": format_ts(t.at),
        "instance_id": t.instance_id,
        "provider": t.provider,
        "provider_id": t.provider_id,
        "reason": t.reason.value,
        "uptime_s": round(t.uptime_s, 3),
        "gpu": t.gpu,
        "region": t.region,
        "price_per_hour": t.price_per_hour,
        "cost": round(t.cost, 6),
    }


async def history(app: App, hours: float = 24.0) -> list[dict[str, Any]]:
    """Termination records of the last `hours`, oldest first, each with `by`: who asked for
    a manual end (from its event), else None (the daemon decided)."""
    since = app.clock.now() - timedelta(hours=hours)
    out = []
    for t in await app.store.terminations(since):
        by = await _ended_by(app, t.instance_id) if t.reason is TerminationReason.MANUAL else None
        out.append({**termination_dict(t), "by": by})
    return out


async def _ended_by(app: App, instance_id: str) -> str | None:
    """The `by` of the event that began the instance's end."""
    for ev in reversed(await app.store.events(entity_id=instance_id, name="state")):
        if ev.to_state == InstanceState.TERMINATING.value:
            by = ev.details.get("by")
            return by if isinstance(by, str) else None
    return None


async def costs(app: App, days: int = 7) -> dict[str, Any]:
    """Spend of the last `days` UTC days (from the termination record, plus live instances
    so far), by day, provider and reason; idle spend (the idle tails) shown apart."""
    now = app.clock.now()
    since = policy.days_start(days, now)
    ended = await app.store.terminations(since)
    spent = policy.spend(ended, await app.store.live_instances(), app.limits(), now)
    warm = await warm_spend.by_day(app, since)
    return {
        "since": format_ts(since),
        "days": warm_spend.days(spent, warm),
        **warm_spend.totals(warm),
        "by_provider": {k: round(v, 6) for k, v in sorted(spent.by_provider.items())},
        "by_reason": {k: round(v, 6) for k, v in sorted(spent.by_reason.items())},
        "total": round(spent.total, 6),
        "idle": round(spent.idle, 6),
        "live": round(spent.live, 6),
        # What spot saved against the on-demand price, and what preemptions cost.
        "spot": spot.summary(await app.store.spot_terminations(since)),
        "budget": await budget_json(app, now),
        **(await queue_pause(app)),
    }
