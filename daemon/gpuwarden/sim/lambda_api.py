"""The Lambda Cloud API v1 as the sim serves it, under `/lambda/api/v1` (the client's base URL).

Auth: `Authorization: Bearer <key>`, `Basic base64(<key>:)` or `Basic <key>`. Envelopes:
`{"data": ...}` and `{"error": {"code", "message", "suggestion"}}`. Status lifecycle:
booting (no ip) -> active -> terminating (after terminate) -> terminated, then gone from
GET /instances; GET /instances/{id} keeps answering `terminated` (real behaviour
UNCONFIRMED). Sim extension: once booted, instances carry `ssh_port` (the loopback SSH port)
beside `ip` = "127.0.0.1".
"""

from __future__ import annotations

import re
import secrets
from typing import Any

import asyncssh
from aiohttp import web

from gpuwarden.sim import catalog
from gpuwarden.sim.core import SimCore, SimInstance
from gpuwarden.sim.web import add, fault_middleware, json_object, presented_key

_HOSTNAME = re.compile(r"^[a-z0-9][0-9a-z-]{0,62}$")
_NOT_AN_OBJECT = "The request body must be a JSON object."

_ERRORS: dict[str, tuple[str, str]] = {
    "global/invalid-api-key": (
        "API key was invalid, expired, or deleted.",
        "Check your API key or create a new one, then try again.",
    ),
    "global/account-inactive": (
        "Your account is inactive.",
        "Make sure you have verified your email address and have a valid payment method. "
        "Contact Support if problems continue.",
    ),
    "global/internal-error": (
        "An internal server error occurred.",
        "Try again later. Contact Support if the problem persists.",
    ),
    "provider/internal-unavailable": ("Provider unavailable", "Try again shortly"),
    "global/rate-limited": ("Too many requests.", "Slow down and try again shortly."),
}


def error(
    status: int, code: str, message: str | None = None, suggestion: str | None = None
) -> web.Response:
    default_msg, default_sugg = _ERRORS.get(code, ("", ""))
    body: dict[str, str] = {"code": code, "message": message or default_msg}
    if suggestion or default_sugg:
        body["suggestion"] = suggestion or default_sugg
    return web.json_response({"error": body}, status=status)


def transient(status: int) -> web.Response:
    if status == 429:  # body shape UNCONFIRMED on the real API; no Retry-After
        return error(429, "global/rate-limited")
    if status == 503:
        return error(503, "provider/internal-unavailable")
    return error(status, "global/internal-error")


def invalid(message: str) -> web.Response:
    return error(400, "global/invalid-parameters", message)


def _actions(status: str | None) -> dict[str, Any]:
    if status == "active":
        detail: dict[str, Any] = {"available": True}
    elif status == "booting":
        detail = {
            "available": False,
            "reason_code": "vm-has-not-launched",
            "reason_description": "The instance has not launched yet.",
        }
    else:
        detail = {
            "available": False,
            "reason_code": "vm-is-terminating",
            "reason_description": "The instance is terminating.",
        }
    return {a: dict(detail) for a in ("migrate", "rebuild", "restart", "cold_reboot", "terminate")}


class LambdaApi:
    def __init__(self, core: SimCore) -> None:
        self.core = core

    @web.middleware
    async def auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if "/_sim/" in request.path:
            resp: web.StreamResponse = await handler(request)
            return resp
        key = presented_key(request, query=False, basic=True)
        if key is None or not secrets.compare_digest(key, self.core.api_key):
            return error(401, "global/invalid-api-key")
        resp = await handler(request)
        return resp

    def payload(self, inst: SimInstance) -> dict[str, Any]:
        d = inst.details
        out: dict[str, Any] = {
            "id": inst.id,
            "name": inst.label,
            "status": inst.status,
            "ssh_key_names": [d["ssh_key_name"]],
            "file_system_names": [],
            "region": catalog.lambda_region(d["region"]),
            "instance_type": d["instance_type"],
            "is_reserved": False,
            "actions": _actions(inst.status),
            "tags": d["tags"],
        }
        if not inst.label:
            del out["name"]
        if inst.status != "booting" and inst.ssh_port is not None:
            # ip and ssh_port always together: a client that sees an ip without the sim's
            # port would fall back to port 22 of this host.
            out.update(
                ip="127.0.0.1",
                ssh_port=inst.ssh_port,
                private_ip="10.19.60.24",
                hostname=d["hostname"] or "127.0.0.1",
                jupyter_token=d["jupyter_token"],
                jupyter_url=f"https://jupyter-{inst.id}.lambdaspaces.com/?token={d['jupyter_token']}",
            )
        return out

    # --- catalog and launch ---------------------------------------------------------------

    async def instance_types(self, request: web.Request) -> web.Response:
        return web.json_response({"data": catalog.lambda_instance_types()})

    async def launch(self, request: web.Request) -> web.Response:  # noqa: PLR0911 - one per error
        body = await json_object(request)
        if body is None:
            return invalid(_NOT_AN_OBJECT)
        problem = _launch_problem(body)
        if problem:
            return invalid(problem)
        itype = catalog.lambda_type(body["instance_type_name"])
        if itype is None:
            return error(
                404,
                "global/object-does-not-exist",
                "Specified instance type does not exist.",
                "Choose an instance type from GET /instance-types.",
            )
        region = body["region_name"]
        if region not in itype.regions:
            return error(
                400,
                "instance-operations/launch/insufficient-capacity",
                "Not enough capacity to fulfill launch request.",
                "Choose an instance type with more availability, or try again later.",
            )
        key_name = body["ssh_key_names"][0]
        key = next((k for k in self.core.lambda_keys.values() if k["name"] == key_name), None)
        if key is None:
            return error(
                404,
                "global/object-does-not-exist",
                "Specified ssh key does not exist.",
                "Add the key with POST /ssh-keys first.",
            )
        if self.core.credit("lambda") <= 0:
            return error(403, "global/account-inactive")
        inst = self._create(itype, region, key, body)
        if self.core.faults.take("lambda", "create_error_exists"):
            return error(500, "global/internal-error")
        return web.json_response({"data": {"instance_ids": [inst.id]}})

    def _create(
        self, itype: catalog.LambdaType, region: str, key: dict[str, str], body: dict[str, Any]
    ) -> SimInstance:
        public_key = key["public_key"]
        details = {
            "region": region,
            "instance_type": itype.instance_type(),
            "ssh_key_name": key["name"],
            "hostname": body.get("hostname") or "",
            "tags": list(body.get("tags") or []),
            "jupyter_token": secrets.token_hex(16),
            "gpu": itype.gpu_description,
        }
        return self.core.create(
            "lambda",
            secrets.token_hex(16),
            label=str(body.get("name") or ""),
            price_per_hour=itype.price_cents_per_hour / 100.0,
            details=details,
            onstart=str(body.get("user_data") or ""),
            env={},
            authorized=lambda: [public_key],
        )

    # --- instances ------------------------------------------------------------------------

    async def list(self, request: web.Request) -> web.Response:
        now = self.core.now()
        lag = self.core.faults.get("lambda").list_lag
        rows = [
            self.payload(i) for i in self.core.of_kind("lambda") if self.core.listed(i, now, lag)
        ]
        return web.json_response({"data": rows})

    def _find(self, instance_id: str) -> SimInstance | None:
        inst = self.core.find(instance_id)
        return inst if inst is not None and inst.kind == "lambda" else None

    async def get(self, request: web.Request) -> web.Response:
        inst = self._find(request.match_info["id"])
        if inst is None:
            return error(404, "global/object-does-not-exist", "Specified instance does not exist.")
        return web.json_response({"data": self.payload(inst)})

    async def rename(self, request: web.Request) -> web.Response:
        inst = self._find(request.match_info["id"])
        if inst is None:
            return error(404, "global/object-does-not-exist", "Specified instance does not exist.")
        body = await json_object(request)
        if body is None:
            return invalid(_NOT_AN_OBJECT)
        name = body.get("name")
        if not isinstance(name, str) or len(name) > 64:
            return invalid("name must be a string of at most 64 characters.")
        inst.label = name
        return web.json_response({"data": self.payload(inst)})

    async def terminate(self, request: web.Request) -> web.Response:
        body = await json_object(request)
        if body is None:
            return invalid(_NOT_AN_OBJECT)
        ids = body.get("instance_ids")
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
            return invalid("instance_ids must be a non-empty list of instance ids.")
        targets = [self._find(i) for i in ids]
        if any(t is None for t in targets):
            return error(404, "global/object-does-not-exist", "Specified instance does not exist.")
        out = []
        for inst in targets:
            assert inst is not None
            if not inst.ended and not self.core.faults.take("lambda", "destroy_noop"):
                await self.core.end(inst, by="api:account")
            out.append(self.payload(inst))
        return web.json_response({"data": {"terminated_instances": out}})

    # --- ssh keys -------------------------------------------------------------------------

    async def keys(self, request: web.Request) -> web.Response:
        return web.json_response({"data": list(self.core.lambda_keys.values())})

    async def add_key(self, request: web.Request) -> web.Response:
        body = await json_object(request)
        if body is None:
            return invalid(_NOT_AN_OBJECT)
        name = body.get("name")
        if not isinstance(name, str) or not 1 <= len(name) <= 64:
            return invalid("name must be 1 to 64 characters.")
        if any(k["name"] == name for k in self.core.lambda_keys.values()):
            return invalid("An SSH key with this name already exists.")
        public = body.get("public_key")
        private = None
        if public is None:
            generated = asyncssh.generate_private_key("ssh-ed25519")
            public = generated.export_public_key().decode().strip()
            private = generated.export_private_key().decode()
        try:
            asyncssh.import_public_key(str(public))
        except (asyncssh.KeyImportError, ValueError):
            return invalid("public_key is not a valid SSH public key.")
        row = {"id": secrets.token_hex(16), "name": name, "public_key": str(public).strip()}
        self.core.lambda_keys[row["id"]] = row
        shown = dict(row) if private is None else {**row, "private_key": private}
        return web.json_response({"data": shown})

    async def delete_key(self, request: web.Request) -> web.Response:
        if self.core.lambda_keys.pop(request.match_info["id"], None) is None:
            return invalid("Specified SSH key does not exist.")
        return web.json_response({"data": {}})

    async def ledger(self, request: web.Request) -> web.Response:
        return web.json_response(self.core.ledger.to_json(self.core.now(), "lambda"))


def _launch_problem(body: dict[str, Any]) -> str | None:  # noqa: PLR0911 - one per rule
    """Why a launch request is invalid (400 global/invalid-parameters), or None."""
    for name in ("region_name", "instance_type_name", "ssh_key_names"):
        if name not in body:
            return f"{name} is required."
    for name in ("region_name", "instance_type_name"):
        if not isinstance(body[name], str):
            return f"{name} must be a string."
    if body["region_name"] not in catalog.LAMBDA_REGIONS:
        return f"region_name {body['region_name']!r} is not a region code."
    keys = body["ssh_key_names"]
    if not isinstance(keys, list) or len(keys) != 1 or not isinstance(keys[0], str):
        return "Currently, exactly one SSH key must be specified."
    if body.get("quantity", 1) != 1:
        return "quantity must be 1."
    label = body.get("name")
    if label is not None and (not isinstance(label, str) or len(label) > 64):
        return "name must be a string of at most 64 characters."
    hostname = body.get("hostname")
    if hostname is not None and (not isinstance(hostname, str) or not _HOSTNAME.match(hostname)):
        return "hostname must match ^[a-z0-9][0-9a-z-]{0,62}$."
    user_data = body.get("user_data")
    if user_data is not None and (not isinstance(user_data, str) or len(user_data) > 1_000_000):
        return "user_data must be a string of at most 1 MB."
    return None


def build_app(core: SimCore) -> web.Application:
    api = LambdaApi(core)
    app = web.Application(middlewares=[fault_middleware(core, "lambda", transient), api.auth])
    v1 = "/api/v1"
    add(app, "GET", f"{v1}/instance-types", api.instance_types)
    add(app, "POST", f"{v1}/instance-operations/launch", api.launch)
    add(app, "POST", f"{v1}/instance-operations/terminate", api.terminate)
    add(app, "GET", f"{v1}/instances", api.list)
    add(app, "GET", f"{v1}/instances/{{id}}", api.get)
    add(app, "POST", f"{v1}/instances/{{id}}", api.rename)
    add(app, "GET", f"{v1}/ssh-keys", api.keys)
    add(app, "POST", f"{v1}/ssh-keys", api.add_key)
    add(app, "DELETE", f"{v1}/ssh-keys/{{id}}", api.delete_key)
    add(app, "GET", "/_sim/ledger", api.ledger)
    return app
