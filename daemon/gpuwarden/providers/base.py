"""The Provider port: what gpuwarden needs from a GPU cloud, in normalised units.

Clients map their provider's states, units and errors to these at the boundary (SkyPilot's
status_map idea), so nothing above this layer knows a provider's wire format.
Units: GPU RAM in GiB, prices in USD per hour, times as aware UTC datetimes.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

from gpuwarden.core.model import Billing


class ProviderState(enum.StrEnum):
    """A provider instance's state, mapped to what gpuwarden needs to decide."""

    PENDING = "pending"  # accepted, not yet reachable (Vast created/loading, Lambda booting)
    RUNNING = "running"  # reachable (Vast running, Lambda active)
    STOPPED = "stopped"  # exists, may still bill (Vast stopped/exited/offline, Lambda unhealthy)
    TERMINATING = "terminating"
    TERMINATED = "terminated"


@dataclass(frozen=True, slots=True)
class Requirements:
    """What an offer search must satisfy."""

    gpu_name: str | None = None  # a GPU model, see core.gpus.gpu_matches ("4090", "A100", "A10")
    min_gpu_ram_gb: float | None = None
    num_gpus: int = 1
    max_price: float | None = None  # USD per hour
    min_reliability: float = 0.95
    verified: bool = True
    interruptible: bool = False
    region: str | None = None
    limit: int = 50
    # The disk a rental will ask for (GB): Vast prices storage per GB, so the price an offer
    # quotes (and we record and budget with) must be for this disk, not the search default.
    disk_gb: float | None = None


@dataclass(frozen=True, slots=True)
class Offer:
    provider: str
    offer_id: str  # Vast ask id; Lambda "<instance_type>@<region>"
    gpu_name: str
    num_gpus: int
    gpu_ram_gb: float  # per GPU
    price_per_hour: float  # USD, total for the machine
    region: str
    reliability: float = 1.0
    verified: bool = True
    billing: Billing = Billing.PER_SECOND
    # Spot (Vast "interruptible"): rented with a bid, ended when outbid. price_per_hour is
    # then bid + storage_per_hour (storage bills whatever the bid), on_demand_price what the
    # same machine costs on demand, min_bid the host's lowest accepted bid (GPU part only).
    interruptible: bool = False
    bid: float | None = None  # USD/h for the GPUs; None: min_bid
    min_bid: float | None = None
    storage_per_hour: float = 0.0
    on_demand_price: float | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class LaunchSpec:
    label: str  # gpuwarden-<installation>-<instance id>
    image: str
    disk_gb: float = 20.0
    onstart: str = ""  # a start-up script (Vast onstart, Lambda user_data)
    env: Mapping[str, str] = field(default_factory=dict)
    ssh_public_key: str = ""
    # Operators' keys too, where the provider can put several on an instance at launch (Vast's
    # account keys; Lambda takes exactly one, so the watchdog adds these once SSH answers).
    authorized_keys: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Launched:
    provider_id: str
    # Vast hands each instance its own API key; the dead-man switch uses it to end itself.
    instance_api_key: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class ProviderInstance:
    provider: str
    provider_id: str
    label: str
    state: ProviderState
    gpu_name: str = ""
    num_gpus: int = 1
    price_per_hour: float = 0.0
    region: str = ""
    started_at: datetime | None = None  # the provider's own start time
    ssh_host: str | None = None
    ssh_port: int | None = None
    ssh_user: str = "root"
    # A spot instance the provider stopped because it was outbid (it still bills storage).
    preempted: bool = False
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Account:
    provider: str
    credit: float | None  # spendable USD; None where the provider bills a card (Lambda)
    email: str | None = None


# --- errors: every caller can act on the class alone -------------------------------------


class ProviderError(Exception):
    """Base of the taxonomy. `may_exist` says whether a failed launch may have created one."""

    may_exist: bool = False

    def __init__(self, message: str, *, provider: str = "", status: int | None = None) -> None:
        super().__init__(message)
        self.provider = provider
        self.status = status


class AuthError(ProviderError):
    """The API key was refused. Not retried."""


class InsufficientCredit(ProviderError):
    """The account cannot pay. Everything is destroyed and the queue pauses."""


class NoCapacity(ProviderError):
    """The offer is gone or the region is sold out. Try the next offer."""


class RateLimited(ProviderError):
    may_exist = True

    def __init__(
        self,
        message: str,
        *,
        provider: str = "",
        status: int | None = 429,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, provider=provider, status=status)
        self.retry_after = retry_after


class Transient(ProviderError):
    """5xx, timeout, connection error: the request may or may not have taken effect."""

    may_exist = True


class InvalidRequest(ProviderError):
    """We sent something the provider refuses. A bug or a bad config; not retried."""


class NotFound(ProviderError):
    """No such instance or offer."""


class CreatedWithError(ProviderError):
    """The provider answered an error but also created an instance (Vast's new_contract)."""

    may_exist = True

    def __init__(self, message: str, *, provider: str = "", provider_id: str) -> None:
        super().__init__(message, provider=provider)
        self.provider_id = provider_id


# --- the port ------------------------------------------------------------------------------


@runtime_checkable
class Provider(Protocol):
    name: str
    billing: Billing

    async def search_offers(self, want: Requirements) -> list[Offer]: ...

    async def launch(self, offer: Offer, spec: LaunchSpec) -> Launched:
        """Rent `offer`. Raises CreatedWithError when an error still left an instance."""
        ...

    async def list_instances(self, label_prefix: str) -> list[ProviderInstance]:
        """Every instance whose label starts with `label_prefix`, in any live state."""
        ...

    async def get(self, provider_id: str) -> ProviderInstance | None:
        """None when the provider no longer knows it."""
        ...

    async def destroy(self, provider_id: str) -> None:
        """Idempotent: "no such instance" is success."""
        ...

    async def account(self) -> Account: ...

    async def aclose(self) -> None: ...


# --- GPU names ----------------------------------------------------------------------------

# --- registry ------------------------------------------------------------------------------

ProviderFactory = Callable[..., Provider]
_REGISTRY: dict[str, ProviderFactory] = {}


def register(name: str, factory: ProviderFactory) -> None:
    """Explicit registration; providers/__init__.py lists every built-in one."""
    _REGISTRY[name] = factory


def factory_for(name: str) -> ProviderFactory:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise KeyError(f"unknown provider {name!r} (known: {known})") from None


def registered() -> list[str]:
    return sorted(_REGISTRY)
