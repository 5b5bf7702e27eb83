"""Recording an instance the provider ended by itself (we did not ask): reason `deadman`
when its switch had cause to end it by the time we first missed it, else `vanished`.

Shared by the reconciler (an instance missing from listings that `get()` confirms gone) and
the watchdog (probes failing because the machine is gone: asking the provider first keeps
the record from calling that a watchdog verdict)."""

from __future__ import annotations

from datetime import datetime

import structlog

from gpuwarden.core import policy
from gpuwarden.core.clock import format_ts
from gpuwarden.core.model import InstanceState
from gpuwarden.fleet.app import App
from gpuwarden.remote import deadman
from gpuwarden.store import IllegalTransition, NotFoundError

log = structlog.get_logger(__name__)


async def provider_ended(app: App, instance_id: str, why: str, first_missed: datetime) -> bool:
    """TERMINATED with the reason the provider's own ending deserves; False when the row
    is gone or already ended (the first record stands)."""
    try:  # the row as it is now: a probe may have landed since the caller read it
        inst = await app.store.get_instance(instance_id)
    except NotFoundError:
        return False
    reason = policy.vanish_reason(
        inst,
        app.limits(),
        first_missed,
        switch=deadman.switch_can_end(app.settings, inst.provider),
    )
    details = {
        "why": why,
        "first_missed": format_ts(first_missed),
        "last_contact": format_ts(policy.last_contact(inst)),
    }
    try:
        await app.store.transition_instance(
            inst.id, InstanceState.TERMINATED, reason=reason, details=details
        )
    except (IllegalTransition, NotFoundError):
        return False
    log.warning(
        "instance_vanished",
        instance_id=inst.id,
        provider=inst.provider,
        provider_id=inst.provider_id,
        reason=reason.value,
        why=why,
        last_contact=details["last_contact"],
    )
    app.jobs_wake.set()
    return True
