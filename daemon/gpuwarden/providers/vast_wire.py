"""Vast.ai wire format <-> gpuwarden: pure functions, no I/O (tested with reference payloads).

Facts follow the reference notes on the Vast API (units, statuses, error bodies):
GPU RAM in MB, prices in USD/hour (`dph_total`, storage included), start times as epoch
floats, errors as `{"success": false, "error": code, "msg": ...}` or plain text on 429.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from gpuwarden.core.gpus import gpu_matches
from gpuwarden.core.model import Billing
from gpuwarden.providers.base import (
    AuthError,
    CreatedWithError,
    InsufficientCredit,
    InvalidRequest,
    LaunchSpec,
    NoCapacity,
    NotFound,
    Offer,
    ProviderError,
    ProviderInstance,
    ProviderState,
    RateLimited,
    Requirements,
    Transient,
)
from gpuwarden.providers.http import error_text

# Vast's gpu_name values (with spaces). A Requirements.gpu_name that matches some of these
# (core.gpus.gpu_matches) is sent as an `in` filter so the server's limit applies to the right
# GPUs; anything else is matched client-side only.
KNOWN_GPUS = (
    "RTX 3060",
    "RTX 3070",
    "RTX 3080",
    "RTX 3080 Ti",
    "RTX 3090",
    "RTX 3090 Ti",
    "RTX 4060 Ti",
    "RTX 4070",
    "RTX 4070 Ti",
    "RTX 4080",
    "RTX 4080S",
    "RTX 4090",
    "RTX 5090",
    "RTX A4000",
    "RTX A5000",
    "RTX A6000",
    "RTX 6000Ada",
    "A10",
    "A40",
    "L4",
    "L40",
    "L40S",
    "A100 PCIE",
    "A100 SXM4",
    "A100X",
    "H100 PCIE",
    "H100 SXM",
    "H100 NVL",
    "H200",
    "Tesla V100",
    "Tesla T4",
)

ONSTART_LIMIT = 4048  # characters Vast accepts in `onstart`
LIST_ORDER = json.dumps([{"col": "id", "dir": "asc"}], separators=(",", ":"))

_PENDING = {None, "created", "loading", "scheduling", "rebooting"}
_DEAD = {"stopped", "exited", "frozen", "unknown", "offline"}  # never running again by itself


def search_query(want: Requirements) -> dict[str, Any]:
    """The POST /api/v0/bundles/ body (the filter object itself, not wrapped in "q")."""
    q: dict[str, Any] = {
        "rentable": {"eq": True},
        "external": {"eq": False},
        "rented": {"eq": False},
        "num_gpus": {"eq": want.num_gpus},
        "reliability": {"gte": want.min_reliability},
        "order": [["dph_total", "asc"]],
        # On-demand rows carry min_bid too, and renting an ask with a `price` makes it
        # interruptible (the SDK's create --price): one search yields both markets.
        "type": "on-demand",
        "limit": want.limit,
    }
    if want.verified:
        q["verified"] = {"eq": True}
    if want.disk_gb is not None:
        # dph_total then includes the storage for this disk (without it, Vast quotes 8 GB).
        q["allocated_storage"] = want.disk_gb
    if want.min_gpu_ram_gb is not None:
        # Vast's own CLI converts GB with x1000: a "24 GB" RTX 4090 reports 24564 MB, which a
        # x1024 bound would exclude.
        q["gpu_ram"] = {"gte": round(want.min_gpu_ram_gb * 1000)}
    if want.max_price is not None and not want.interruptible:
        # (a spot price is lower than dph_total: those rows are filtered in to_offers)
        q["dph_total"] = {"lte": want.max_price}
    names = gpu_candidates(want.gpu_name)
    if names:
        q["gpu_name"] = {"in": names}
    if want.region and len(want.region) == 2 and want.region.isalpha():
        q["geolocation"] = {"in": [want.region.upper()]}
    return q


def gpu_candidates(wanted: str | None) -> list[str]:
    if not wanted:
        return []
    return [n for n in KNOWN_GPUS if gpu_matches(wanted, n)]


def _region_ok(geo: str, region: str | None) -> bool:
    if not region:
        return True
    if len(region) == 2 and region.isalpha():
        return geo.rsplit(",", 1)[-1].strip().upper() == region.upper()
    return region.lower() in geo.lower()


def to_offer(raw: Mapping[str, Any], provider: str) -> Offer:
    """An on-demand offer (its raw row keeps min_bid for `spot_variant`)."""
    price = float(raw.get("dph_total") or 0.0)
    rel = raw.get("reliability2", raw.get("reliability"))
    return Offer(
        provider=provider,
        offer_id=str(raw["id"]),
        gpu_name=str(raw.get("gpu_name") or ""),
        num_gpus=int(raw.get("num_gpus") or 1),
        gpu_ram_gb=float(raw.get("gpu_ram") or 0.0) / 1024.0,
        price_per_hour=price,
        region=str(raw.get("geolocation") or ""),
        reliability=float(rel) if rel is not None else 1.0,
        verified=raw.get("verification", "verified") == "verified",
        billing=Billing.PER_SECOND,
        storage_per_hour=_storage(raw, price),
        raw=dict(raw),
    )


def _storage(raw: Mapping[str, Any], total: float) -> float:
    """The storage part of dph_total (billed also while a spot instance is stopped)."""
    value = raw.get("storage_total_cost")
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    base = raw.get("dph_base")
    if isinstance(base, int | float) and not isinstance(base, bool):
        return max(0.0, round(total - float(base), 6))
    return 0.0


def spot_variant(offer: Offer) -> Offer | None:
    """The same ask rented as spot at its minimum bid, or None without a usable min_bid."""
    min_bid = offer.raw.get("min_bid")
    if not isinstance(min_bid, int | float) or isinstance(min_bid, bool) or min_bid <= 0:
        return None
    return replace(
        offer,
        interruptible=True,
        min_bid=float(min_bid),
        bid=None,
        price_per_hour=round(float(min_bid) + offer.storage_per_hour, 6),
        on_demand_price=offer.price_per_hour,
    )


def to_offers(body: Any, provider: str, want: Requirements) -> list[Offer]:
    """Normalise a search reply; apply what the server filter could not express."""
    rows = body.get("offers") if isinstance(body, Mapping) else None
    offers: list[Offer] = []
    for raw in rows or []:
        if not isinstance(raw, Mapping) or raw.get("id") is None:
            continue
        o = to_offer(raw, provider)
        if not gpu_matches(want.gpu_name, o.gpu_name) or not _region_ok(o.region, want.region):
            continue
        spot = spot_variant(o) if want.interruptible else None
        for variant in (o, spot):
            if variant is None:
                continue
            if want.max_price is not None and variant.price_per_hour > want.max_price:
                continue
            offers.append(variant)
    offers.sort(key=lambda o: o.price_per_hour)
    return offers[: want.limit]


def launch_body(offer: Offer, spec: LaunchSpec) -> dict[str, Any]:
    """The PUT /api/v0/asks/{id}/ body. Raises InvalidRequest for what Vast would refuse."""
    if len(spec.onstart) > ONSTART_LIMIT:
        raise InvalidRequest(
            f"onstart is {len(spec.onstart)} characters; Vast accepts at most {ONSTART_LIMIT}"
        )
    body: dict[str, Any] = {
        "client_id": "me",
        "image": spec.image,
        "disk": spec.disk_gb,
        "label": spec.label,
        "env": dict(spec.env),
        "runtype": "ssh_direct",
        "cancel_unavail": True,
    }
    if spec.onstart:
        body["onstart"] = spec.onstart
    if offer.interruptible:
        bid = offer.bid if offer.bid is not None else offer.min_bid
        if bid is None or bid <= 0:
            raise InvalidRequest(f"spot offer {offer.offer_id} has no bid price")
        body["price"] = round(bid, 6)
    return body


def state_of(raw: Mapping[str, Any]) -> ProviderState:
    """Map actual_status / cur_state / intended_status to ours (SkyPilot-style status map)."""
    actual = raw.get("actual_status")
    if actual == "running":
        return ProviderState.RUNNING
    if actual in _DEAD:
        return ProviderState.STOPPED
    if actual == "created" and "OCI runtime create failed" in str(raw.get("status_msg") or ""):
        return ProviderState.STOPPED  # the container can never start
    return _pending_state(actual, raw.get("cur_state"), raw.get("intended_status"))


def _pending_state(actual: Any, cur: Any, intended: Any) -> ProviderState:
    if actual in _PENDING:
        if cur == "stopped" and intended == "stopped":
            return ProviderState.STOPPED  # outbid, or a low bid created stopped
        return ProviderState.PENDING
    if cur == "unloaded":
        return ProviderState.TERMINATING  # released: being destroyed
    return ProviderState.PENDING  # a status we do not know yet: exists, may become reachable


def ssh_endpoint(raw: Mapping[str, Any]) -> tuple[str | None, int | None]:
    """Direct (public_ipaddr + ports["22/tcp"]) when mapped, else Vast's SSH proxy."""
    ports = raw.get("ports")
    ip = str(raw.get("public_ipaddr") or "").strip()
    if isinstance(ports, Mapping) and ip:
        for bind in ports.get("22/tcp") or []:
            try:
                return ip, int(bind["HostPort"])
            except (KeyError, TypeError, ValueError):
                continue
    host, port = raw.get("ssh_host"), raw.get("ssh_port")
    if host and port:
        try:
            return str(host), int(port)
        except (TypeError, ValueError):
            return None, None
    return None, None


def epoch(value: Any) -> datetime | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return datetime.fromtimestamp(float(value), tz=UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        return None


def outbid(raw: Mapping[str, Any]) -> bool:
    """An interruptible instance that lost its bid: Vast stops it, and shows cur_state,
    intended_status and next_state all `stopped` (dstack's test for "interrupted")."""
    stopped = all(raw.get(k) == "stopped" for k in ("cur_state", "intended_status", "next_state"))
    return bool(raw.get("is_bid")) and stopped


def to_instance(raw: Mapping[str, Any], provider: str) -> ProviderInstance:
    host, port = ssh_endpoint(raw)
    return ProviderInstance(
        provider=provider,
        provider_id=str(raw["id"]),
        label=str(raw.get("label") or ""),
        state=state_of(raw),
        gpu_name=str(raw.get("gpu_name") or ""),
        num_gpus=int(raw.get("num_gpus") or 1),
        price_per_hour=float(raw.get("dph_total") or 0.0),
        region=str(raw.get("geolocation") or ""),
        started_at=epoch(raw.get("start_date")),
        ssh_host=host,
        ssh_port=port,
        ssh_user="root",
        preempted=outbid(raw),
        raw=dict(raw),
    )


def ssh_key_rows(body: Any) -> list[Mapping[str, Any]]:
    """GET /api/v0/ssh/ answers a bare list; tolerate a wrapped one."""
    if isinstance(body, Mapping):
        body = body.get("ssh_keys") or body.get("keys") or []
    return [k for k in body if isinstance(k, Mapping)] if isinstance(body, list) else []


def _until_utc_midnight(now: datetime) -> float:
    nxt = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return (nxt - now).total_seconds()


def classify(status: int, body: Any, now: datetime) -> ProviderError | None:
    """Vast's reply -> None (success) or the taxonomy's error. Pure."""
    d: Mapping[str, Any] = body if isinstance(body, Mapping) else {}
    if status < 400 and d.get("success") is not False:
        return None
    code = str(d.get("error") or "")
    msg = error_text(body, "msg", "message", "detail", "error")
    what = f"vast {status} {code}: {msg}".strip()
    if status == 404 and not isinstance(body, Mapping):
        # Vast says "gone" in JSON (no_such_instance); a 404 page is a proxy's or an outage's.
        return Transient(f"{what} (not Vast's JSON)", status=status)
    contract = d.get("new_contract")
    if contract:
        # An error that still created an instance (e.g. a low bid is created stopped).
        return CreatedWithError(what, provider_id=str(contract))
    return _error_for(status, code, text=f"{code} {msg}".lower(), what=what, body=d, now=now)


def _error_for(  # noqa: PLR0911 - one return per row of the mapping table
    status: int, code: str, *, text: str, what: str, body: Mapping[str, Any], now: datetime
) -> ProviderError:
    if status == 429 or code in ("rate_limit_exceeded", "search_quota_exceeded"):
        # The daily search quota resets at UTC midnight: no use retrying before then.
        after = _until_utc_midnight(now) if code == "search_quota_exceeded" else None
        return RateLimited(what, status=status, retry_after=after)
    if "too frequent" in text:
        return RateLimited(what, status=status)
    if code == "auth_error" or "invalid user key" in text or status == 401:
        return AuthError(what, status=status)
    # Assumed shape (no documented body): "insufficient_credit"; the prepay endpoint uses 411.
    if "insufficient_credit" in code or "insufficient credit" in text or status in (402, 411):
        return InsufficientCredit(what, status=status)
    if "no_such_ask" in text or status == 410:
        return NoCapacity(what, status=status)
    if code in ("no_such_instance", "not_found"):
        return NotFound(what, status=status)
    if status == 403:
        # "Offer N is not your own" names the ask: that offer is not for us, try another.
        return (
            NoCapacity(what, status=status) if "ask_id" in body else AuthError(what, status=status)
        )
    if status == 404:
        return NotFound(what, status=status)
    if status >= 500:
        return Transient(what, status=status)
    return InvalidRequest(what, status=status)
