"""build_providers: settings -> clients, the registry, and the sim-backed clients."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from gpuwarden.config.settings import ConfigError, Settings
from gpuwarden.core.clock import FakeClock
from gpuwarden.providers import SIM_PACING, build_providers
from gpuwarden.providers.base import Provider, registered
from gpuwarden.providers.lambdacloud import LambdaClient
from gpuwarden.providers.vast import VastClient


@dataclass(frozen=True)
class Urls:
    vast: str
    lambda_: str


URLS = Urls(vast="http://127.0.0.1:9/vast", lambda_="http://127.0.0.1:9/lambda/api/v1")


def settings(**providers: Any) -> Settings:
    return Settings(providers=providers)


async def close(built: dict[str, Provider]) -> None:
    for p in built.values():
        await p.aclose()


def test_the_registry_lists_both_clients() -> None:
    assert {"vast", "lambda"} <= set(registered())


async def test_nothing_enabled_builds_nothing() -> None:
    assert build_providers(settings(), FakeClock()) == {}


async def test_enabled_providers_get_clients_with_their_settings() -> None:
    s = settings(
        vast={"enabled": True, "api_key": "vk", "max_retries": 2},
        **{"lambda": {"enabled": True, "api_key": "lk", "base_url": "https://example.test/v1"}},
    )
    built = build_providers(s, FakeClock())
    assert set(built) == {"vast", "lambda"}
    vast, lam = built["vast"], built["lambda"]
    assert isinstance(vast, VastClient) and isinstance(lam, LambdaClient)
    assert vast.name == "vast" and lam.name == "lambda"
    assert vast.api.base_url == "https://console.vast.ai"  # default
    assert lam.api.base_url == "https://example.test/v1"
    assert vast.api.max_retries == 2
    assert lam.ssh_key_name == "gpuwarden-main"
    assert lam.api.pacer.intervals["launch"] == 12.0  # the real limits for real clouds
    await close(built)


async def test_an_enabled_provider_without_a_key_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as exc:
        build_providers(settings(vast={"enabled": True}), FakeClock())
    assert exc.value.problems[0][0] == "providers.vast.api_key"


async def test_the_sim_adds_two_clients_at_its_urls() -> None:
    s = settings(sim={"enabled": True})
    assert build_providers(s, FakeClock()) == {}  # no URLs yet: the sim is not running
    built = build_providers(s, FakeClock(), sim_urls=URLS)
    assert set(built) == {"sim-vast", "sim-lambda"}
    sv, sl = built["sim-vast"], built["sim-lambda"]
    assert isinstance(sv, VastClient) and isinstance(sl, LambdaClient)
    assert sv.name == "sim-vast" and sl.name == "sim-lambda"
    assert sv.api.base_url == URLS.vast
    assert sl.api.base_url == URLS.lambda_
    assert sv.api._http.headers["authorization"] == "Bearer sim-key"
    assert sv.api.pacer.intervals == SIM_PACING == {}
    await close(built)


async def test_the_sim_key_comes_from_settings() -> None:
    built = build_providers(
        settings(sim={"enabled": True, "api_key": "custom"}), FakeClock(), sim_urls=URLS
    )
    sl = built["sim-lambda"]
    assert isinstance(sl, LambdaClient)
    assert sl.api._http.headers["authorization"] == "Bearer custom"
    await close(built)
