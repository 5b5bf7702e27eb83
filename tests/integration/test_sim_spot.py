"""Spot instances on the sim: bids, outbidding (now, or at random with a rate), and what the
ledger bills for an outbid instance, through the real Vast client."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from sim_support import admin, ledger_row, new_key, running_sim, vast_client
from tests.conftest import eventually

from gpuwarden.core.clock import FakeClock
from gpuwarden.providers.base import LaunchSpec, Offer, ProviderState, Requirements
from gpuwarden.providers.vast import VastClient
from gpuwarden.sim.ledger import render

pytestmark = pytest.mark.slow

LABEL = "gpuwarden-spot-"


async def _spot_offer(client: VastClient) -> Offer:
    offers = await client.search_offers(Requirements(interruptible=True))
    spot = [o for o in offers if o.interruptible]
    assert spot, offers
    return spot[0]


async def _rent(client: VastClient, offer: Offer, name: str = "x") -> str:
    _, pub = new_key()
    launched = await client.launch(offer, LaunchSpec(LABEL + name, "img", ssh_public_key=pub))
    return launched.provider_id


async def _state(client: VastClient, pid: str, want: ProviderState) -> None:
    async def check() -> bool:
        seen = await client.get(pid)
        return seen is not None and seen.state is want

    await eventually(check, what=f"{pid} {want}")


async def test_spot_offers_carry_a_minimum_bid_below_the_on_demand_price(tmp_path: Path) -> None:
    async with running_sim(tmp_path) as cloud:
        client = vast_client(cloud)
        try:
            offers = await client.search_offers(Requirements(interruptible=True))
            by_ask = {(o.offer_id, o.interruptible): o for o in offers}
            for (ask, is_spot), o in by_ask.items():
                if not is_spot:
                    continue
                on_demand = by_ask[(ask, False)]
                assert o.min_bid is not None and o.min_bid > 0
                assert o.price_per_hour < on_demand.price_per_hour
                assert o.on_demand_price == on_demand.price_per_hour
            plain = await client.search_offers(Requirements())
            assert plain and not any(o.interruptible for o in plain)
        finally:
            await client.aclose()


async def test_an_outbid_instance_stops_bills_storage_only_and_ends_when_destroyed(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    async with running_sim(tmp_path, clock) as cloud:
        client = vast_client(cloud)
        try:
            offer = await _spot_offer(client)
            bid = round(offer.min_bid * 1.2, 6) if offer.min_bid else 0.0
            pid = await _rent(client, replace(offer, bid=bid))
            await _state(client, pid, ProviderState.RUNNING)
            row = ledger_row(cloud, pid)
            assert row["spot"] is True
            # (storage priced for the disk rented, not the search's default size)
            storage = row["storage_per_hour"]
            assert storage > 0 and row["price_per_hour"] == pytest.approx(bid + storage)
            await clock.advance(60)

            assert (await admin(cloud, "POST", f"/_sim/instances/{pid}/outbid"))["status"] == (
                "stopped"
            )
            seen = await client.get(pid)
            assert seen is not None and seen.state is ProviderState.STOPPED and seen.preempted
            assert {seen.raw[k] for k in ("cur_state", "intended_status", "next_state")} == {
                "stopped"
            }
            assert cloud.sessions(pid) == 0 and not cloud.instance(pid).ssh.listening  # type: ignore[union-attr]

            await clock.advance(3600)  # an hour stopped: storage only
            await client.destroy(pid)
            row = ledger_row(cloud, pid)
            assert row["running"] is False and row["stopped_at"] is not None
            expected = (row["price_per_hour"] * 60 + storage * 3600) / 3600
            assert row["cost"] == pytest.approx(expected, abs=1e-6)
            assert "outbid" in render(cloud.ledger())
        finally:
            await client.aclose()


async def test_only_a_live_spot_instance_can_be_outbid(tmp_path: Path) -> None:
    async with running_sim(tmp_path) as cloud:
        client = vast_client(cloud)
        try:
            on_demand = (await client.search_offers(Requirements()))[0]
            pid = await _rent(client, on_demand)
            async with httpx.AsyncClient(base_url=cloud.urls.admin) as http:  # type: ignore[union-attr]
                refused = await http.post(f"/_sim/instances/{pid}/outbid")
                assert refused.status_code == 409
                bad = await http.post("/_sim/faults", json={"outbid": pid})
                assert bad.status_code == 400 and "not a live spot instance" in bad.text
            assert (await client.get(pid)).state is not ProviderState.STOPPED  # type: ignore[union-attr]
        finally:
            await client.aclose()


async def test_a_bid_under_the_minimum_is_created_stopped(tmp_path: Path) -> None:
    async with running_sim(tmp_path) as cloud:
        client = vast_client(cloud)
        try:
            offer = await _spot_offer(client)
            assert offer.min_bid is not None
            pid = await _rent(client, replace(offer, bid=offer.min_bid / 2))
            seen = await client.get(pid)
            assert seen is not None and seen.preempted
        finally:
            await client.aclose()


async def test_the_outbid_rate_outbids_running_spot_instances_at_random(tmp_path: Path) -> None:
    async with running_sim(tmp_path, faults={"seed": 3}) as cloud:
        client = vast_client(cloud)
        try:
            spot_pid = await _rent(client, await _spot_offer(client), "spot")
            plain_pid = await _rent(client, (await client.search_offers(Requirements()))[0], "od")
            await _state(client, spot_pid, ProviderState.RUNNING)
            await _state(client, plain_pid, ProviderState.RUNNING)
            # Through the fault API, like the other knobs: one outbid a second on average.
            await admin(cloud, "POST", "/_sim/faults", {"vast": {"outbid_rate": 3600}})
            await _state(client, spot_pid, ProviderState.STOPPED)
            assert cloud.core.faults.injected["vast:outbid"] == 1
            plain = await client.get(plain_pid)
            assert plain is not None and plain.state is ProviderState.RUNNING  # never outbid
        finally:
            await client.aclose()
