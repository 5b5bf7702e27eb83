"""SimCloud: the simulated cloud as one aiohttp server on loopback.

    /vast/...            the Vast.ai API (client base URL: <base>/vast)
    /lambda/api/v1/...   the Lambda Cloud API (client base URL: <base>/lambda/api/v1)
    /vast/_sim/ledger, /lambda/_sim/ledger, /_sim/ledger     the billing ledger
    GET/POST /_sim/faults                                    the fault knobs
    GET /_sim/instances                                      instances, ports, sessions
    POST /_sim/instances/{id}/kill-ssh                       its SSH server dies
    POST /_sim/instances/{id}/end                            ended from outside
    POST /_sim/instances/{id}/outbid                         a spot instance is outbid now

The admin paths under /_sim/ take no API key: the server listens on loopback only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from gpuwarden.config.settings import SimSettings
from gpuwarden.core.clock import Clock, SystemClock, format_ts
from gpuwarden.sim import lambda_api, vast_api
from gpuwarden.sim.core import SimCore, SimInstance
from gpuwarden.sim.faults import KINDS, FaultError
from gpuwarden.sim.web import json_body

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class SimUrls:
    vast: str  # the Vast client's base URL; it appends /api/v0/...
    lambda_: str  # the Lambda client's base URL; it appends /instances, ...
    admin: str  # the server's root: /_sim/ledger, /_sim/faults, ...

    @classmethod
    def at(cls, base: str) -> SimUrls:
        """Where a sim whose server root is `base` (e.g. http://127.0.0.1:8700) serves each API."""
        base = base.rstrip("/")
        return cls(vast=f"{base}/vast", lambda_=f"{base}/lambda/api/v1", admin=base)


class SimCloud:
    def __init__(
        self, settings: SimSettings, clock: Clock | None = None, *, sandbox_root: Path
    ) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        self.core = SimCore(settings, self.clock, sandbox_root)
        self._runner: web.AppRunner | None = None
        self.urls: SimUrls | None = None

    @property
    def api_key(self) -> str:
        return self.core.api_key

    async def start(self) -> SimUrls:
        self.core.sandbox_root.mkdir(parents=True, exist_ok=True)
        app = web.Application()
        app.add_subapp("/vast", vast_api.build_app(self.core))
        app.add_subapp("/lambda", lambda_api.build_app(self.core))
        self._admin_routes(app)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.settings.host, self.settings.port)
        await site.start()
        self._runner = runner
        host, port = runner.addresses[0][:2]
        base = f"http://{host}:{port}"
        self.urls = SimUrls.at(base)
        self.core.api_urls["vast"] = self.urls.vast
        self.core.api_urls["lambda"] = self.urls.lambda_
        self.core.start_background()
        log.info("sim_started", url=base, sandbox=str(self.core.sandbox_root))
        return self.urls

    async def stop(self) -> dict[str, Any]:
        """Stop serving, every SSH server and every instance process. Instances are not
        ended in the ledger: what still runs is reported as running (a leak)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.core.shutdown()
        ledger = self.ledger()
        log.info("sim_stopped", running=ledger["running"], total_cost=ledger["total_cost"])
        return ledger

    def ledger(self) -> dict[str, Any]:
        return self.core.ledger.to_json(self.clock.now())

    def instance(self, instance_id: str) -> SimInstance | None:
        return self.core.find(instance_id)

    def sessions(self, instance_id: str) -> int:
        """Open SSH sessions (exec, shell, SFTP) on the instance right now."""
        inst = self.core.find(instance_id)
        return inst.ssh.sessions if inst is not None and inst.ssh is not None else 0

    # --- admin ----------------------------------------------------------------------------

    def _admin_routes(self, app: web.Application) -> None:
        app.router.add_get("/_sim/ledger", self._ledger)
        app.router.add_get("/_sim/faults", self._faults_get)
        app.router.add_post("/_sim/faults", self._faults_post)
        app.router.add_get("/_sim/instances", self._instances)
        app.router.add_post("/_sim/instances/{id}/kill-ssh", self._kill_ssh)
        app.router.add_post("/_sim/instances/{id}/end", self._end)
        app.router.add_post("/_sim/instances/{id}/outbid", self._outbid)

    async def _ledger(self, request: web.Request) -> web.Response:
        return web.json_response(self.ledger())

    async def _faults_get(self, request: web.Request) -> web.Response:
        credit = {k: round(self.core.credit(k), 6) for k in KINDS}
        return web.json_response({**self.core.faults.to_json(), "credit": credit})

    async def _faults_post(self, request: web.Request) -> web.Response:
        """Body: knobs for both providers, or {"vast": {...}, "lambda": {...}}; `credit` sets
        the account credit now (a number, or {"vast": n, "lambda": n}); `outbid` names spot
        instances (an id or a list of ids) that are outbid now."""
        try:
            body = await json_body(request)
            if not isinstance(body, dict):
                raise FaultError("expected a JSON object")
            credit = body.pop("credit", None)
            targets = self._outbid_targets(body.pop("outbid", None))
            self.core.faults.update(body)
            if credit is not None:
                self._set_credit(credit)
            for inst in targets:
                await self.core.outbid(inst)
        except (FaultError, ValueError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        log.info("sim_faults_set", faults=json.dumps(self.core.faults.to_json()))
        return await self._faults_get(request)

    def _outbid_targets(self, value: Any) -> list[SimInstance]:
        """The spot instances an `outbid` value names, all checked before any is touched."""
        if value is None:
            return []
        ids = value if isinstance(value, list) else [value]
        out = []
        for raw in ids:
            inst = self.core.find(str(raw))
            if inst is None or not self.core.is_spot(inst) or inst.ended:
                raise FaultError(f"outbid: {raw} is not a live spot instance")
            out.append(inst)
        return out

    def _set_credit(self, credit: Any) -> None:
        values = credit if isinstance(credit, dict) else dict.fromkeys(KINDS, credit)
        for k in KINDS:
            if k in values:
                self.core.set_credit(k, float(values[k]))

    async def _instances(self, request: web.Request) -> web.Response:
        rows = []
        for inst in self.core.instances.values():
            rows.append(
                {
                    "provider": inst.kind,
                    "id": inst.id,
                    "label": inst.label,
                    "status": inst.status,
                    "ended": inst.ended,
                    "created_at": format_ts(inst.created_at),
                    "ssh_port": inst.ssh_port,
                    "ssh_listening": bool(inst.ssh and inst.ssh.listening),
                    "sessions": inst.ssh.sessions if inst.ssh else 0,
                    "interactive_sessions": inst.ssh.interactive_sessions if inst.ssh else 0,
                    "sandbox": str(inst.sandbox),
                }
            )
        return web.json_response({"instances": rows})

    def _target(self, request: web.Request) -> SimInstance:
        inst = self.core.find(request.match_info["id"])
        if inst is None:
            raise web.HTTPNotFound(
                text=json.dumps({"error": "no such instance"}), content_type="application/json"
            )
        return inst

    async def _kill_ssh(self, request: web.Request) -> web.Response:
        inst = self._target(request)
        await self.core.kill_ssh(inst)
        return web.json_response({"id": inst.id, "ssh_listening": False})

    async def _outbid(self, request: web.Request) -> web.Response:
        inst = self._target(request)
        if not self.core.is_spot(inst) or inst.ended:
            return web.json_response(
                {"error": f"{inst.id} is not a live spot instance"}, status=409
            )
        await self.core.outbid(inst)
        return web.json_response({"id": inst.id, "status": inst.status})

    async def _end(self, request: web.Request) -> web.Response:
        inst = self._target(request)
        if not inst.ended:
            await self.core.end(inst, by="outside")
        return web.json_response({"id": inst.id, "ended": True})
