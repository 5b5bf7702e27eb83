"""The vocabulary of gpuwarden: states, reasons and the frozen records that flow between layers.

Nothing here does I/O. The state machines live here too, so that the store, the policy and
the tests all read the same table of legal transitions.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


class InstanceState(enum.StrEnum):
    REQUESTED = "requested"  # intent committed, provider not yet called (or answer unknown)
    PROVISIONING = "provisioning"  # provider id known, SSH not yet answering
    RUNNING = "running"  # SSH answers
    TERMINATING = "terminating"  # destroy asked; retried until the provider stops listing it
    TERMINATED = "terminated"
    LAUNCH_FAILED = "launch_failed"  # provider refused and nothing with our label exists

    @property
    def live(self) -> bool:
        """True while the instance may bill (or may exist at the provider)."""
        return self in LIVE_INSTANCE_STATES


LIVE_INSTANCE_STATES = frozenset(
    {
        InstanceState.REQUESTED,
        InstanceState.PROVISIONING,
        InstanceState.RUNNING,
        InstanceState.TERMINATING,
    }
)

INSTANCE_TRANSITIONS: dict[InstanceState, frozenset[InstanceState]] = {
    InstanceState.REQUESTED: frozenset(
        {
            InstanceState.PROVISIONING,
            InstanceState.RUNNING,
            InstanceState.TERMINATING,
            InstanceState.LAUNCH_FAILED,
        }
    ),
    InstanceState.PROVISIONING: frozenset(
        {InstanceState.RUNNING, InstanceState.TERMINATING, InstanceState.TERMINATED}
    ),
    InstanceState.RUNNING: frozenset({InstanceState.TERMINATING, InstanceState.TERMINATED}),
    InstanceState.TERMINATING: frozenset({InstanceState.TERMINATED}),
    InstanceState.TERMINATED: frozenset(),
    InstanceState.LAUNCH_FAILED: frozenset(),
}


class JobState(enum.StrEnum):
    QUEUED = "queued"
    PROVISIONING = "provisioning"
    RUNNING = "running"
    FETCHING = "fetching"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_JOB_STATES


TERMINAL_JOB_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})

JOB_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.PROVISIONING, JobState.CANCELLED, JobState.FAILED}),
    JobState.PROVISIONING: frozenset(
        {JobState.QUEUED, JobState.RUNNING, JobState.FAILED, JobState.CANCELLED}
    ),
    JobState.RUNNING: frozenset(
        {JobState.QUEUED, JobState.FETCHING, JobState.FAILED, JobState.CANCELLED}
    ),
    JobState.FETCHING: frozenset(
        {JobState.QUEUED, JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}
    ),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}


class TerminationReason(enum.StrEnum):
    IDLE = "idle"
    LEASE_EXPIRED = "lease_expired"
    HARD_TIMEOUT = "hard_timeout"
    WATCHDOG = "watchdog"
    MANUAL = "manual"
    JOB_DONE = "job_done"
    INSUFFICIENT_CREDIT = "insufficient_credit"
    BUDGET = "budget"
    ORPHAN = "orphan"
    VANISHED = "vanished"  # the provider ended it, not us
    LAUNCH_FAILED = "launch_failed"
    DEADMAN = "deadman"  # the switch on the instance ended it while the daemon was silent
    PREEMPTED = "preempted"  # a spot (bid) instance was outbid: stopped, so we destroyed it
    ROLLED_OVER = "rolled_over"  # a schedule-kept warm instance replaced by a fresh one


# Names shared by writers and readers of the store: the queue's pause flag, the event a
# config reload records (it wakes the guard, since new limits may move deadlines), and the
# event a budget stop records (the notifier tells the operator).
QUEUE_PAUSED_FLAG = "queue_paused"
# The installation label this state dir's instances carry, unless the config sets one.
INSTALLATION_FLAG = "installation"
# What an installation was called before each state dir had its own (still the default a
# database with instances keeps, so that they are recognised).
LEGACY_INSTALLATION = "main"
CONFIG_RELOADED = "config_reloaded"
BUDGET_STOPPED = "budget_stop"


class NotifyKind(enum.StrEnum):
    """What the notifier tells the operator about (notify.events chooses among them)."""

    INSTANCE_ENDED = "instance_ended"  # an instance ended, and why
    BUDGET_STOP = "budget_stop"  # a budget or credit stop ended everything
    LEASE_ENDING = "lease_ending"  # a lease ends within notify.lease_warning
    DESTROY_FAILING = "destroy_failing"  # a destroy still failing after the escalation age
    DEADMAN = "deadman"  # an instance's dead-man switch ended it while the daemon was silent
    STOPPED_BILLING = "stopped_billing"  # the daemon stopped with instances still billing


class EntityKind(enum.StrEnum):
    INSTANCE = "instance"
    JOB = "job"
    DAEMON = "daemon"


class Billing(enum.StrEnum):
    """How a provider rounds billed time."""

    PER_SECOND = "per_second"  # Vast.ai
    PER_MINUTE = "per_minute"  # Lambda Cloud: each started minute


@dataclass(frozen=True, slots=True)
class Instance:
    """One rented (or about to be rented) machine, as the database knows it."""

    id: str
    provider: str
    label: str
    state: InstanceState
    created_at: datetime  # when we committed the intent
    lease_until: datetime
    last_activity: datetime
    price_per_hour: float
    gpu: str = ""
    num_gpus: int = 1
    region: str = ""
    offer_id: str = ""
    provider_id: str | None = None
    provider_started_at: datetime | None = None
    ssh_host: str | None = None
    ssh_port: int | None = None
    ssh_user: str = "root"
    running_at: datetime | None = None
    terminating_at: datetime | None = None
    terminated_at: datetime | None = None
    reason: TerminationReason | None = None
    strikes: int = 0
    last_probe_at: datetime | None = None
    last_probe_ok: bool | None = None
    job_id: str | None = None
    billing: Billing = Billing.PER_SECOND
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class JobSpec:
    """What the user asked for. User text lives here and only ever travels as JSON."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 4
    seed: int | None = None
    width: int = 512
    height: int = 512
    model: str = ""
    count: int = 1
    guidance: float = 0.0
    engine: str = ""  # "" = the provider's default (diffusers on real GPUs, preview on sim)
    max_price: float | None = None
    gpu_ram_gb: float | None = None
    spot: bool | None = None  # None: jobs.interruptible decides


@dataclass(frozen=True, slots=True)
class Job:
    id: str
    state: JobState
    spec: JobSpec
    created_at: datetime
    updated_at: datetime
    priority: int = 0
    attempt: int = 0
    instance_id: str | None = None
    progress_step: int = 0
    progress_total: int = 0
    error: str | None = None
    outputs: tuple[str, ...] = ()
    started_at: datetime | None = None
    finished_at: datetime | None = None
    gpu_seconds: float = 0.0
    cost: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)  # remote pid, paths, reuse hints


@dataclass(frozen=True, slots=True)
class Event:
    """One row of the append-only event log."""

    id: int
    at: datetime
    kind: EntityKind
    entity_id: str
    name: str  # "state" for a transition; otherwise what happened ("extended", "strike", ...)
    from_state: str | None
    to_state: str | None
    reason: str | None
    details: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Termination:
    """The record a termination leaves, queryable by time window."""

    at: datetime
    instance_id: str
    provider: str
    provider_id: str | None
    reason: TerminationReason
    uptime_s: float
    gpu: str
    region: str
    price_per_hour: float
    cost: float


def instance_label(installation: str, instance_id: str) -> str:
    """The label every instance carries at the provider, so a reconciler can find it."""
    return f"gpuwarden-{installation}-{instance_id}"


def label_prefix(installation: str) -> str:
    return f"gpuwarden-{installation}-"
