"""The provider clients, their explicit registry, and `build_providers` (settings -> clients).

Registry names are the config section names ("vast", "lambda"); a client's `name` is the
instance attribute stored in `Instance.provider` ("vast", "lambda", "sim-vast", "sim-lambda").
"""

from __future__ import annotations

from typing import Protocol

from gpuwarden.config.settings import (
    SIM_DEFAULT_KEY,
    ConfigError,
    ProviderSettings,
    Settings,
    missing_api_key,
)
from gpuwarden.core.clock import Clock
from gpuwarden.providers.base import Provider, factory_for, register
from gpuwarden.providers.http import Backoff, ClientOptions
from gpuwarden.providers.lambdacloud import LambdaClient
from gpuwarden.providers.vast import VastClient

register("vast", VastClient)
register("lambda", LambdaClient)

# The sim has no rate limits, and tests drive its fault knobs: no pacing, quick retries.
SIM_PACING: dict[str, float] = {}
SIM_BACKOFF = Backoff(base=0.05, cap=1.0, rate_limited_base=0.1, max_retry_after=5.0)


class SimUrls(Protocol):
    """Where the simulated cloud serves each API (what `SimCloud.start()` returns)."""

    @property
    def vast(self) -> str: ...

    @property
    def lambda_(self) -> str: ...


def _api_key(name: str, s: ProviderSettings) -> str:
    if s.api_key is None or not s.api_key.get_secret_value():
        raise ConfigError([missing_api_key(name)])
    return s.api_key.get_secret_value()


def build_providers(
    settings: Settings, clock: Clock, *, sim_urls: SimUrls | None = None
) -> dict[str, Provider]:
    """One client per enabled provider, plus sim-vast/sim-lambda when the sim runs.

    Raises ConfigError when an enabled provider has no API key.
    """
    ps = settings.providers
    out: dict[str, Provider] = {}
    for name, s in ps.enabled().items():
        if name == "sim":
            continue
        kwargs: dict[str, object] = {
            "name": name,
            "base_url": s.base_url,  # None: the client's default
            "api_key": _api_key(name, s),
            "clock": clock,
            "timeout": s.timeout.total_seconds(),
            "max_retries": s.max_retries,
        }
        if name == "lambda":
            kwargs["ssh_key_name"] = f"gpuwarden-{settings.daemon.installation}"
        out[name] = factory_for(name)(**kwargs)
    if ps.sim.enabled and sim_urls is not None:
        out.update(_sim_clients(settings, clock, sim_urls))
    return out


def _sim_clients(settings: Settings, clock: Clock, urls: SimUrls) -> dict[str, Provider]:
    sim = settings.providers.sim

    def options(name: str, base_url: str) -> ClientOptions:
        return {
            "name": name,
            "base_url": base_url,
            "api_key": sim.effective_api_key(),
            "clock": clock,
            "timeout": sim.timeout.total_seconds(),
            "max_retries": sim.max_retries,
            "pacing": SIM_PACING,
            "backoff": SIM_BACKOFF,
        }

    return {
        "sim-vast": VastClient(**options("sim-vast", urls.vast)),
        "sim-lambda": LambdaClient(
            ssh_key_name=f"gpuwarden-{settings.daemon.installation}",
            **options("sim-lambda", urls.lambda_),
        ),
    }


__all__ = [
    "SIM_BACKOFF",
    "SIM_DEFAULT_KEY",
    "SIM_PACING",
    "LambdaClient",
    "SimUrls",
    "VastClient",
    "build_providers",
]
