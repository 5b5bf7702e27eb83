"""The methods of the control socket: a pydantic model for each one's params and a typed
adapter onto the handlers (instances.py for instances, jobs.py for jobs).

METHODS maps each method name to its params model and a real function, so mypy checks every
call. Each adapter is given the App, the Caller (who sent the request: its actions' events
record `caller.by`) and the params, and returns plain data; server.py turns it into JSON.
"""

from __future__ import annotations

import functools
import os
import pwd
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from gpuwarden import __version__
from gpuwarden.control import access, instances, jobs
from gpuwarden.control.events import event_json
from gpuwarden.core.errors import InvalidState, NotFound
from gpuwarden.core.model import JobState
from gpuwarden.fleet.app import App
from gpuwarden.jobs.limits import MAX_COUNT, MAX_PROMPT_CHARS, MAX_STEPS


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NoParams(_Params):
    pass


Id = Field(min_length=1, max_length=128)


class StatusParams(_Params):
    """Which live instances to list: at most `limit` rows (by default the first page,
    `all`: every row; the totals still count every match), of one provider, state and GPU
    model."""

    limit: int | None = Field(default=None, ge=1, le=1_000_000)
    all: bool = False  # every row (the default is the first page: instances.STATUS_PAGE)
    provider: str | None = Field(default=None, min_length=1, max_length=64)
    state: Literal["requested", "provisioning", "running", "terminating"] | None = None
    gpu: str | None = Field(default=None, min_length=1, max_length=64)
    # One instance by its local id (`launch --wait` watching the one it rented): a lookup,
    # not a walk of the fleet.
    id: str | None = Field(default=None, min_length=1, max_length=64)


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
    spot: bool | None = None  # None: jobs.interruptible
    priority: int = Field(default=0, ge=-1000, le=1000)


class JobsListParams(_Params):
    states: list[JobState] | None = None
    limit: int = Field(default=100, ge=1, le=10_000)


class EventsListParams(_Params):
    hours: float = Field(default=24.0, gt=0, le=24 * 366 * 10)
    limit: int = Field(default=50, ge=1, le=10_000)
    entity_id: str | None = Field(default=None, max_length=128)
    # Only events after this id, oldest first (a follower resuming after a reconnect).
    after_id: int | None = Field(default=None, ge=0)


class PauseParams(_Params):
    reason: str | None = Field(default=None, max_length=500)


P = TypeVar("P", bound=_Params)


@functools.lru_cache(maxsize=256)
def _user_name(uid: int) -> str:
    # Once per uid, not per connection: with NSS on LDAP or sssd a lookup can block the
    # event loop (and the guard with it) for seconds. A KeyError is not cached: tried again.
    return pwd.getpwuid(uid).pw_name


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sent a request, as the events of its actions record it under "by": for the control
    socket the peer's uid and, when it has one, its user name ("alice (uid:1000)")."""

    by: str

    @classmethod
    def of_uid(cls, uid: int, name_of: Callable[[int], str] = _user_name) -> Caller:
        try:
            name = name_of(uid)
        except KeyError:  # a uid without a passwd entry (a container's, a removed user's)
            return cls(f"uid:{uid}")
        return cls(f"{name} (uid:{uid})")


@dataclass(frozen=True, slots=True)
class Method(Generic[P]):
    params: type[P]
    handler: Callable[[App, Caller, P], Awaitable[Any]]


async def _status(app: App, c: Caller, p: StatusParams) -> Any:
    return await instances.status(
        app,
        limit=p.limit,
        all=p.all,
        provider=p.provider,
        state=p.state,
        gpu=p.gpu,
        id=p.id,
    )


async def _offers(app: App, c: Caller, p: OffersParams) -> Any:
    return await instances.offers(
        app,
        provider=p.provider,
        gpu=p.gpu,
        gpu_ram_gb=p.gpu_ram_gb,
        max_price=p.max_price,
        limit=p.limit,
    )


async def _launch(app: App, c: Caller, p: LaunchParams) -> Any:
    return await instances.launch(
        app,
        offer_id=p.offer_id,
        provider=p.provider,
        gpu=p.gpu,
        gpu_ram_gb=p.gpu_ram_gb,
        max_price=p.max_price,
        hours=p.hours,
        dry_run=p.dry_run,
        by=c.by,
    )


async def _extend(app: App, c: Caller, p: ExtendParams) -> Any:
    return await instances.extend(app, p.id, p.hours, by=c.by)


async def _activity(app: App, c: Caller, p: IdParams) -> Any:
    return await instances.activity(app, p.id, by=c.by)


async def _destroy(app: App, c: Caller, p: IdParams) -> Any:
    return await instances.destroy(app, p.id, by=c.by)


async def _ssh(app: App, c: Caller, p: IdParams) -> Any:
    return await access.ssh_info(app, await instances.resolve_instance(app, p.id))


async def _ssh_hosts(app: App, c: Caller, _: NoParams) -> Any:
    return await access.ssh_hosts(app)


async def _destroy_all(app: App, c: Caller, _: NoParams) -> Any:
    return await instances.destroy_all(app, by=c.by)


async def _history(app: App, c: Caller, p: HistoryParams) -> Any:
    return await instances.history(app, p.hours)


async def _costs(app: App, c: Caller, p: CostsParams) -> Any:
    return await instances.costs(app, p.days)


async def _submit(app: App, c: Caller, p: SubmitParams) -> Any:
    # The spec fields travel as one bag: jobs.spec.build_spec validates them together.
    return await jobs.submit(app, by=c.by, **p.model_dump())


async def _jobs_list(app: App, c: Caller, p: JobsListParams) -> Any:
    return await jobs.list(app, p.states, p.limit)


async def _jobs_get(app: App, c: Caller, p: IdParams) -> Any:
    return await jobs.get(app, p.id)


async def _jobs_cancel(app: App, c: Caller, p: IdParams) -> Any:
    return await jobs.cancel(app, p.id, by=c.by)


async def _pause(app: App, c: Caller, p: PauseParams) -> Any:
    return await jobs.pause(app, p.reason, by=c.by)


async def _resume(app: App, c: Caller, _: NoParams) -> Any:
    return await jobs.resume(app, by=c.by)


async def _reload(app: App, c: Caller, _: NoParams) -> Any:
    if app.reload is None:  # a context built without a supervisor (tests, tools)
        raise InvalidState("this daemon cannot reload its configuration")
    return await app.reload(c.by)


async def _info(app: App, c: Caller, _: NoParams) -> dict[str, Any]:

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
        "budget": await instances.budget_json(app, app.clock.now()),
        **(await instances.queue_pause(app)),
    }


async def _events(app: App, c: Caller, p: EventsListParams) -> list[dict[str, Any]]:
    """The last `limit` events of the last `hours`, oldest first (as events.subscribe sends
    them)."""
    entity = None if p.entity_id is None else await _entity(app, p.entity_id)
    if p.after_id is not None:
        found = await app.store.events(entity_id=entity, after_id=p.after_id, limit=p.limit)
        return [event_json(e) for e in found]
    since = app.clock.now() - timedelta(hours=p.hours)
    found = await app.store.events(since=since, entity_id=entity, limit=p.limit, newest=True)
    return [event_json(e) for e in found]


async def _entity(app: App, ref: str) -> str:
    """The id of the instance (id, label or unique prefix) or job (id or unique prefix) that
    `ref` names; anything else as given (the daemon's own entities, such as its flags)."""
    for resolve in (instances.resolve_instance, jobs.resolve_job):
        try:
            return (await resolve(app, ref)).id
        except NotFound:
            continue
    return ref


METHODS: Mapping[str, Method[Any]] = {
    "status": Method(StatusParams, _status),
    "offers": Method(OffersParams, _offers),
    "launch": Method(LaunchParams, _launch),
    "extend": Method(ExtendParams, _extend),
    "activity": Method(IdParams, _activity),
    "destroy": Method(IdParams, _destroy),
    "destroy_all": Method(NoParams, _destroy_all),
    "ssh": Method(IdParams, _ssh),
    "ssh.hosts": Method(NoParams, _ssh_hosts),
    "history": Method(HistoryParams, _history),
    "costs": Method(CostsParams, _costs),
    "jobs.submit": Method(SubmitParams, _submit),
    "jobs.list": Method(JobsListParams, _jobs_list),
    "jobs.get": Method(IdParams, _jobs_get),
    "jobs.cancel": Method(IdParams, _jobs_cancel),
    "queue.pause": Method(PauseParams, _pause),
    "queue.resume": Method(NoParams, _resume),
    "config.reload": Method(NoParams, _reload),
    "daemon.info": Method(NoParams, _info),
    "events.list": Method(EventsListParams, _events),
}
