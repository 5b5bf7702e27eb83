"""Ending a spot instance that was outbid: one path for whoever notices first.

Vast stops an outbid interruptible instance (cur_state, intended_status and next_state all
`stopped`); a stopped instance still bills its storage and never resumes by itself while the
bid is too low, so it is destroyed at once, with reason `preempted`. The reconciler notices
it in its listing (every policy.poll_interval, 30 s by default); the watchdog, whose probe
fails when the machine stops (every policy.watchdog_interval, 5 min), asks the provider
before it counts a strike. The jobs loop, whose runner dies or loses SSH with the machine,
asks too before it takes that for a fault. All three make the same call (end_if_preempted);
the job then goes back to the front of the queue (jobs/renting.py).
"""

from __future__ import annotations

import structlog

from gpuwarden.core.model import Instance, InstanceState, TerminationReason
from gpuwarden.fleet.app import App
from gpuwarden.providers.base import ProviderInstance

log = structlog.get_logger(__name__)

_ENDABLE = (InstanceState.REQUESTED, InstanceState.PROVISIONING, InstanceState.RUNNING)


def is_spot(inst: Instance) -> bool:
    return isinstance(inst.extra.get("spot"), dict)


async def end_if_preempted(
    app: App, inst: Instance, seen: ProviderInstance | None, *, noticed_by: str
) -> bool:
    """End `inst` (reason preempted) when the provider shows it outbid. True if it did."""
    if seen is None or not seen.preempted or inst.state not in _ENDABLE:
        return False
    log.warning(
        "instance_preempted",
        instance_id=inst.id,
        provider=inst.provider,
        provider_id=inst.provider_id,
        gpu=inst.gpu,
        noticed_by=noticed_by,
    )
    await app.terminator.end(
        inst.id, TerminationReason.PREEMPTED, {"noticed_by": noticed_by, "outbid": True}
    )
    app.jobs_wake.set()
    return True


async def check(app: App, inst: Instance, *, noticed_by: str) -> bool:
    """Ask the provider whether the spot instance `inst` was outbid, and end it if so. Any
    error is no answer: the caller goes on as if it was not."""
    provider = app.providers.get(inst.provider)
    if not is_spot(inst) or provider is None or inst.provider_id is None:
        return False
    try:
        seen = await provider.get(inst.provider_id)
    except Exception as exc:  # an odd answer says nothing about the bid
        log.info("preemption_check_failed", instance_id=inst.id, error=str(exc))
        return False
    return await end_if_preempted(app, inst, seen, noticed_by=noticed_by)
