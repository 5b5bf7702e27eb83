"""The Lambda Cloud client: the Provider port over Lambda's API v1 (cloud.lambda.ai/api/v1).

Endpoints: GET /instance-types (offers), GET+POST /ssh-keys (our key, by name),
POST /instance-operations/launch, GET /instances and /instances/{id},
POST /instance-operations/terminate. Wire mapping lives in `lambda_wire` (pure).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Mapping
from typing import Any, Unpack

from gpuwarden.core.model import Billing
from gpuwarden.providers import lambda_wire as wire
from gpuwarden.providers.base import (
    Account,
    Launched,
    LaunchSpec,
    NoCapacity,
    NotFound,
    Offer,
    ProviderInstance,
    Requirements,
    Transient,
)
from gpuwarden.providers.http import GENERAL, ClientOptions, HttpProvider
from gpuwarden.providers.sshkeys import key_material

DEFAULT_BASE_URL = "https://cloud.lambda.ai/api/v1"

# Lambda: "generally one request per second"; launch "one request per 12 seconds".
DEFAULT_PACING: Mapping[str, float] = {GENERAL: 1.0, "launch": 12.0}


class LambdaClient(HttpProvider):
    """Lambda Cloud. Billing per minute; SSH as ubuntu; keys are account-level, by name."""

    billing = Billing.PER_MINUTE

    default_name = "lambda"
    default_base_url = DEFAULT_BASE_URL
    default_pacing = DEFAULT_PACING

    def __init__(
        self, *, ssh_key_name: str = "gpuwarden", **options: Unpack[ClientOptions]
    ) -> None:
        super().__init__(wire.classify, options)
        self.ssh_key_name = ssh_key_name
        self._key_names: dict[str, str] = {}  # key material -> the name it is registered as
        self._key_lock = asyncio.Lock()

    async def search_offers(self, want: Requirements) -> list[Offer]:
        reply = await self._api.request("GET", "/instance-types")
        return wire.to_offers(reply.body, self.name, want)

    async def launch(self, offer: Offer, spec: LaunchSpec) -> Launched:
        """Launch one instance named with our label. Not repeated after a send that may
        have taken effect (Transient); the reconciler finds it by name."""
        type_name, region = wire.split_offer_id(offer.offer_id)
        body: dict[str, Any] = {
            "region_name": region,
            "instance_type_name": type_name,
            "ssh_key_names": [await self._ssh_key_for(spec.ssh_public_key)],
            "name": spec.label,
            "quantity": 1,
        }
        script = wire.user_data(spec.onstart, spec.env)
        if script is not None:
            body["user_data"] = script
        try:
            reply = await self._api.request(
                "POST",
                "/instance-operations/launch",
                json=body,
                pace=(GENERAL, "launch"),
                idempotent=False,
            )
        except NotFound as exc:
            # Unknown type, region or key name: the offer is stale (or our key was deleted:
            # look it up again next time).
            self._key_names.clear()
            raise NoCapacity(str(exc), provider=self.name, status=exc.status) from exc
        data = reply.body.get("data") if isinstance(reply.body, Mapping) else None
        ids = data.get("instance_ids") if isinstance(data, Mapping) else None
        if not ids:
            raise Transient(
                "lambda launch answered without an instance id", provider=self.name, status=200
            )
        return Launched(provider_id=str(ids[0]))

    async def _ssh_key_for(self, public_key: str) -> str:
        """The name under which `public_key` is registered, registering it if needed.

        Prefer our fixed name; if that name holds a different key (another installation),
        register ours under `<name>-<digest>` rather than launch with a key we do not hold.
        """
        material = key_material(public_key)
        if not material:
            return self.ssh_key_name  # no key given: assume the operator registered ours
        if material in self._key_names:
            return self._key_names[material]
        async with self._key_lock:
            if material not in self._key_names:
                self._key_names[material] = await self._register_key(public_key, material)
            return self._key_names[material]

    async def _register_key(self, public_key: str, material: str) -> str:
        keys = await self._list_keys()
        matching = [k["name"] for k in keys if key_material(k.get("public_key", "")) == material]
        if matching:
            return self.ssh_key_name if self.ssh_key_name in matching else matching[0]
        name = self.ssh_key_name
        if any(k["name"] == name for k in keys):
            name = f"{name}-{hashlib.sha256(material.encode()).hexdigest()[:8]}"
        await self._api.request(
            "POST", "/ssh-keys", json={"name": name, "public_key": public_key.strip()}
        )
        return name

    async def _list_keys(self) -> list[dict[str, str]]:
        reply = await self._api.request("GET", "/ssh-keys")
        data = reply.body.get("data") if isinstance(reply.body, Mapping) else None
        return [
            {"name": str(k.get("name") or ""), "public_key": str(k.get("public_key") or "")}
            for k in (data if isinstance(data, list) else [])
            if isinstance(k, Mapping)
        ]

    async def list_instances(self, label_prefix: str) -> list[ProviderInstance]:
        reply = await self._api.request("GET", "/instances")
        data = reply.body.get("data") if isinstance(reply.body, Mapping) else None
        if not isinstance(data, list):
            # A garbled listing must not read as "none of ours left".
            raise Transient(
                "lambda answered the instance list without a data list", provider=self.name
            )
        return [
            wire.to_instance(raw, self.name)
            for raw in data
            if isinstance(raw, Mapping)
            and raw.get("id") is not None
            and str(raw.get("name") or "").startswith(label_prefix)
        ]

    async def get(self, provider_id: str) -> ProviderInstance | None:
        try:
            reply = await self._api.request("GET", f"/instances/{provider_id}")
        except NotFound:
            return None
        data = reply.body.get("data") if isinstance(reply.body, Mapping) else None
        if not isinstance(data, Mapping) or data.get("id") is None:
            # Lambda names a gone instance with a JSON 404 (or its status): anything else, an
            # HTML page or an empty body, says nothing about it.
            raise Transient(
                "lambda answered an instance query without its data", provider=self.name
            )
        return wire.to_instance(data, self.name)

    async def destroy(self, provider_id: str) -> None:
        """Terminate; "object-does-not-exist" means it is already gone."""
        try:
            await self._api.request(
                "POST", "/instance-operations/terminate", json={"instance_ids": [provider_id]}
            )
        except NotFound:
            return

    async def account(self) -> Account:
        """Lambda bills a card, so there is no credit to report; the call still checks the
        key (AuthError on a bad or inactive account) and refreshes the SSH key cache."""
        keys = await self._list_keys()
        present = {key_material(k["public_key"]): k["name"] for k in keys}
        for material in [m for m, n in self._key_names.items() if present.get(m) != n]:
            del self._key_names[material]  # deleted behind our back: register it again
        return Account(provider=self.name, credit=None)
