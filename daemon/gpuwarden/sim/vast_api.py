"""The Vast.ai REST API as the sim serves it, under `/vast` (client base URL
`http://127.0.0.1:PORT/vast`). Shapes follow the official spec and the reference examples.

Auth: `Authorization: Bearer <key>` or `?api_key=<key>`. The account key (settings.api_key, or
"sim-key") may do everything; an instance's own `instance_api_key` (CONTAINER_API_KEY on the
instance) may only show and destroy that instance. Offer search works without a key.
Sim-specific: `public_ipaddr` is 127.0.0.1 and `ports["22/tcp"][0]["HostPort"]` is the
instance's loopback SSH port; `ssh_host`/`ssh_port` name the same server.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from aiohttp import web

from gpuwarden.sim import catalog
from gpuwarden.sim.core import SimCore, SimInstance
from gpuwarden.sim.vast_payload import env_pairs, instance_payload, iso
from gpuwarden.sim.vast_query import (
    QueryError,
    instance_value,
    matches,
    offer_value,
    order_key,
    page_after,
    parse_instance_order,
    parse_offer_order,
)
from gpuwarden.sim.web import add, fault_middleware, json_body, json_object, presented_key

ACCOUNT, INSTANCE = "account", "instance_key"
USER_ID = 412377
PAGE_MAX = 25
DEFAULT_DISK_GB = 10.0  # the SDK's default
JSON = "application/json"


def respond(data: Any, status: int = 200) -> web.Response:
    """JSON with `Content-Type: application/json` exactly, as Vast sends it: official clients
    compare the header, and aiohttp's json_response would add `; charset=utf-8`."""
    return web.Response(body=json.dumps(data).encode(), status=status, content_type=JSON)


def error(status: int, code: str, msg: str, **extra: Any) -> web.Response:
    return respond({"success": False, "error": code, "msg": msg, **extra}, status=status)


def transient(status: int) -> web.Response:
    if status == 429:  # Vast sends no Retry-After
        return respond({"detail": "API requests too frequent endpoint threshold=4.5"}, status=429)
    return error(status, "server_error", f"error {status}: the server is temporarily unavailable")


class VastApi:
    def __init__(self, core: SimCore) -> None:
        self.core = core
        core.snapshotters["vast"] = self.payload

    # --- auth -----------------------------------------------------------------------------

    def _who(self, request: web.Request) -> tuple[str, SimInstance | None] | None:
        key = presented_key(request, query=True, basic=False)
        if key is None:
            return None
        if secrets.compare_digest(key, self.core.api_key):
            return ACCOUNT, None
        for inst in self.core.of_kind("vast"):
            if inst.api_key and secrets.compare_digest(key, inst.api_key):
                return INSTANCE, inst
        return ("bad", None)

    def _account(self, request: web.Request) -> web.Response | None:
        who = self._who(request)
        if who is None or who[0] != ACCOUNT:
            return error(401, "auth_error", "Invalid user key")
        return None

    # --- offers ---------------------------------------------------------------------------

    def _rented_asks(self) -> set[int]:
        return {i.details["ask_id"] for i in self.core.of_kind("vast") if not i.ended}

    async def search(self, request: web.Request) -> web.Response:
        who = self._who(request)
        if who is not None and who[0] == "bad":
            return error(401, "auth_error", "Invalid user key")
        try:
            if request.method == "GET":
                query = json.loads(request.query.get("q", "{}"))
            else:
                query = await json_body(request)
            if not isinstance(query, dict):
                raise QueryError("the query must be a JSON object")
            query = dict(query.get("q", query)) if "q" in query else dict(query)
            kind = str(query.pop("type", "on-demand")).lower()
            if kind not in ("on-demand", "ondemand", "bid", "reserved"):
                raise QueryError(f"unknown type {kind!r}")
            order = parse_offer_order(query.pop("order", None))
            limit = int(float(query.pop("limit", 64)))
            storage = float(query.pop("allocated_storage", catalog.DEFAULT_ALLOCATED_GB))
            query.pop("disk_space_requested", None)
            rented = self._rented_asks()
            offers = [
                catalog.vast_offer(m, allocated_gb=storage, rented=False, bid=kind == "bid")
                for m in catalog.VAST_MACHINES
                if m.ask_id not in rented
            ]
            found = [o for o in offers if matches(o, query, offer_value)]
        except (QueryError, ValueError, TypeError) as exc:
            return respond({"error": "invalid_request", "msg": str(exc)}, status=400)
        found.sort(key=order_key(order))
        return respond({"offers": found[: max(limit, 0)]})

    # --- create ---------------------------------------------------------------------------

    async def create(self, request: web.Request) -> web.Response:  # noqa: PLR0911 - one per error
        raw_id = request.match_info["id"]
        denied = self._account(request)
        if denied:
            return denied
        try:
            ask_id = int(raw_id)
            body = await json_body(request)
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
        except ValueError:
            return error(
                400,
                "invalid_args",
                "error 400/3467: Invalid args: 'id' is required and must be a valid offer ID",
            )
        machine = next((m for m in catalog.VAST_MACHINES if m.ask_id == ask_id), None)
        if machine is None:
            msg = f"error 404/3603: no_such_ask Instance type by id {ask_id} is not available."
            return error(404, "invalid_args", msg, ask_id=ask_id)
        if ask_id in self._rented_asks():
            msg = f"error 410/3907: no_such_ask Instance type {ask_id} is no longer available."
            return error(410, "no_such_ask", msg, ask_id=ask_id)
        if not body.get("image") and not body.get("template_hash_id"):
            return error(
                400,
                "invalid_args",
                "error 400/3467: Invalid args: 'image' is required",
                ask_id=ask_id,
            )
        disk = body.get("disk")
        if disk is not None and (not isinstance(disk, int | float) or disk <= 0):
            return error(400, "invalid_args", "disk must be a positive number of GB", ask_id=ask_id)
        price = body.get("price")
        if price is not None and (not isinstance(price, int | float) or not 0.001 <= price <= 128):
            return error(
                400, "invalid_price", "price must be between 0.001 and 128 $/hour", ask_id=ask_id
            )
        if self.core.credit("vast") <= 0:
            # UNCONFIRMED on the real API (reference vastai.md §6): our assumption.
            return error(400, "insufficient_credit", "Insufficient credit", ask_id=ask_id)
        inst = self._create(machine, ask_id, body)
        if price is not None and price < inst.details["offer"]["min_bid"]:
            # A bid under the host's minimum: Vast creates the instance stopped (outbid).
            await self.core.outbid(inst)
        if self.core.faults.take("vast", "create_error_exists"):
            # dstack's quirk: an error answer that still created an instance (new_contract).
            msg = "error 400/3419: the instance could not be started as requested"
            return error(400, "invalid_price", msg, ask_id=ask_id, new_contract=int(inst.id))
        return respond(
            {"success": True, "new_contract": int(inst.id), "instance_api_key": inst.api_key}
        )

    def _create(
        self, machine: catalog.VastMachine, ask_id: int, body: dict[str, Any]
    ) -> SimInstance:
        disk = float(body.get("disk") or DEFAULT_DISK_GB)
        bid = body.get("price") is not None
        offer = catalog.vast_offer(machine, allocated_gb=disk, rented=True, bid=bid)
        if bid:
            storage = offer["storage_total_cost"]
            offer.update(
                dph_base=float(body["price"]), dph_total=round(float(body["price"]) + storage, 6)
            )
        pairs = env_pairs(body.get("env"))
        env = {k: v for k, v in pairs if not k.startswith("-") and k.isidentifier()}
        instance_id = self.core.new_vast_id()
        api_key = secrets.token_hex(32)
        env.update(CONTAINER_ID=instance_id, CONTAINER_API_KEY=api_key)
        attached: list[str] = []
        details = {
            "ask_id": ask_id,
            "offer": offer,
            "disk": disk,
            "image": str(body.get("image") or "vastai/base-image:@vastai-automatic-tag"),
            "runtype": str(body.get("runtype") or "ssh"),
            "extra_env": [list(p) for p in pairs],
            "attached_keys": attached,
            "jupyter_token": secrets.token_hex(32),
            "gpu": offer["gpu_name"],
            "bid": float(body["price"]) if bid else None,
            "storage_per_hour": offer["storage_total_cost"],
        }

        def authorized() -> list[str]:
            return [k["key"] for k in self.core.vast_keys] + attached

        return self.core.create(
            "vast",
            instance_id,
            label=str(body.get("label") or ""),
            price_per_hour=float(offer["dph_total"]),
            details=details,
            onstart=str(body.get("onstart") or ""),
            env=env,
            authorized=authorized,
            api_key=api_key,
        )

    # --- instances ------------------------------------------------------------------------

    def payload(self, inst: SimInstance) -> dict[str, Any]:
        return instance_payload(inst, self.core.now())

    def _visible(self) -> list[dict[str, Any]]:
        now = self.core.now()
        lag = self.core.faults.get("vast").list_lag
        out = []
        for inst in self.core.of_kind("vast"):
            if self.core.listed(inst, now, lag):
                out.append(inst.snapshot if inst.gone_at and inst.snapshot else self.payload(inst))
        return out

    async def list_v1(self, request: web.Request) -> web.Response:
        denied = self._account(request)
        if denied:
            return denied
        q = request.query
        try:
            filters = json.loads(q.get("select_filters") or "{}")
            if not isinstance(filters, dict):
                raise QueryError("select_filters must be a JSON object")
            order = parse_instance_order(q.get("order_by"))
            limit = int(q.get("limit", PAGE_MAX))
            limit = 5 if limit <= 0 else min(limit, PAGE_MAX)
            rows = [r for r in self._visible() if matches(r, filters, instance_value)]
            page, token = page_after(rows, order, q.get("after_token"), limit)
            cols = json.loads(q.get("select_cols") or '["*"]')
        except (QueryError, ValueError) as exc:
            return error(400, "invalid_args", str(exc))
        if isinstance(cols, list) and cols and cols != ["*"]:
            page = [{c: r.get(c) for c in cols} for r in page]
        counts: dict[str, int] = {}
        for r in rows:
            counts[r.get("label") or ""] = counts.get(r.get("label") or "", 0) + 1
        return respond(
            {
                "success": True,
                "instances_found": len(page),
                "total_instances": len(rows),
                "label_counts": counts,
                "next_token": token,
                "instances": page,
            }
        )

    async def list_v0(self, request: web.Request) -> web.Response:
        denied = self._account(request)
        if denied:
            return denied
        rows = sorted(self._visible(), key=lambda r: r["id"])
        return respond({"instances_found": len(rows), "instances": rows})

    def _target(
        self, request: web.Request
    ) -> tuple[SimInstance | None, str | None, web.Response | None]:
        """The path's instance (None if unknown or gone), the caller's key kind, or a 401/403."""
        who = self._who(request)
        if who is None or who[0] == "bad":
            return None, None, error(401, "auth_error", "Invalid user key")
        try:
            inst = self.core.find(str(int(request.match_info["id"])))
        except ValueError:
            return None, None, error(400, "invalid_args", "invalid instance_id")
        if who[0] == INSTANCE and who[1] is not inst:
            return None, None, error(403, "forbidden", "this API key is scoped to another instance")
        if inst is None or inst.kind != "vast" or inst.gone_at is not None:
            return None, who[0], None
        return inst, who[0], None

    async def show(self, request: web.Request) -> web.Response:
        inst, _, denied = self._target(request)
        if denied:
            return denied
        return respond({"instances": self.payload(inst) if inst else None})

    async def destroy(self, request: web.Request) -> web.Response:
        inst, who, denied = self._target(request)
        if denied:
            return denied
        if inst is None:
            iid = request.match_info["id"]
            return error(404, "no_such_instance", f"Instance {iid} not found.")
        if self.core.faults.take("vast", "destroy_noop"):
            return respond({"success": True})
        await self.core.end(inst, by=f"api:{who}")
        return respond({"success": True})

    def _owned(self, request: web.Request) -> SimInstance | web.Response:
        """The path's instance for a call only the account key may make, or the refusal."""
        inst, who, denied = self._target(request)
        if denied:
            return denied
        if inst is None or who != ACCOUNT:
            return error(404, "no_such_instance", "Instance not found.")
        return inst

    async def manage(self, request: web.Request) -> web.Response:
        inst = self._owned(request)
        if isinstance(inst, web.Response):
            return inst
        body = await json_object(request)
        if body is None:
            return error(400, "invalid_args", "expected a JSON object")
        if "state" in body:
            return error(400, "invalid_args", "the sim does not stop or start instances")
        if "label" in body:
            inst.label = str(body["label"])
        return respond({"success": True})

    # --- account --------------------------------------------------------------------------

    async def user(self, request: web.Request) -> web.Response:
        denied = self._account(request)
        if denied:
            return denied
        credit = round(self.core.credit("vast"), 6)
        first_key = self.core.vast_keys[0]["key"] if self.core.vast_keys else ""
        return respond(
            {
                "id": USER_ID,
                "username": "sim-user",
                "email": "sim@example.com",
                "fullname": "gpuwarden sim",
                "credit": credit,
                "balance": 0.0,
                "balance_threshold": 5.0,
                "balance_threshold_enabled": True,
                "billed_expected": 0.0,
                "billed_verified": 0.0,
                "paid_expected": 0.0,
                "paid_verified": 0.0,
                "billing_creditonly": False,
                "can_pay": credit > 0,
                "has_billing": True,
                "has_payout": False,
                "last4": "4242",
                "email_verified": True,
                "got_signup_credit": False,
                "password_resettable": True,
                "paypal_email": None,
                "ssh_key": first_key,
                "key_id": 88123,
                "sid": "sim",
                "user": None,
            }
        )

    async def ssh_list(self, request: web.Request) -> web.Response:
        denied = self._account(request)
        if denied:
            return denied
        return respond(self.core.vast_keys)

    async def ssh_add(self, request: web.Request) -> web.Response:
        denied = self._account(request)
        if denied:
            return denied
        key = _ssh_key_of(await json_object(request))
        if not key:
            return error(400, "no_ssh_key", "No ssh key provided")
        row = next((k for k in self.core.vast_keys if k["key"] == key), None)
        if row is None:
            row = {
                "id": self.core.new_key_id(),
                "user_id": USER_ID,
                "key": key,
                "created_at": iso(self.core.now()),
                "deleted_at": None,
            }
            self.core.vast_keys.append(row)
        shown = {k: v for k, v in row.items() if k != "key"} | {"public_key": row["key"]}
        return respond({"success": True, "key": shown})

    async def ssh_delete(self, request: web.Request) -> web.Response:
        denied = self._account(request)
        if denied:
            return denied
        kid = request.match_info["id"]
        before = len(self.core.vast_keys)
        self.core.vast_keys[:] = [k for k in self.core.vast_keys if str(k["id"]) != kid]
        if len(self.core.vast_keys) == before:
            return error(400, "no_ssh_key", "No ssh key provided")
        return respond({"success": True})

    async def ssh_attach(self, request: web.Request) -> web.Response:
        inst = self._owned(request)
        if isinstance(inst, web.Response):
            return inst
        key = _ssh_key_of(await json_object(request))
        if not key:
            return error(400, "no_ssh_key", "No ssh key provided")
        inst.details["attached_keys"].append(key)
        return respond({"success": True, "msg": "SSH key attached successfully"})

    async def ledger(self, request: web.Request) -> web.Response:
        return respond(self.core.ledger.to_json(self.core.now(), "vast"))


def build_app(core: SimCore) -> web.Application:
    api = VastApi(core)
    app = web.Application(middlewares=[fault_middleware(core, "vast", transient)])
    add(app, "POST", "/api/v0/bundles", api.search)
    add(app, "GET", "/api/v0/bundles", api.search)
    add(app, "PUT", "/api/v0/asks/{id}", api.create)
    add(app, "GET", "/api/v1/instances", api.list_v1)
    add(app, "GET", "/api/v0/instances", api.list_v0)
    add(app, "GET", "/api/v0/instances/{id}", api.show)
    add(app, "DELETE", "/api/v0/instances/{id}", api.destroy)
    add(app, "PUT", "/api/v0/instances/{id}", api.manage)
    add(app, "POST", "/api/v0/instances/{id}/ssh", api.ssh_attach)
    add(app, "GET", "/api/v0/users/current", api.user)
    add(app, "GET", "/api/v0/ssh", api.ssh_list)
    add(app, "POST", "/api/v0/ssh", api.ssh_add)
    add(app, "DELETE", "/api/v0/ssh/{id}", api.ssh_delete)
    add(app, "GET", "/_sim/ledger", api.ledger)
    return app


def _ssh_key_of(body: dict[str, Any] | None) -> str:
    return str((body or {}).get("ssh_key") or "").strip()
