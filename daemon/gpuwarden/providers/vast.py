"""The Vast.ai client: the Provider port over Vast's REST API (console.vast.ai).

Endpoints: POST /api/v0/bundles/ (search), GET+POST /api/v0/ssh/ (account SSH keys),
PUT /api/v0/asks/{id}/ (rent), GET /api/v1/instances/ (list, keyset paging),
GET/DELETE /api/v0/instances/{id}/ (show, destroy), GET /api/v0/users/current (credit).
Wire mapping lives in `vast_wire` (pure); this module does the calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, Unpack

from gpuwarden.core.model import Billing
from gpuwarden.providers import vast_wire as wire
from gpuwarden.providers.base import (
    Account,
    Launched,
    LaunchSpec,
    NotFound,
    Offer,
    ProviderInstance,
    Requirements,
    Transient,
)
from gpuwarden.providers.http import GENERAL, ClientOptions, HttpProvider
from gpuwarden.providers.sshkeys import key_material

DEFAULT_BASE_URL = "https://console.vast.ai"

# Vast limits each endpoint to a minimum interval per identity (429 "API requests too
# frequent: endpoint threshold=..."); search is documented at 10 requests/minute.
DEFAULT_PACING: Mapping[str, float] = {GENERAL: 0.25, "search": 6.0, "launch": 1.0}

MAX_PAGES = 400  # 25 instances a page: 10,000 instances is far beyond any installation


class VastClient(HttpProvider):
    """Vast.ai. Billing per second; SSH as root; each instance gets its own API key."""

    billing = Billing.PER_SECOND

    default_name = "vast"
    default_base_url = DEFAULT_BASE_URL
    default_pacing = DEFAULT_PACING

    def __init__(self, **options: Unpack[ClientOptions]) -> None:
        super().__init__(wire.classify, options)
        self._registered_keys: set[str] = set()
        self._key_lock = asyncio.Lock()

    async def search_offers(self, want: Requirements) -> list[Offer]:
        reply = await self._api.request(
            "POST", "/api/v0/bundles/", json=wire.search_query(want), pace=(GENERAL, "search")
        )
        return wire.to_offers(reply.body, self.name, want)

    async def launch(self, offer: Offer, spec: LaunchSpec) -> Launched:
        """Rent the offer. Not repeated after a send that may have taken effect (Transient)."""
        body = wire.launch_body(offer, spec)  # validate before touching the account
        for public_key in (spec.ssh_public_key, *spec.authorized_keys):
            if public_key:
                await self._ensure_ssh_key(public_key)
        reply = await self._api.request(
            "PUT",
            f"/api/v0/asks/{offer.offer_id}/",
            json=body,
            pace=(GENERAL, "launch"),
            idempotent=False,
        )
        data: Mapping[str, Any] = reply.body if isinstance(reply.body, Mapping) else {}
        contract = data.get("new_contract")
        if not contract:
            raise Transient(
                f"vast rented ask {offer.offer_id} but named no new_contract",
                provider=self.name,
                status=reply.status,
            )
        key = data.get("instance_api_key")
        return Launched(provider_id=str(contract), instance_api_key=str(key) if key else None)

    async def _ensure_ssh_key(self, public_key: str) -> None:
        """Register our key on the account before renting: Vast injects account keys into
        new instances. Done once per key and client."""
        material = key_material(public_key)
        if not material or material in self._registered_keys:
            return
        async with self._key_lock:
            if material in self._registered_keys:
                return
            reply = await self._api.request("GET", "/api/v0/ssh/")
            present = {
                key_material(str(k.get("key") or k.get("public_key") or ""))
                for k in wire.ssh_key_rows(reply.body)
                if not k.get("deleted_at")
            }
            if material not in present:
                await self._api.request(
                    "POST", "/api/v0/ssh/", json={"ssh_key": public_key.strip()}
                )
            self._registered_keys.add(material)

    async def list_instances(self, label_prefix: str) -> list[ProviderInstance]:
        """Every instance on the account (v1 list, keyset paging) whose label has the prefix."""
        out: list[ProviderInstance] = []
        token: str | None = None
        seen: set[str] = set()
        for _ in range(MAX_PAGES):
            params = {"select_filters": "{}", "order_by": wire.LIST_ORDER, "limit": "25"}
            if token:
                params["after_token"] = token
            reply = await self._api.request("GET", "/api/v1/instances/", params=params)
            body = _json_object(reply.body, "instance list", self.name)
            page = body.get("instances")
            if not isinstance(page, list):
                # A garbled page must not read as "none of ours left": the reconciler would
                # take every running instance for vanished.
                raise Transient(
                    "vast answered the instance list without a list", provider=self.name
                )
            for raw in page:
                if _ours(raw, label_prefix):
                    out.append(wire.to_instance(raw, self.name))
            nxt = body.get("next_token")
            if not nxt or str(nxt) in seen:
                return out
            token = str(nxt)
            seen.add(token)
        raise Transient(
            f"vast instance list did not end after {MAX_PAGES} pages", provider=self.name
        )

    async def get(self, provider_id: str) -> ProviderInstance | None:
        try:
            reply = await self._api.request(
                "GET", f"/api/v0/instances/{provider_id}/", params={"owner": "me"}
            )
        except NotFound:
            return None
        body = _json_object(reply.body, "instance", self.name)
        if "instances" not in body:
            raise Transient(
                "vast answered an instance query without 'instances'", provider=self.name
            )
        raw = body["instances"]
        if isinstance(raw, list):  # the legacy list shape
            raw = next((r for r in raw if str(r.get("id")) == provider_id), None)
        if not isinstance(raw, Mapping) or raw.get("id") is None:
            return None  # {"instances": null}: destroyed or never ours
        return wire.to_instance(raw, self.name)

    async def destroy(self, provider_id: str) -> None:
        """DELETE the instance; "no_such_instance" (or a 404) means it is already gone."""
        try:
            await self._api.request("DELETE", f"/api/v0/instances/{provider_id}/", json={})
        except NotFound:
            return

    async def account(self) -> Account:
        reply = await self._api.request("GET", "/api/v0/users/current")
        body = reply.body if isinstance(reply.body, Mapping) else {}
        credit = body.get("credit")
        email = body.get("email")
        return Account(
            provider=self.name,
            credit=float(credit) if isinstance(credit, int | float) else None,
            email=str(email) if email else None,
        )


def _ours(raw: Any, label_prefix: str) -> bool:
    return (
        isinstance(raw, Mapping)
        and raw.get("id") is not None
        and str(raw.get("label") or "").startswith(label_prefix)
    )


def _json_object(body: Any, what: str, provider: str) -> Mapping[str, Any]:
    """Vast's JSON object, or Transient: an HTML page, an empty or garbled body (a proxy, an
    outage) says nothing about the instance, so it may never be read as "gone"."""
    if not isinstance(body, Mapping):
        kind = "an empty body" if body is None else f"{type(body).__name__}, not a JSON object"
        raise Transient(f"vast answered the {what} with {kind}", provider=provider)
    return body
