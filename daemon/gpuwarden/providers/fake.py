"""FakeProvider: a hand-written, in-memory Provider for unit tests and the benchmark.

It records every call, keeps a billing ledger (`bills`: launch time -> destroy time, read
from an injected clock), and has fault knobs for the failures real clouds produce: 5xx
(random rate or the next N calls of a method), an error that still created an instance,
listing lag, a destroy that silently does nothing, insufficient credit, and NoCapacity for
given offers. Nothing here sleeps: time is whatever the injected clock says.
"""

from __future__ import annotations

import itertools
import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from gpuwarden.core.clock import Clock
from gpuwarden.core.gpus import gpu_matches
from gpuwarden.core.model import Billing
from gpuwarden.providers.base import (
    Account,
    CreatedWithError,
    InsufficientCredit,
    Launched,
    LaunchSpec,
    NoCapacity,
    Offer,
    ProviderInstance,
    ProviderState,
    Requirements,
    Transient,
)


@dataclass
class Bill:
    """One line of the ledger: what the provider charges for an instance."""

    provider_id: str
    label: str
    price_per_hour: float
    start: datetime
    end: datetime | None = None  # None: still billing


@dataclass
class _Machine:
    provider_id: str
    label: str
    offer: Offer
    launched_at: datetime
    spec: LaunchSpec
    destroyed_at: datetime | None = None
    preempted: bool = False  # a spot machine that was outbid: stopped, not gone


@dataclass
class Faults:
    """Knobs. Counters are decremented as faults fire."""

    error_rate: float = 0.0  # chance of a Transient (5xx) on any call
    fail_next: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # method -> N
    created_with_error_next: int = 0  # launch creates the instance, then raises
    transient_after_create_next: int = 0  # launch creates the instance, then a 5xx
    listing_lag: timedelta = timedelta(0)  # new instances show in list_instances after this
    destroy_noop_next: int = 0  # destroy answers success and does nothing
    insufficient_credit: bool = False  # launch and account raise InsufficientCredit
    no_capacity: set[str] = field(default_factory=set)  # offer ids that raise NoCapacity


def default_offers(name: str, billing: Billing) -> list[Offer]:
    rows = (
        ("RTX 4090", 24.0, 0.40, "EU"),
        ("A100 80GB", 80.0, 1.20, "US"),
        ("A10", 24.0, 0.75, "US"),
    )
    return [
        Offer(
            provider=name,
            offer_id=f"{name}-offer-{i}",
            gpu_name=gpu,
            num_gpus=1,
            gpu_ram_gb=ram,
            price_per_hour=price,
            region=region,
            billing=billing,
        )
        for i, (gpu, ram, price, region) in enumerate(rows, start=1)
    ]


class FakeProvider:
    """An in-memory cloud. `calls` lists (method, args) in order; `bills` is the ledger."""

    def __init__(
        self,
        clock: Clock,
        name: str = "fake",
        *,
        billing: Billing = Billing.PER_SECOND,
        offers: list[Offer] | None = None,
        boot_delay: timedelta = timedelta(0),
        credit: float | None = 100.0,
        seed: int = 0,
        on_destroy: Callable[[str], None] | None = None,
    ) -> None:
        self.name = name
        self.billing = billing
        self.clock = clock
        self.offers = offers if offers is not None else default_offers(name, billing)
        self.boot_delay = boot_delay
        self.credit = credit
        self.faults = Faults()
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.bills: dict[str, Bill] = {}
        self.machines: dict[str, _Machine] = {}
        self.on_destroy = on_destroy  # the benchmark hooks the moment of each destroy call
        self._ids = itertools.count(1001)
        self._rng = random.Random(seed)  # noqa: S311 - fault injection, not security

    # --- helpers for tests ----------------------------------------------------------

    def live(self) -> list[_Machine]:
        return [m for m in self.machines.values() if m.destroyed_at is None]

    def calls_to(self, method: str) -> list[tuple[Any, ...]]:
        return [args for m, args in self.calls if m == method]

    def outbid(self, provider_id: str) -> None:
        """A spot machine loses its bid: the provider stops it (it still bills)."""
        m = self.machines[provider_id]
        self.machines[provider_id] = replace(m, preempted=True)

    def spawn(self, label: str, offer: Offer | None = None) -> str:
        """An instance that exists without a launch call (e.g. from a crashed daemon)."""
        return self._create(offer or self.offers[0], LaunchSpec(label=label, image="x"))

    # --- faults ---------------------------------------------------------------------

    def _fault(self, method: str) -> None:
        if self.faults.fail_next.get(method, 0) > 0:
            self.faults.fail_next[method] -= 1
            raise Transient(f"fake {method}: 503", provider=self.name, status=503)
        if self.faults.error_rate and self._rng.random() < self.faults.error_rate:
            raise Transient(f"fake {method}: 502", provider=self.name, status=502)

    def _create(self, offer: Offer, spec: LaunchSpec) -> str:
        pid = str(next(self._ids))
        now = self.clock.now()
        self.machines[pid] = _Machine(pid, spec.label, offer, now, spec)
        self.bills[pid] = Bill(pid, spec.label, offer.price_per_hour, now)
        return pid

    def _view(self, m: _Machine) -> ProviderInstance:
        now = self.clock.now()
        if m.destroyed_at is not None:
            state = ProviderState.TERMINATED
        elif m.preempted:
            state = ProviderState.STOPPED
        elif now - m.launched_at >= self.boot_delay:
            state = ProviderState.RUNNING
        else:
            state = ProviderState.PENDING
        running = state is ProviderState.RUNNING
        return ProviderInstance(
            provider=self.name,
            provider_id=m.provider_id,
            label=m.label,
            state=state,
            gpu_name=m.offer.gpu_name,
            num_gpus=m.offer.num_gpus,
            price_per_hour=m.offer.price_per_hour,
            region=m.offer.region,
            started_at=m.launched_at,
            ssh_host="127.0.0.1" if running else None,
            ssh_port=22000 + int(m.provider_id) % 1000 if running else None,
            preempted=m.preempted,
        )

    # --- the Provider port ----------------------------------------------------------

    async def search_offers(self, want: Requirements) -> list[Offer]:
        self.calls.append(("search_offers", (want,)))
        self._fault("search_offers")
        out = [
            o
            for o in self.offers
            if gpu_matches(want.gpu_name, o.gpu_name)
            and (want.min_gpu_ram_gb is None or o.gpu_ram_gb >= want.min_gpu_ram_gb)
            and (want.max_price is None or o.price_per_hour <= want.max_price)
            and o.num_gpus >= want.num_gpus
            and (want.interruptible or not o.interruptible)
        ]
        return sorted(out, key=lambda o: o.price_per_hour)[: want.limit]

    async def launch(self, offer: Offer, spec: LaunchSpec) -> Launched:
        self.calls.append(("launch", (offer.offer_id, spec.label)))
        if self.faults.insufficient_credit:
            raise InsufficientCredit("fake: insufficient credit", provider=self.name, status=402)
        if offer.offer_id in self.faults.no_capacity:
            raise NoCapacity(f"fake: offer {offer.offer_id} is gone", provider=self.name)
        self._fault("launch")
        if self.faults.created_with_error_next > 0:
            self.faults.created_with_error_next -= 1
            pid = self._create(offer, spec)
            raise CreatedWithError("fake: created with error", provider=self.name, provider_id=pid)
        if self.faults.transient_after_create_next > 0:
            self.faults.transient_after_create_next -= 1
            self._create(offer, spec)
            raise Transient("fake launch: 504 after create", provider=self.name, status=504)
        return Launched(provider_id=self._create(offer, spec), instance_api_key="fake-key")

    async def list_instances(self, label_prefix: str) -> list[ProviderInstance]:
        self.calls.append(("list_instances", (label_prefix,)))
        self._fault("list_instances")
        now = self.clock.now()
        lag = self.faults.listing_lag
        return [
            self._view(m)
            for m in self.machines.values()
            if m.destroyed_at is None
            and m.label.startswith(label_prefix)
            and now - m.launched_at >= lag
        ]

    async def get(self, provider_id: str) -> ProviderInstance | None:
        self.calls.append(("get", (provider_id,)))
        self._fault("get")
        m = self.machines.get(provider_id)
        if m is None or m.destroyed_at is not None:
            return None
        return self._view(m)

    async def destroy(self, provider_id: str) -> None:
        self.calls.append(("destroy", (provider_id,)))
        if self.on_destroy is not None:
            self.on_destroy(provider_id)
        self._fault("destroy")
        if self.faults.destroy_noop_next > 0:
            self.faults.destroy_noop_next -= 1
            return
        m = self.machines.get(provider_id)
        if m is None or m.destroyed_at is not None:
            return  # "no such instance" is success
        now = self.clock.now()
        self.machines[provider_id] = replace(m, destroyed_at=now)
        self.bills[provider_id].end = now

    async def account(self) -> Account:
        self.calls.append(("account", ()))
        if self.faults.insufficient_credit:
            raise InsufficientCredit("fake: insufficient credit", provider=self.name, status=402)
        self._fault("account")
        return Account(provider=self.name, credit=self.credit, email="fake@example.invalid")

    async def aclose(self) -> None:
        self.calls.append(("aclose", ()))
