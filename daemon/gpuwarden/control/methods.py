"""The methods of the control socket: a pydantic model for each one's params and a thin
adapter onto the service functions (services/api.py for instances, jobs/api.py for jobs).

Service modules are imported lazily, on the first call, so that the socket works (and says
`not_implemented`) while a service module is missing, and `gpuwarden --help` stays fast.
Each adapter returns plain data; control.py turns it into JSON.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from gpuwarden import __version__
from gpuwarden.control.events import event_json
from gpuwarden.core.errors import DomainError
from gpuwarden.core.model import JobState
from gpuwarden.fleet.app import App
from gpuwarden.jobs.limits import MAX_COUNT, MAX_PROMPT_CHARS, MAX_STEPS

Handler = Callable[[App, Any], Awaitable[Any]]


class NotImplementedYet(DomainError):
    code = "not_implemented"


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NoParams(_Params):
    pass


Id = Field(min_length=1, max_length=128)


class OffersParams(_Params):
    provider: str | None = None
    gpu: str | None = Field(default=None, max_length=100)
    gpu_ram_gb: float | None = Field(default=None, ge=0, le=10_000)
    max_price: float | None = Field(default=None, ge=0, le=10_000)
    limit: int = Field(default=20, ge=1, le=500)


class LaunchParams(_Params):
    offer_id: str | None = Field(default=None, min_length=1, max_length=200)
    provider: str | None = None
    gpu: str | None = Field(default=None, max_length=100)
    gpu_ram_gb: float | None = Field(default=None, ge=0, le=10_000)
    max_price: float | None = Field(default=None, ge=0, le=10_000)
    hours: float | None = Field(default=None, gt=0, le=24 * 365)
    dry_run: bool = False


class IdParams(_Params):
    id: str = Id


class ExtendParams(_Params):
    id: str = Id
    hours: float = Field(gt=0, le=24 * 365)


class HistoryParams(_Params):
    hours: float = Field(default=24.0, gt=0, le=24 * 366 * 10)


class CostsParams(_Params):
    days: int = Field(default=7, ge=1, le=3660)


class SubmitParams(_Params):
    """Types and bounds only; jobs.spec.build_spec checks the rest (prompt length together,
    sizes, engine) and says what is wrong in the domain error."""

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    negative_prompt: str = Field(default="", max_length=MAX_PROMPT_CHARS)
    steps: int | None = Field(default=None, ge=1, le=MAX_STEPS)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    width: int | None = Field(default=None, ge=64, le=2048, multiple_of=8)
    height: int | None = Field(default=None, ge=64, le=2048, multiple_of=8)
    model: str | None = Field(default=None, max_length=200)
    count: int = Field(default=1, ge=1, le=MAX_COUNT)
    guidance: float | None = Field(default=None, ge=0, le=50)
    engine: str | None = Field(default=None, max_length=32)
    max_price: float | None = Field(default=None, ge=0, le=10_000)
    gpu_ram_gb: float | None = Field(default=None, ge=0, le=10_000)
    priority: int = Field(default=0, ge=-1000, le=1000)


class JobsListParams(_Params):
    states: list[JobState] | None = None
    limit: int = Field(default=100, ge=1, le=10_000)


class EventsListParams(_Params):
    hours: float = Field(default=24.0, gt=0, le=24 * 366 * 10)
    limit: int = Field(default=50, ge=1, le=10_000)
    entity_id: str | None = Field(default=None, max_length=128)


class PauseParams(_Params):
    reason: str | None = Field(default=None, max_length=500)


@dataclass(frozen=True, slots=True)
class Method:
    params: type[_Params]
    handler: Handler


def _call(module: str, func: str) -> Handler:
    """An adapter calling `module.func(app, **params)`, resolved at call time."""

    async def handler(app: App, params: _Params) -> Any:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and module.startswith(exc.name):
                raise NotImplementedYet(f"this daemon has no {module} yet") from None
            raise
        fn = getattr(mod, func, None)
        if fn is None:
            raise NotImplementedYet(f"this daemon has no {module}.{func} yet")
        return await fn(app, **params.model_dump())

    return handler


async def _reload(app: App, _: NoParams) -> Any:
    if app.reload is None:
        raise NotImplementedYet("this daemon cannot reload its configuration")
    return await app.reload()


async def _info(app: App, _: NoParams) -> dict[str, Any]:
    from gpuwarden.fleet.budget import QUEUE_PAUSED  # lazily, like the service modules

    paused = await app.store.get_flag(QUEUE_PAUSED, False)
    uptime = max(0.0, app.clock.monotonic() - app.started_monotonic)
    return {
        "version": __version__,
        "pid": os.getpid(),
        "uptime_s": round(uptime, 3),
        "started_at": app.clock.now() - timedelta(seconds=uptime),
        "installation": app.installation,
        "socket": str(app.settings.daemon.socket),
        "heartbeats": {name: round(age, 3) for name, age in app.heartbeats.ages().items()},
        "providers": sorted(app.providers),
        "queue_paused": bool(paused),
    }


async def _events(app: App, p: EventsListParams) -> list[dict[str, Any]]:
    """The last `limit` events of the last `hours`, oldest first (as events.subscribe sends
    them)."""
    since = app.clock.now() - timedelta(hours=p.hours)
    found = await app.store.events(since=since, entity_id=p.entity_id, limit=p.limit, newest=True)
    return [event_json(e) for e in found]


_API = "gpuwarden.control.instances"
_JOBS = "gpuwarden.control.jobs"

METHODS: Mapping[str, Method] = {
    "status": Method(NoParams, _call(_API, "status")),
    "offers": Method(OffersParams, _call(_API, "offers")),
    "launch": Method(LaunchParams, _call(_API, "launch")),
    "extend": Method(ExtendParams, _call(_API, "extend")),
    "activity": Method(IdParams, _call(_API, "activity")),
    "destroy": Method(IdParams, _call(_API, "destroy")),
    "destroy_all": Method(NoParams, _call(_API, "destroy_all")),
    "history": Method(HistoryParams, _call(_API, "history")),
    "costs": Method(CostsParams, _call(_API, "costs")),
    "jobs.submit": Method(SubmitParams, _call(_JOBS, "submit")),
    "jobs.list": Method(JobsListParams, _call(_JOBS, "list")),
    "jobs.get": Method(IdParams, _call(_JOBS, "get")),
    "jobs.cancel": Method(IdParams, _call(_JOBS, "cancel")),
    "queue.pause": Method(PauseParams, _call(_JOBS, "pause")),
    "queue.resume": Method(NoParams, _call(_JOBS, "resume")),
    "config.reload": Method(NoParams, _reload),
    "daemon.info": Method(NoParams, _info),
    "events.list": Method(EventsListParams, _events),
}
