"""Instances as the control socket shows them: plain dicts of JSON-friendly values, built
from a record, the limits and `now` (pure: `status` builds one per row it shows)."""

from __future__ import annotations

from collections.abc import Set as AbstractSet
from datetime import datetime, timedelta
from typing import Any

from gpuwarden.core import policy
from gpuwarden.core.clock import format_ts
from gpuwarden.core.model import Instance, InstanceState, TerminationReason
from gpuwarden.fleet.busy import observations


def deadline_fields(
    inst: Instance, obs: policy.Observations, limits: policy.Limits, now: datetime
) -> dict[str, Any]:
    when, reason = policy.earliest_deadline(inst, obs, limits, now)
    return _deadline(inst, when, reason, now)


def _deadline(
    inst: Instance, when: datetime, reason: TerminationReason, now: datetime
) -> dict[str, Any]:
    live = inst.state.live and inst.state is not InstanceState.TERMINATING
    return {
        "deadline": format_ts(when),
        "deadline_reason": reason.value,
        "time_left_s": round((when - now).total_seconds(), 3),
        "expired": live and now >= when,
    }


# The part of a row that depends on the record alone, built once per committed record:
# `status` would otherwise format five timestamps and a dozen fields of every row it shows
# on each call. Keyed by id and checked by identity: records are frozen and every commit
# makes a new one, so a changed instance is never shown from an old entry.
_STATIC: dict[str, tuple[Instance, dict[str, Any]]] = {}
_STATIC_MAX = 50_000  # past this the cache starts again (ended instances leave entries)


def _static(inst: Instance) -> dict[str, Any]:
    hit = _STATIC.get(inst.id)
    if hit is not None and hit[0] is inst:
        return hit[1]
    row = {
        "id": inst.id,
        "provider": inst.provider,
        "provider_id": inst.provider_id,
        "label": inst.label,
        "gpu": inst.gpu,
        "num_gpus": inst.num_gpus,
        "region": inst.region,
        "state": inst.state.value,
        "reason": inst.reason.value if inst.reason else None,
        "created_at": format_ts(inst.created_at),
        "uptime_s": 0.0,
        "lease_until": format_ts(inst.lease_until),
        "last_activity": format_ts(inst.last_activity),
        "busy": False,
        "deadline": None,
        "deadline_reason": None,
        "time_left_s": None,
        "expired": False,
        "price_per_hour": inst.price_per_hour,
        "spot": inst.extra.get("spot"),  # the bid, min bid and on-demand price; None: on demand
        "billing": inst.billing.value,
        "cost_now": 0.0,
        "est_total": 0.0,
        "strikes": inst.strikes,
        "last_probe_at": format_ts(inst.last_probe_at),
        "last_probe_ok": inst.last_probe_ok,
        "deadman": inst.extra.get("deadman"),  # the switch as the last probe saw it
        "ssh": f"{inst.ssh_user}@{inst.ssh_host}:{inst.ssh_port}" if inst.ssh_host else None,
        # SSH has answered (the watchdog's first good probe pinned its host key): only then
        # does `status` show a running instance as running rather than booting.
        "ssh_ready": inst.extra.get("host_key") is not None,
        "probe_stale": False,
        "job_id": inst.job_id,
    }
    if len(_STATIC) >= _STATIC_MAX:
        _STATIC.clear()
    _STATIC[inst.id] = (inst, row)
    return row


def instance_dict(
    inst: Instance,
    now: datetime,
    busy: AbstractSet[str] | None = None,
    *,
    limits: policy.Limits,
    watchdog_interval: timedelta,
) -> dict[str, Any]:
    """An instance as the socket shows it (`status`, `launch`) at `now`: the record's own
    fields (built once per record), then what depends on `now`, the jobs and the limits."""
    obs = observations(inst, busy or set())
    start = policy.billing_start(inst)
    end = inst.terminated_at or now
    when, reason = policy.earliest_deadline(inst, obs, limits, now)
    row = dict(_static(inst))  # a copy: the keys keep their order, the values change
    row["uptime_s"] = round((end - start).total_seconds(), 3) if start else 0.0
    row["busy"] = obs.busy
    row.update(_deadline(inst, when, reason, now))
    row["cost_now"] = round(policy.cost_so_far(inst, now), 6)
    # policy.est_total, without finding the earliest deadline a second time
    row["est_total"] = round(policy.cost_until(inst, when, now), 6)
    row["probe_stale"] = policy.probe_stale(inst, watchdog_interval, now)
    return row
