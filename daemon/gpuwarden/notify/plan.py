"""What the notifier says, and when: pure functions of store events, instances and `now`.

- `from_event`: the message a store event calls for (an instance ended, and why; the
  dead-man switch ended one; a budget or credit stop), or None.
- `planned`: the messages that time alone calls for (a lease ending within the warning; a
  destroy still failing after the escalation age), from the live instances at `now`, and
  when the next one falls due. Each has a key, so that it is sent once: a lease warning's
  key holds the lease end, so an extended lease is warned about again near its new end.
- `TokenBucket`: the rate limit (a burst, then a steady rate), on a monotonic time passed in.
- `retry_delay`: the backoff between delivery attempts of one message.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from gpuwarden.core.clock import format_ts
from gpuwarden.core.model import (
    BUDGET_STOPPED,
    QUEUE_PAUSED_FLAG,
    EntityKind,
    Event,
    Instance,
    InstanceState,
    NotifyKind,
    TerminationReason,
)

RETRY_FIRST = 2.0  # seconds before the first retry of a failed delivery
RETRY_CAP = 300.0
MAX_ATTEMPTS = 6  # then the message is given up (and logged): about 1 min of trying

# Kinds that call for action (apprise shows them as warnings); the rest are information.
WARNINGS = frozenset(
    {
        NotifyKind.BUDGET_STOP,
        NotifyKind.LEASE_ENDING,
        NotifyKind.DESTROY_FAILING,
        NotifyKind.DEADMAN,
        NotifyKind.STOPPED_BILLING,
    }
)


@dataclass(frozen=True, slots=True)
class Message:
    kind: NotifyKind
    title: str
    body: str
    key: str = ""  # for planned messages: sent once per key
    instance_id: str = ""  # for planned messages: the instance the key is about

    @property
    def warning(self) -> bool:
        return self.kind in WARNINGS


def _money(value: object) -> str:
    return f"${value:,.2f}" if isinstance(value, int | float) else "$?"


def _uptime(seconds: object) -> str:
    if not isinstance(seconds, int | float):
        return "?"
    minutes = round(seconds / 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m"


def from_event(ev: Event, installation: str) -> Message | None:
    """The message this store event calls for, if any. Cheap: it runs in the store's
    commit path (the notifier's listener)."""
    head = f"gpuwarden[{installation}]"
    d = ev.details
    if ev.kind is EntityKind.INSTANCE and ev.to_state == InstanceState.TERMINATED.value:
        gpu = d.get("gpu") or "GPU"
        spent = f"up {_uptime(d.get('uptime_s'))}, cost {_money(d.get('cost'))}"
        if ev.reason == TerminationReason.DEADMAN.value:
            return Message(
                NotifyKind.DEADMAN,
                f"{head}: dead-man switch ended instance {ev.entity_id}",
                f"Instance {ev.entity_id} ({gpu}) ended itself while the daemon was silent;"
                f" {spent}. Check that gpuwarden is running.",
            )
        return Message(
            NotifyKind.INSTANCE_ENDED,
            f"{head}: instance {ev.entity_id} ended ({ev.reason or 'unknown'})",
            f"Instance {ev.entity_id} ({gpu}) ended, reason {ev.reason or 'unknown'}; {spent}.",
        )
    if ev.kind is EntityKind.DAEMON and ev.name == BUDGET_STOPPED:
        return Message(
            NotifyKind.BUDGET_STOP,
            f"{head}: budget stop ({d.get('window')} limit)",
            f"Recorded spend {_money(d.get('spent'))} reached the {d.get('window')} limit"
            f" {_money(d.get('limit'))}; ending {d.get('instances', 'every')} instance(s).",
        )
    paused = ev.entity_id == QUEUE_PAUSED_FLAG and d.get("value") is True
    if paused and ev.reason == TerminationReason.INSUFFICIENT_CREDIT.value:
        return Message(
            NotifyKind.BUDGET_STOP,
            f"{head}: credit stop",
            "The account's credit is under the floor: every instance is being ended and the"
            " job queue is paused. Top up, then `gpuwarden resume`.",
        )
    return None


def planned(
    live: Iterable[Instance],
    *,
    installation: str,
    lease_warning: timedelta,
    escalate_after: timedelta,
    now: datetime,
) -> tuple[list[Message], datetime | None]:
    """The messages due at `now` (the caller drops those whose key it has sent), and the
    earliest later time at which another falls due (None: nothing planned)."""
    head = f"gpuwarden[{installation}]"
    due: list[Message] = []
    later: list[datetime] = []
    for inst in live:
        if inst.state is InstanceState.TERMINATING:
            since = inst.terminating_at or now
            at = since + escalate_after
            if at > now:
                later.append(at)
                continue
            tries = inst.extra.get("destroy_attempts", "?")
            due.append(
                Message(
                    NotifyKind.DESTROY_FAILING,
                    f"{head}: destroy of instance {inst.id} still failing",
                    f"Instance {inst.id} ({inst.provider} {inst.provider_id}) has been ending"
                    f" since {format_ts(since)} ({tries} attempts) and may still bill; gpuwarden"
                    f" keeps retrying. Check the provider's console.",
                    key=f"destroy:{inst.id}",
                    instance_id=inst.id,
                )
            )
        elif inst.state.live and inst.lease_until > now:
            at = inst.lease_until - lease_warning
            if at > now:
                later.append(at)
                continue
            left = round((inst.lease_until - now).total_seconds() / 60)
            due.append(
                Message(
                    NotifyKind.LEASE_ENDING,
                    f"{head}: lease of instance {inst.id} ends in {left} min",
                    f"Instance {inst.id} ({inst.gpu or 'GPU'} on {inst.provider}) will be ended"
                    f" at {format_ts(inst.lease_until)}. To keep it:"
                    f" gpuwarden extend {inst.id} --hours 1",
                    key=f"lease:{inst.id}:{format_ts(inst.lease_until)}",
                    instance_id=inst.id,
                )
            )
    return due, min(later, default=None)


def stopped_billing(live: list[Instance], installation: str, deadman_timeout: timedelta) -> Message:
    """The message for a daemon stopping while `live` (not empty) may still bill."""
    burn = sum(i.price_per_hour for i in live)
    ids = ", ".join(i.id for i in live[:20]) + (" ..." if len(live) > 20 else "")
    return Message(
        NotifyKind.STOPPED_BILLING,
        f"gpuwarden[{installation}]: stopped with {len(live)} instance(s) billing",
        f"The daemon stopped while {len(live)} instance(s) may still bill ({_money(burn)}/h):"
        f" {ids}. Nothing ends them on their deadlines until it is back; each one's dead-man"
        f" switch ends it after {int(deadman_timeout.total_seconds() // 60)} min of silence.",
    )


def retry_delay(attempt: int) -> float:
    """Seconds before delivery attempt `attempt + 1` (after `attempt` failures, 1-based)."""
    return float(min(RETRY_CAP, RETRY_FIRST * 2 ** max(0, attempt - 1)))


@dataclass
class TokenBucket:
    """`burst` sends at once, then `rate` per second. Times are monotonic seconds."""

    rate: float
    burst: int
    tokens: float = -1.0  # full on first use
    at: float | None = None

    def take(self, now: float) -> float:
        """Take a token if there is one (returns 0.0); otherwise the seconds until one is
        due, taking nothing."""
        if self.at is None or self.tokens < 0:
            self.tokens, self.at = float(self.burst), now
        self.tokens = min(float(self.burst), self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate
