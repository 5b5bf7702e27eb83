"""Offers across the enabled providers: the requirements a search asks for, and the search
itself (cheapest first, with a warning for each provider whose search failed), for the
`offers` and `launch` handlers in instances.py."""

from __future__ import annotations

import asyncio
from typing import Any

from gpuwarden.core import errors
from gpuwarden.fleet.app import App
from gpuwarden.providers.base import Offer, Requirements


def requirements_for(
    app: App,
    *,
    requirements: Requirements | None,
    gpu: str | None,
    gpu_ram_gb: float | None,
    max_price: float | None,
    limit: int,
) -> Requirements:
    if requirements is not None:
        return requirements
    jobs = app.settings.jobs
    cap = app.settings.budget.max_hourly_price
    price = max_price if cap is None or max_price is None else min(max_price, cap)
    return Requirements(
        gpu_name=gpu,
        min_gpu_ram_gb=jobs.gpu_ram_gb if gpu_ram_gb is None else gpu_ram_gb,
        max_price=cap if price is None else price,
        min_reliability=jobs.min_reliability,
        limit=limit,
        disk_gb=jobs.disk_gb,  # what launcher.launch asks for
    )


def providers_for(app: App, provider: str | None) -> dict[str, Any]:
    if provider is None:
        return dict(app.providers)
    if provider not in app.providers:
        known = ", ".join(sorted(app.providers)) or "none"
        raise errors.ProviderUnavailable(
            f"provider {provider!r} is not enabled (enabled: {known})", provider=provider
        )
    return {provider: app.providers[provider]}


async def search(
    app: App, provider: str | None, want: Requirements
) -> tuple[list[Offer], list[str]]:
    """Offers from every chosen provider, cheapest first, and a warning for each provider
    that failed (rate-limited, down): its offers are missing, and the caller must say so,
    or the cheapest "match" may be the dearer GPU. If all fail, ProviderUnavailable."""
    chosen = providers_for(app, provider)
    results = await asyncio.gather(
        *(p.search_offers(want) for p in chosen.values()), return_exceptions=True
    )
    found: list[Offer] = []
    failures: list[str] = []
    for name, res in zip(chosen, results, strict=True):
        if isinstance(res, asyncio.CancelledError):
            raise res
        if isinstance(res, BaseException):
            failures.append(f"{name}: {res}")
        else:
            found.extend(res)
    if failures and not found and len(failures) == len(chosen):
        raise errors.ProviderUnavailable("offer search failed: " + "; ".join(failures))
    cheapest = sorted(found, key=lambda o: (o.price_per_hour, o.provider, o.offer_id))
    return cheapest, [f"no offers from {f} (its search failed)" for f in failures]


def offer_dict(o: Offer) -> dict[str, Any]:
    return {
        "provider": o.provider,
        "offer_id": o.offer_id,
        "gpu": o.gpu_name,
        "num_gpus": o.num_gpus,
        "gpu_ram_gb": o.gpu_ram_gb,
        "price_per_hour": o.price_per_hour,
        "region": o.region,
        "reliability": o.reliability,
        "verified": o.verified,
        "billing": o.billing.value,
    }
