"""The launch path, shared by interactive launches and by jobs: intent first, then the call.

1. check the price limit and the budget (fleet/budget.py);
2. commit REQUESTED with the label `gpuwarden-<installation>-<id>` (crash point
   `after_intent`); from here the guard counts the instance's deadlines from creation;
3. call provider.launch (crash point `after_provider_launch`);
4. record the provider id and go PROVISIONING (crash point `after_record`).

Outcomes of the call:
- success: PROVISIONING with the provider id;
- CreatedWithError: the id is recorded (PROVISIONING), then the instance is ended at once
  with reason launch_failed;
- an error after which the instance may exist (Transient, RateLimited, a timeout, anything
  unexpected): the row stays REQUESTED and the reconciler decides: it adopts the instance
  if the provider lists our label, or marks it launch_failed after two empty passes past
  the grace period. We never assume that nothing exists;
- a definite refusal (NoCapacity, InvalidRequest, AuthError, InsufficientCredit): the
  provider said no before creating anything, so the row goes straight to LAUNCH_FAILED
  (the architecture's "reconciler confirmed" is not needed when the refusal is definite;
  should the provider have created something anyway, the reconciler finds it by its label
  and destroys it as an orphan). InsufficientCredit also triggers the credit stop.
"""

from __future__ import annotations

import secrets
from typing import Any

import structlog

from gpuwarden.core import errors, policy
from gpuwarden.core.model import (
    EntityKind,
    Instance,
    InstanceState,
    TerminationReason,
    instance_label,
)
from gpuwarden.fleet import budget
from gpuwarden.fleet.app import App
from gpuwarden.providers.base import (
    AuthError,
    CreatedWithError,
    InsufficientCredit,
    InvalidRequest,
    LaunchSpec,
    NoCapacity,
    Offer,
    Provider,
    ProviderError,
    ProviderInstance,
    ProviderState,
)
from gpuwarden.remote import deadman
from gpuwarden.store import IllegalTransition
from gpuwarden.system import crashpoints

log = structlog.get_logger(__name__)

_DEFINITE = (NoCapacity, InvalidRequest, AuthError, InsufficientCredit)


def new_instance_id() -> str:
    return secrets.token_hex(4)


def app_onstart(app: App, provider: str, instance_id: str, onstart: str = "") -> str:
    """The start-up script for a launch: the dead-man switch (remote/deadman.py) followed by
    `onstart`. Providers without a switch get `onstart`."""
    kind = deadman.provider_kind(provider)
    if kind is None:
        return onstart
    key = deadman.switch_api_key(app.settings, provider)
    try:
        script = deadman.onstart_script(
            app.settings, kind, deadman.default_api_base(kind, app.settings), instance_id, key
        )
    except ValueError as exc:
        # Launch without the switch rather than not at all; the guard still holds.
        log.error("deadman_unavailable", instance_id=instance_id, provider=provider, error=str(exc))
        return onstart
    return script + onstart if onstart else script


def spot_extra(offer: Offer) -> dict[str, Any]:
    """What a spot rental records on its row (extra["spot"]): the reconciler and watchdog
    read it to tell an outbid instance, `costs` to show what spot saved."""
    if not offer.interruptible:
        return {}
    bid = offer.bid if offer.bid is not None else offer.min_bid
    return {
        "spot": {
            "bid": bid,
            "min_bid": offer.min_bid,
            "on_demand_price": offer.on_demand_price,
        }
    }


async def launch(
    app: App,
    offer: Offer,
    *,
    hours: float | None = None,
    job_id: str | None = None,
    onstart: str = "",
    by: str | None = None,
) -> Instance:
    """Rent `offer`. Returns the instance row (PROVISIONING on success). Raises a DomainError
    (PriceTooHigh, BudgetExceeded, LeaseRefused, ProviderUnavailable, NoOffer). `by`: who
    asked, recorded on the intent's event (the control socket's caller)."""
    provider = app.providers.get(offer.provider)
    if provider is None:
        raise errors.ProviderUnavailable(f"provider {offer.provider!r} is not enabled")
    limits = app.limits()
    lease = policy.initial_lease(hours, limits)
    now = app.clock.now()
    await budget.check_new(app, offer.price_per_hour, lease, offer.billing, now)

    iid = new_instance_id()
    inst = Instance(
        id=iid,
        provider=offer.provider,
        label=instance_label(app.installation, iid),
        state=InstanceState.REQUESTED,
        created_at=now,
        lease_until=now + lease,
        last_activity=now,
        price_per_hour=offer.price_per_hour,
        gpu=offer.gpu_name,
        num_gpus=offer.num_gpus,
        region=offer.region,
        offer_id=offer.offer_id,
        job_id=job_id,
        billing=offer.billing,
        extra=spot_extra(offer),
    )
    app.launching.add(iid)
    try:
        await app.store.insert_instance(
            inst,
            details={
                "offer_id": offer.offer_id,
                "lease_s": lease.total_seconds(),
                **({"by": by} if by else {}),
            },
        )
        crashpoints.hit("after_intent")
        return await _call(app, provider, offer, inst, onstart)
    finally:
        app.launching.discard(iid)


async def _call(
    app: App, provider: Provider, offer: Offer, inst: Instance, onstart: str
) -> Instance:
    spec = LaunchSpec(
        label=inst.label,
        image=app.settings.jobs.image,
        disk_gb=app.settings.jobs.disk_gb,
        onstart=app_onstart(app, offer.provider, inst.id, onstart),
        ssh_public_key=app.ssh_public_key,
        authorized_keys=tuple(app.settings.ssh.authorized_keys),
    )
    fields: dict[str, Any] = {"instance_id": inst.id, "provider": inst.provider}
    try:
        launched = await provider.launch(offer, spec)
    except CreatedWithError as exc:
        log.warning(
            "launch_created_with_error", **fields, provider_id=exc.provider_id, error=str(exc)
        )
        await record_provider_id(app, inst.id, exc.provider_id, None)
        await app.terminator.end(inst.id, TerminationReason.LAUNCH_FAILED, {"error": str(exc)})
        raise errors.ProviderUnavailable(
            f"{inst.provider} failed the launch but created {exc.provider_id}; it is being"
            " destroyed",
            instance_id=inst.id,
        ) from None
    except _DEFINITE as exc:
        await _refused(app, inst, exc)
        raise _domain_error(exc, inst) from None
    except Exception as exc:  # Transient, RateLimited, timeouts, anything unknown
        log.warning("launch_outcome_unknown", **fields, error=f"{type(exc).__name__}: {exc}")
        await app.store.record(
            EntityKind.INSTANCE, inst.id, "launch_uncertain", {"error": str(exc)}
        )
        raise errors.ProviderUnavailable(
            f"{inst.provider} did not confirm the launch ({exc}); the reconciler will adopt"
            " the instance if it exists or mark the launch failed",
            instance_id=inst.id,
        ) from None
    crashpoints.hit("after_provider_launch")
    done = await record_provider_id(app, inst.id, launched.provider_id, None)
    crashpoints.hit("after_record")
    log.info("instance_launched", **fields, provider_id=launched.provider_id, gpu=inst.gpu)
    return done


async def _refused(app: App, inst: Instance, exc: ProviderError) -> None:
    await app.store.transition_instance(
        inst.id,
        InstanceState.LAUNCH_FAILED,
        reason=TerminationReason.LAUNCH_FAILED,
        details={"error": str(exc), "error_type": type(exc).__name__},
    )
    log.warning(
        "launch_refused",
        instance_id=inst.id,
        provider=inst.provider,
        reason=TerminationReason.LAUNCH_FAILED.value,
        error=f"{type(exc).__name__}: {exc}",
    )
    if isinstance(exc, InsufficientCredit):
        await budget.credit_stop(app, provider=inst.provider, why=str(exc))


def _domain_error(exc: ProviderError, inst: Instance) -> errors.DomainError:
    if isinstance(exc, NoCapacity):
        return errors.NoOffer(f"{inst.provider}: {exc}", instance_id=inst.id)
    if isinstance(exc, InsufficientCredit):
        return errors.QueuePaused(
            f"{inst.provider}: insufficient credit; every instance is being ended and the"
            " queue is paused",
            instance_id=inst.id,
        )
    return errors.ProviderUnavailable(f"{inst.provider}: {exc}", instance_id=inst.id)


async def record_provider_id(
    app: App, instance_id: str, provider_id: str, seen: ProviderInstance | None
) -> Instance:
    """Attach the provider's id to our row, whatever became of the row meanwhile:
    REQUESTED goes PROVISIONING (or RUNNING when `seen` says so); a row already being ended
    gets the id and is destroyed; a row given up (ended or launch_failed) means this is an
    orphan: tracked under a new row and destroyed."""
    store = app.store
    inst = await store.get_instance(instance_id)
    term = app.terminator
    if inst.state is InstanceState.REQUESTED:
        fields = _state_fields(seen)
        to = InstanceState.RUNNING if fields.pop("_running", False) else InstanceState.PROVISIONING
        try:
            return await store.transition_instance(
                instance_id,
                to,
                details={"provider_id": provider_id},
                provider_id=provider_id,
                **fields,
            )
        except IllegalTransition:
            # The guard ended the intent while the provider created it (a deadline that
            # fell during the call): the row is TERMINATING now, and the branch below
            # gives it the id so that the destroy can happen.
            inst = await store.get_instance(instance_id)
    if inst.state is InstanceState.TERMINATING and inst.provider_id is None:
        inst = await store.update_instance(instance_id, provider_id=provider_id)
        await term.drive(inst)
        return await store.get_instance(instance_id)
    if inst.provider_id == provider_id:
        return inst
    # Given up, or already holding another id: whatever this is, nobody owns it.
    orphan = seen or ProviderInstance(
        provider=inst.provider,
        provider_id=provider_id,
        label=inst.label,
        state=ProviderState.PENDING,
        gpu_name=inst.gpu,
        num_gpus=inst.num_gpus,
        price_per_hour=inst.price_per_hour,
        region=inst.region,
    )
    return await term.orphan(orphan)


def _state_fields(seen: ProviderInstance | None) -> dict[str, Any]:
    if seen is None:
        return {}
    out: dict[str, Any] = {}
    if seen.started_at is not None:
        out["provider_started_at"] = seen.started_at
    if seen.state is ProviderState.RUNNING:
        out["_running"] = True
        out |= running_fields(seen)
    return out


def running_fields(seen: ProviderInstance) -> dict[str, Any]:
    """The SSH endpoint the provider reports, as instance columns."""
    out: dict[str, Any] = {"ssh_user": seen.ssh_user}
    if seen.ssh_host is not None:
        out["ssh_host"] = seen.ssh_host
    if seen.ssh_port is not None:
        out["ssh_port"] = seen.ssh_port
    return out
