"""What the control socket calls for jobs (control/methods.py maps `jobs.*` and `queue.*`
here). Each function takes the App and plain values, and returns plain data.

A submit is accepted while the queue is paused: the job is stored and waits, it is just not
dispatched until `resume`. Cancelling a queued (or still provisioning) job ends it at once;
a running one gets a `cancel_requested` event, and the job's runner kills the remote process
and ends the job as cancelled; its instance then follows the after-job rule.
"""

from __future__ import annotations

import builtins
import secrets
from collections.abc import Iterable
from typing import Any

import structlog

from gpuwarden.control.instances import MIN_PREFIX, ambiguous
from gpuwarden.core import errors
from gpuwarden.core.model import QUEUE_PAUSED_FLAG, EntityKind, Job, JobState
from gpuwarden.fleet.app import App
from gpuwarden.jobs.spec import build_spec, job_dict
from gpuwarden.store import IllegalTransition, NotFoundError

log = structlog.get_logger(__name__)


def new_job_id() -> str:
    return "j" + secrets.token_hex(5)


async def submit(app: App, *, by: str, priority: int = 0, **fields: Any) -> dict[str, Any]:
    """Validate `fields` (the job spec: prompt, negative_prompt, steps, seed, ...; see
    jobs.spec.build_spec), store as QUEUED, wake the dispatcher. Raises InvalidSpec. `by`:
    who asked (recorded on the event)."""
    spec = build_spec(app.settings.jobs, **fields)
    now = app.clock.now()
    job = Job(
        id=new_job_id(),
        state=JobState.QUEUED,
        spec=spec,
        created_at=now,
        updated_at=now,
        priority=priority,
    )
    await app.store.insert_job(job, {"by": by})
    log.info("job_submitted", job_id=job.id, priority=priority, steps=spec.steps)
    app.jobs_wake.set()
    out = job_dict(job)
    out["queue_paused"] = bool(await app.store.get_flag(QUEUE_PAUSED_FLAG, False))
    return out


async def list(  # the control method is jobs.list
    app: App, states: Iterable[JobState | str] | None = None, limit: int = 100
) -> builtins.list[dict[str, Any]]:
    """The newest `limit` jobs, newest first, optionally only in some states."""
    wanted = None if states is None else [JobState(s) for s in states]
    got = await app.store.jobs(wanted, limit=limit, newest_first=True)
    return [job_dict(j) for j in got]


async def get(app: App, id: str) -> dict[str, Any]:
    return job_dict(await resolve_job(app, id))


async def cancel(app: App, id: str, *, by: str) -> dict[str, Any]:
    """Cancel a job. Queued or provisioning: at once. Running or fetching: asked of its runner
    (the reply shows the job still running, with cancel_requested). Finished: an error."""
    job = await resolve_job(app, id)
    jid = job.id
    if job.state.terminal:
        raise errors.InvalidState(f"job {jid} is already {job.state.value}", state=job.state.value)
    if job.state in (JobState.QUEUED, JobState.PROVISIONING):
        try:
            job = await app.store.transition_job(
                jid, JobState.CANCELLED, reason="user", details={"by": by}
            )
            log.info("job_cancelled", job_id=jid)
            app.jobs_wake.set()
            return job_dict(job)
        except IllegalTransition:
            job = await resolve_job(app, jid)  # it moved on meanwhile: ask its runner
            if job.state.terminal:
                return job_dict(job)
    await app.store.record(
        EntityKind.JOB, jid, "cancel_requested", {"state": job.state.value, "by": by}
    )
    log.info("job_cancel_requested", job_id=jid)
    app.jobs_wake.set()
    out = job_dict(job)
    out["cancel_requested"] = True
    return out


async def pause(app: App, reason: str | None = None, *, by: str) -> dict[str, Any]:
    """Stop dispatching (running jobs go on; submits are still accepted)."""
    await app.store.set_flag(QUEUE_PAUSED_FLAG, True, reason=reason or "user", details={"by": by})
    return {"queue_paused": True}


async def resume(app: App, *, by: str) -> dict[str, Any]:
    await app.store.set_flag(QUEUE_PAUSED_FLAG, False, reason="user", details={"by": by})
    app.jobs_wake.set()
    return {"queue_paused": False}


async def resolve_job(app: App, ref: str) -> Job:
    """The job `ref` names: its full id, or a unique prefix of it of at least MIN_PREFIX
    characters (as for instances)."""
    try:
        return await app.store.get_job(ref)
    except NotFoundError:
        pass
    if len(ref) >= MIN_PREFIX:
        found = await app.store.jobs_with_id_prefix(ref)
        if len(found) == 1:
            return found[0]
        if found:
            raise ambiguous(ref, "jobs", [(j.id, j.state.value) for j in found])
    hint = (
        f" (an id prefix needs at least {MIN_PREFIX} characters)" if len(ref) < MIN_PREFIX else ""
    )
    raise errors.NotFound(f"no job {ref!r}{hint}", id=ref)
