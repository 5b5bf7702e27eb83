"""Both real provider clients against the sim over loopback HTTP and real SSH: search,
launch, wait until SSH answers, destroy, destroy again, and the ledger's billed time
(the sim's ledger runs on a FakeClock, so billing is checked exactly without waiting)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sim_support import lambda_client, ledger_row, new_key, running_sim, ssh_run, vast_client
from tests.conftest import eventually

from gpuwarden.core.clock import FakeClock
from gpuwarden.providers.base import LaunchSpec, ProviderInstance, ProviderState, Requirements

pytestmark = pytest.mark.slow

LABEL = "gpuwarden-simtest-"


async def test_vast_client_full_cycle(tmp_path: Path) -> None:
    clock = FakeClock()
    async with running_sim(tmp_path, clock) as cloud:
        client = vast_client(cloud)
        try:
            key, pub = new_key()
            want = Requirements(gpu_name="4090", min_gpu_ram_gb=20, max_price=0.5)
            offers = await client.search_offers(want)
            assert offers, "the catalog has RTX 4090 offers under $0.50/h"
            assert all("4090" in o.gpu_name and o.price_per_hour <= 0.5 for o in offers)
            assert [o.price_per_hour for o in offers] == sorted(o.price_per_hour for o in offers)
            assert all(o.gpu_ram_gb >= 20 for o in offers)

            spec = LaunchSpec(
                label=LABEL + "v1", image="pytorch/pytorch", disk_gb=20, ssh_public_key=pub
            )
            launched = await client.launch(offers[0], spec)
            pid = launched.provider_id
            assert launched.instance_api_key

            first = await client.get(pid)
            assert first is not None and first.state is ProviderState.PENDING
            assert first.ssh_port is None  # no port before the instance runs

            async def running() -> ProviderInstance | None:
                inst = await client.get(pid)
                return inst if inst and inst.state is ProviderState.RUNNING else None

            inst = await eventually(running)
            assert inst.ssh_host == "127.0.0.1" and inst.ssh_port
            result = await ssh_run(inst.ssh_host, inst.ssh_port, key, "echo ok")
            assert result.stdout == "ok\n" and result.exit_status == 0

            listed = await client.list_instances(LABEL)
            assert [i.provider_id for i in listed] == [pid]
            assert (await client.account()).credit is not None

            await clock.advance(125.4)
            await client.destroy(pid)
            await client.destroy(pid)  # again: "no such instance" is success
            assert await client.get(pid) is None
            assert await client.list_instances(LABEL) == []

            row = ledger_row(cloud, pid)
            assert row["billed_seconds"] == 126  # per second, each started second
            assert row["ended_by"] == "api:account"
            assert row["price_per_hour"] == pytest.approx(inst.price_per_hour)
            assert row["cost"] == pytest.approx(inst.price_per_hour * 126 / 3600, abs=1e-6)
            with pytest.raises(OSError):
                await ssh_run("127.0.0.1", inst.ssh_port, key, "echo ok")
        finally:
            await client.aclose()


async def test_lambda_client_full_cycle(tmp_path: Path) -> None:
    clock = FakeClock()
    async with running_sim(tmp_path, clock) as cloud:
        client = lambda_client(cloud)
        try:
            key, pub = new_key()
            offers = await client.search_offers(Requirements(max_price=1.0))
            assert offers and all(o.price_per_hour <= 1.0 for o in offers)
            offer = offers[0]

            spec = LaunchSpec(label=LABEL + "l1", image="ignored", ssh_public_key=pub)
            launched = await client.launch(offer, spec)
            pid = launched.provider_id
            first = await client.get(pid)
            assert first is not None and first.state is ProviderState.PENDING

            async def running() -> ProviderInstance | None:
                inst = await client.get(pid)
                return inst if inst and inst.state is ProviderState.RUNNING else None

            inst = await eventually(running)
            assert inst.ssh_user == "ubuntu"
            result = await ssh_run(inst.ssh_host or "", inst.ssh_port or 0, key, "echo ok")
            assert result.stdout == "ok\n"
            assert [i.provider_id for i in await client.list_instances(LABEL)] == [pid]

            await clock.advance(125.4)
            await client.destroy(pid)
            await client.destroy(pid)  # terminating already: still success

            async def terminated() -> bool:
                gone = await client.get(pid)
                return gone is None or gone.state is ProviderState.TERMINATED

            await eventually(terminated)
            assert await client.list_instances(LABEL) == []

            row = ledger_row(cloud, pid)
            assert row["billed_seconds"] == 180  # per minute, each started minute
            assert row["price_per_hour"] == pytest.approx(offer.price_per_hour)
            assert row["cost"] == pytest.approx(offer.price_per_hour * 180 / 3600, abs=1e-6)
            assert row["ended_by"] == "api:account"
        finally:
            await client.aclose()


async def test_a_running_instance_shows_as_a_leak_in_the_ledger(tmp_path: Path) -> None:
    clock = FakeClock()
    async with running_sim(tmp_path, clock) as cloud:
        client = vast_client(cloud)
        try:
            _, pub = new_key()
            offer = (await client.search_offers(Requirements(gpu_name="3090")))[0]
            launched = await client.launch(
                offer, LaunchSpec(LABEL + "leak", "img", ssh_public_key=pub)
            )
            await clock.advance(3600)
        finally:
            await client.aclose()
    row = ledger_row(cloud, launched.provider_id)
    assert row["running"] is True and row["ended_by"] is None
    assert row["billed_seconds"] == 3600
    assert cloud.ledger()["running"] == 1


async def test_a_vast_offer_is_priced_with_the_disk_the_rental_asks_for(tmp_path: Path) -> None:
    """Vast bills storage per GB: the price an offer quotes, which the daemon records and
    budgets with, is the price the ledger bills for the disk we rent (issue 17, item 10)."""
    async with running_sim(tmp_path, FakeClock()) as cloud:
        client = vast_client(cloud)
        try:
            _, pub = new_key()
            default = await client.search_offers(Requirements(gpu_name="4090", limit=1))
            [offer] = await client.search_offers(Requirements(gpu_name="4090", limit=1, disk_gb=60))
            assert offer.offer_id == default[0].offer_id
            assert offer.price_per_hour > default[0].price_per_hour  # 60 GB, not 8 GB
            spec = LaunchSpec(label=LABEL + "disk", image="img", disk_gb=60, ssh_public_key=pub)
            launched = await client.launch(offer, spec)
            billed = ledger_row(cloud, launched.provider_id)["price_per_hour"]
            assert billed == pytest.approx(offer.price_per_hour, abs=1e-6)
        finally:
            await client.aclose()
