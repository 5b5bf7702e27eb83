"""Money: the price limit, the daily and monthly budgets, and the two account-wide stops.

Spend in a window (the UTC day, the UTC month) is the cost recorded in the termination
record for instances ended in it, plus what live instances have billed so far. "Committed"
adds what live instances can still bill without a further extension (to the earlier of
their lease end and hard cap: activity can push the idle deadline that far). A new rental,
or an extension, is refused when committed spend plus its own worst case would pass a limit.
When recorded spend itself passes a limit, every live instance is ended (reason budget).

An instance ended in a window counts wholly in it, whenever it started: a slight
overestimate at the turn of a day, never an underestimate.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog

from gpuwarden.core import errors, policy
from gpuwarden.core.model import (
    BUDGET_STOPPED,
    QUEUE_PAUSED_FLAG,
    Billing,
    EntityKind,
    Instance,
    InstanceState,
    TerminationReason,
)
from gpuwarden.fleet.app import App
from gpuwarden.store import StoreWriteFailed

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Window:
    name: str  # "daily" | "monthly"
    limit: float | None
    spent: float  # recorded: ended instances + live ones so far
    committed: float  # spent + what live instances can still bill


@dataclass(frozen=True, slots=True)
class BudgetState:
    daily: Window
    monthly: Window

    def windows(self) -> tuple[Window, Window]:
        return (self.daily, self.monthly)


async def state(app: App, now: datetime) -> BudgetState:
    limits = app.limits()
    live = app.store.live
    # The ended spend first, read again if an instance ended during the read (its record may
    # or may not be in it); then the live sums, with no await in between: an instance is
    # counted either as ended or as live, never as both (which could pass a limit and end
    # the fleet). The live sums are kept as rows change: no walk of the fleet on each check.
    while True:
        seen = live.ended
        month, today = await app.store.ended_spend(policy.month_start(now), policy.day_start(now))
        if live.ended == seen:
            break
    so_far = live.cost_now(now)
    ahead = live.committed(limits, now)
    out: list[Window] = []
    for name, ended, limit in (
        ("daily", today, limits.daily_limit),
        ("monthly", month, limits.monthly_limit),
    ):
        out.append(Window(name, limit, ended + so_far, ended + ahead))
    return BudgetState(*out)


def _money(x: float) -> str:
    return f"${x:,.2f}"


async def check_new(
    app: App, price_per_hour: float, lease: timedelta, billing: Billing, now: datetime
) -> None:
    """Refuse a rental over the hourly price limit or one that could pass a budget."""
    limits = app.limits()
    if limits.max_hourly_price is not None and price_per_hour > limits.max_hourly_price:
        raise errors.PriceTooHigh(
            f"{_money(price_per_hour)}/h is over budget.max_hourly_price"
            f" ({_money(limits.max_hourly_price)}/h)",
            price_per_hour=price_per_hour,
            max_hourly_price=limits.max_hourly_price,
        )
    worst = policy.estimate(price_per_hour, min(lease, limits.hard_cap), billing)
    await _check(app, worst, now, "this rental")


async def check_extension(app: App, inst: Instance, new_lease: datetime, now: datetime) -> None:
    limits = app.limits()
    before = policy.committed_cost(inst, limits, now)
    end = min(new_lease, policy.hard_deadline(inst, limits))
    extra = max(0.0, policy.cost_until(inst, end, now) - before)
    await _check(app, extra, now, "this extension")


async def _check(app: App, extra: float, now: datetime, what: str) -> None:
    limits = app.limits()
    if limits.daily_limit is None and limits.monthly_limit is None:
        return
    st = await state(app, now)
    for w in st.windows():
        if w.limit is not None and w.committed + extra > w.limit:
            room = max(0.0, w.limit - w.committed)
            raise errors.BudgetExceeded(
                f"{what} could cost up to {_money(extra)}, but the {w.name} limit"
                f" {_money(w.limit)} leaves {_money(room)} (spent {_money(w.spent)},"
                f" committed {_money(w.committed)})",
                window=w.name,
                limit=w.limit,
                spent=round(w.spent, 6),
                committed=round(w.committed, 6),
                requested=round(extra, 6),
            )


def passed_limit(st: BudgetState) -> Window | None:
    """The first window whose recorded spend has reached its limit."""
    for w in st.windows():
        if w.limit is not None and w.spent >= w.limit:
            return w
    return None


async def end_all(app: App, reason: TerminationReason, details: dict[str, object]) -> int:
    """Commit the intent for every live instance, then one destroy attempt each (in
    parallel). Returns how many were newly ended."""
    term = app.terminator
    begun: list[Instance] = []
    for inst in await app.store.live_instances():
        if inst.state is InstanceState.TERMINATING:
            continue
        begun.append(await term.begin(inst.id, reason, details))
    await asyncio.gather(*(term.drive(i) for i in begun if i.provider_id is not None))
    return len(begun)


async def credit_stop(app: App, *, provider: str, why: str) -> None:
    """The account cannot pay: end everything, pause the queue, say so at error level."""
    paused = await app.store.get_flag(QUEUE_PAUSED_FLAG, False)
    if not paused:
        log.error(
            "credit_stop",
            provider=provider,
            reason=TerminationReason.INSUFFICIENT_CREDIT.value,
            why=why,
        )
        try:
            await app.store.set_flag(
                QUEUE_PAUSED_FLAG, True, reason=TerminationReason.INSUFFICIENT_CREDIT.value
            )
        except StoreWriteFailed as exc:  # a full disk must not stop the endings
            log.warning("credit_stop_unrecorded", error=str(exc))
    ended = await end_all(
        app, TerminationReason.INSUFFICIENT_CREDIT, {"provider": provider, "why": why}
    )
    if ended and paused:
        log.error(
            "credit_stop",
            provider=provider,
            reason=TerminationReason.INSUFFICIENT_CREDIT.value,
            why=why,
            ended=ended,
        )


async def budget_stop(app: App, window: Window) -> int:
    """Recorded spend reached a limit: end everything (reason budget)."""
    live = [i for i in await app.store.live_instances() if i.state is not InstanceState.TERMINATING]
    if not live:
        return 0
    log.error(
        "budget_stop",
        reason=TerminationReason.BUDGET.value,
        window=window.name,
        limit=window.limit,
        spent=round(window.spent, 4),
    )
    details: dict[str, object] = {
        "window": window.name,
        "limit": window.limit,
        "spent": round(window.spent, 6),
    }
    # On record (and so heard by the notifier) once per stop, before the endings it causes.
    try:
        await app.store.record(
            EntityKind.DAEMON, "daemon", BUDGET_STOPPED, {**details, "instances": len(live)}
        )
    except StoreWriteFailed as exc:  # a full disk must not stop the endings
        log.warning("budget_stop_unrecorded", error=str(exc))
    return await end_all(app, TerminationReason.BUDGET, details)
