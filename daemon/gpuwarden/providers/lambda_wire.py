"""Lambda Cloud wire format <-> gpuwarden: pure functions, no I/O.

Facts follow the Lambda Cloud API v1 reference (OpenAPI 1.8.3): success bodies are
`{"data": ...}`, errors `{"error": {"code", "message", "suggestion"?}}` keyed on `code`;
prices in US cents per hour; GPU model and memory only in the type's description text.

Sim extension: an Instance payload may carry `ssh_port` (not in Lambda's schema). The
simulated cloud serves SSH on high loopback ports; real Lambda instances omit it (port 22).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from gpuwarden.core.gpus import gpu_matches
from gpuwarden.core.model import Billing
from gpuwarden.providers.base import (
    AuthError,
    InsufficientCredit,
    InvalidRequest,
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

USER_DATA_LIMIT = 1024 * 1024  # bytes of cloud-init user data Lambda accepts

# "1x A10 (24 GB PCIe)", "8x Tesla V100 (16 GB)", "H100 (80 GB SXM5)", "1x GH200 (96 GB)"
_DESC = re.compile(
    r"^\s*(?:(?P<count>\d+)x\s+)?(?P<name>.+?)\s*\(\s*(?P<ram>\d+(?:\.\d+)?)\s*GB\s*(?P<form>[^)]*)\)"
)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

STATUS_MAP: Mapping[str, ProviderState] = {
    "booting": ProviderState.PENDING,
    "active": ProviderState.RUNNING,
    "unhealthy": ProviderState.STOPPED,
    "terminating": ProviderState.TERMINATING,
    "terminated": ProviderState.TERMINATED,
    "preempted": ProviderState.TERMINATED,
}

# Error `code` -> taxonomy. Decisions where Lambda has no exact counterpart:
# * account-inactive is answered by *every* endpoint (listing too): the key cannot be used
#   until someone fixes the account, which is what AuthError tells the operator.
# * invalid-address (launch only) is Lambda's way of saying the card cannot be charged: the
#   closest to "cannot pay", so InsufficientCredit (pause the queue).
# * quota-exceeded: the account's instance quota is full; another offer (or provider) or a
#   later try can succeed, so NoCapacity rather than InvalidRequest.
CODE_MAP: Mapping[str, type[ProviderError]] = {
    "global/invalid-api-key": AuthError,
    "global/account-inactive": AuthError,
    "global/invalid-address": InsufficientCredit,
    "instance-operations/launch/insufficient-capacity": NoCapacity,
    "global/quota-exceeded": NoCapacity,
    "global/invalid-parameters": InvalidRequest,
    "instance-operations/launch/file-system-in-wrong-region": InvalidRequest,
    "instance-operations/launch/file-systems-not-supported": InvalidRequest,
    "global/duplicate": InvalidRequest,
    "ssh-keys/key-in-use": InvalidRequest,
    "global/object-does-not-exist": NotFound,
    "global/internal-error": Transient,
    "global/unknown": Transient,
}


def parse_description(text: str) -> tuple[str, float] | None:
    """("A10 PCIe", 24.0) from "1x A10 (24 GB PCIe)"; None when it does not parse."""
    m = _DESC.match(text or "")
    if not m:
        return None
    name = m.group("name").strip()
    form = m.group("form").strip()
    return (f"{name} {form}" if form else name), float(m.group("ram"))


def _gpu_of(it: Mapping[str, Any]) -> tuple[str, float]:
    for field in ("gpu_description", "description"):
        parsed = parse_description(str(it.get(field) or ""))
        if parsed:
            return parsed
    return str(it.get("gpu_description") or ""), 0.0


def _num_gpus(it: Mapping[str, Any]) -> int:
    specs = it.get("specs")
    return int(specs.get("gpus") or 0) if isinstance(specs, Mapping) else 0


def _price(it: Mapping[str, Any]) -> float:
    return float(it.get("price_cents_per_hour") or 0) / 100.0


def _region_ok(region: str, wanted: str | None) -> bool:
    return not wanted or region == wanted or region.startswith(wanted)


def _fits(o: Offer, want: Requirements) -> bool:
    if not gpu_matches(want.gpu_name, o.gpu_name):
        return False
    if o.num_gpus != want.num_gpus:
        return False
    if want.min_gpu_ram_gb is not None and o.gpu_ram_gb < want.min_gpu_ram_gb:
        return False
    if want.max_price is not None and o.price_per_hour > want.max_price:
        return False
    return _region_ok(o.region, want.region)


def to_offers(body: Any, provider: str, want: Requirements) -> list[Offer]:
    """One Offer per (GPU instance type, region with capacity) that meets `want`.

    Lambda has no spot market: on-demand offers also satisfy an interruptible request.
    """
    data = body.get("data") if isinstance(body, Mapping) else None
    offers: list[Offer] = []
    for entry in (data or {}).values() if isinstance(data, Mapping) else []:
        it = entry.get("instance_type") if isinstance(entry, Mapping) else None
        if not isinstance(it, Mapping) or _num_gpus(it) < 1 or not it.get("name"):
            continue
        gpu, ram = _gpu_of(it)
        for region in entry.get("regions_with_capacity_available") or []:
            rname = str(region.get("name") or "") if isinstance(region, Mapping) else ""
            if not rname:
                continue
            o = Offer(
                provider=provider,
                offer_id=f"{it['name']}@{rname}",
                gpu_name=gpu,
                num_gpus=_num_gpus(it),
                gpu_ram_gb=ram,
                price_per_hour=_price(it),
                region=rname,
                reliability=1.0,
                verified=True,
                billing=Billing.PER_MINUTE,
                raw={"instance_type": dict(it), "region": dict(region)},
            )
            if _fits(o, want):
                offers.append(o)
    offers.sort(key=lambda o: (o.price_per_hour, o.offer_id))
    return offers[: want.limit]


def split_offer_id(offer_id: str) -> tuple[str, str]:
    """ "gpu_1x_a10@us-east-1" -> ("gpu_1x_a10", "us-east-1")."""
    type_name, sep, region = offer_id.rpartition("@")
    if not sep or not type_name or not region:
        raise InvalidRequest(f"not a Lambda offer id (want '<type>@<region>'): {offer_id!r}")
    return type_name, region


def user_data(onstart: str, env: Mapping[str, str]) -> str | None:
    """cloud-init user data from a start-up script, with `env` exported (Lambda has no env).

    A plain script (Vast style) gets a `#!/bin/bash` line so that cloud-init runs it; values
    are shell-quoted; keys that are not shell names (Vast port mappings) are skipped; a
    `#cloud-config` document is passed through untouched.
    """
    if not onstart:
        return None
    if onstart.startswith("#cloud-config"):
        return onstart
    exports = [f"export {k}={shlex.quote(v)}" for k, v in env.items() if _ENV_NAME.match(k)]
    if onstart.startswith("#!"):
        first, _, rest = onstart.partition("\n")
        script = "\n".join([first, *exports, rest])
    else:
        script = "\n".join(["#!/bin/bash", *exports, onstart])
    if len(script.encode()) > USER_DATA_LIMIT:
        raise InvalidRequest(f"user_data is over Lambda's limit of {USER_DATA_LIMIT} bytes")
    return script


def state_of(status: Any) -> ProviderState:
    # A status we do not know: it exists and may still become reachable.
    return STATUS_MAP.get(str(status), ProviderState.PENDING)


def to_instance(raw: Mapping[str, Any], provider: str) -> ProviderInstance:
    it = raw.get("instance_type")
    it = it if isinstance(it, Mapping) else {}
    region = raw.get("region")
    ip = raw.get("ip") or None
    port: int | None = None
    if ip:
        try:
            port = int(raw.get("ssh_port") or 22)  # ssh_port: sim extension, see module doc
        except (TypeError, ValueError):
            port = 22
    return ProviderInstance(
        provider=provider,
        provider_id=str(raw["id"]),
        label=str(raw.get("name") or ""),
        state=state_of(raw.get("status")),
        gpu_name=_gpu_of(it)[0],
        num_gpus=_num_gpus(it) or 1,
        price_per_hour=_price(it),
        region=str(region.get("name") or "") if isinstance(region, Mapping) else "",
        started_at=None,  # Lambda reports no launch time
        ssh_host=str(ip) if ip else None,
        ssh_port=port,
        ssh_user="ubuntu",
        raw=dict(raw),
    )


def classify(status: int, body: Any, now: datetime) -> ProviderError | None:
    """Lambda's reply -> None (success) or the taxonomy's error, keyed on `error.code`."""
    del now  # Lambda gives no retry times in bodies
    if status < 400:
        return None
    err = body.get("error") if isinstance(body, Mapping) else None
    err = err if isinstance(err, Mapping) else {}
    code = str(err.get("code") or "")
    message = str(err.get("message") or (body if isinstance(body, str) else ""))[:300]
    what = f"lambda {status} {code}: {message}".strip()
    if status == 429:
        return RateLimited(what, status=status)
    if status == 404 and not code:
        # Lambda says "gone" with a JSON error code; a bare 404 page is a proxy's or an outage's.
        return Transient(f"{what} (not Lambda's JSON error)", status=status)
    cls = CODE_MAP.get(code)
    if cls is None and code.startswith("provider/"):
        cls = Transient  # the upstream provider is unavailable: "try again shortly"
    if cls is None:
        cls = _by_status(status)
    return cls(what, status=status)


def _by_status(status: int) -> type[ProviderError]:
    if status in (401, 403):
        return AuthError
    if status == 404:
        return NotFound
    if status >= 500:
        return Transient
    return InvalidRequest
