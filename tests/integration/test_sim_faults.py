"""Each fault knob of the sim, and how the real clients behave under it."""

from __future__ import annotations

import time
from pathlib import Path

import asyncssh
import pytest
from sim_support import admin, lambda_client, ledger_row, new_key, running_sim, ssh_run, vast_client
from tests.conftest import eventually

from gpuwarden.core.clock import FakeClock
from gpuwarden.providers.base import (
    AuthError,
    CreatedWithError,
    InsufficientCredit,
    LaunchSpec,
    Offer,
    ProviderInstance,
    ProviderState,
    RateLimited,
    Requirements,
    Transient,
)
from gpuwarden.providers.lambdacloud import LambdaClient
from gpuwarden.providers.vast import VastClient
from gpuwarden.sim import SimCloud

pytestmark = pytest.mark.slow

LABEL = "gpuwarden-faults-"


async def _offer(client: VastClient | LambdaClient) -> Offer:
    # The cheapest: each search leaves out the asks already rented.
    return (await client.search_offers(Requirements()))[0]


async def _launch(client: VastClient | LambdaClient, pub: str, name: str = "x") -> str:
    launched = await client.launch(
        await _offer(client), LaunchSpec(LABEL + name, "img", ssh_public_key=pub)
    )
    return launched.provider_id


async def _running(client: VastClient | LambdaClient, pid: str) -> ProviderInstance:
    async def check() -> ProviderInstance | None:
        inst = await client.get(pid)
        return inst if inst and inst.state is ProviderState.RUNNING else None

    result: ProviderInstance = await eventually(check)
    return result


def _injected(cloud: SimCloud, what: str) -> int:
    return cloud.core.faults.injected[what]


# --- 5xx and 429 -----------------------------------------------------------------------------


async def test_5xx_is_retried_until_it_succeeds(tmp_path: Path) -> None:
    async with running_sim(tmp_path, faults={"rate_5xx": 0.5, "seed": 7}) as cloud:
        client = vast_client(cloud, max_retries=10)
        try:
            for _ in range(10):
                account = await client.account()
                assert account.credit == pytest.approx(100.0)
        finally:
            await client.aclose()
        assert _injected(cloud, "vast:5xx") > 0  # some calls failed, and every call succeeded


async def test_5xx_raises_transient_after_the_retry_bound(tmp_path: Path) -> None:
    async with running_sim(tmp_path, faults={"rate_5xx": 1.0}) as cloud:
        for client in (vast_client(cloud, max_retries=2), lambda_client(cloud, max_retries=2)):
            try:
                with pytest.raises(Transient) as info:
                    await client.search_offers(Requirements())
                assert info.value.status in (500, 502, 503)
            finally:
                await client.aclose()
        assert _injected(cloud, "vast:5xx") == 3  # one try and two retries
        assert _injected(cloud, "lambda:5xx") == 3


async def test_429_is_rate_limited_and_retried(tmp_path: Path) -> None:
    async with running_sim(tmp_path, faults={"rate_429": 1.0}) as cloud:
        client = lambda_client(cloud, max_retries=1)
        try:
            with pytest.raises(RateLimited):
                await client.search_offers(Requirements())
            assert _injected(cloud, "lambda:429") == 2
            await admin(cloud, "POST", "/_sim/faults", {"rate_429": 0.5, "seed": 3})
            retrying = lambda_client(cloud, max_retries=10)
            try:
                for _ in range(8):
                    assert await retrying.search_offers(Requirements())
            finally:
                await retrying.aclose()
            assert _injected(cloud, "lambda:429") > 2
        finally:
            await client.aclose()


async def test_latency_delays_every_answer(tmp_path: Path) -> None:
    async with running_sim(tmp_path, faults={"latency": "0.3s"}) as cloud:
        client = vast_client(cloud)
        try:
            started = time.monotonic()
            await client.account()
            assert time.monotonic() - started >= 0.3
        finally:
            await client.aclose()


# --- launch that errs but creates ------------------------------------------------------------


async def test_vast_create_error_with_new_contract(tmp_path: Path) -> None:
    async with running_sim(tmp_path, faults={"create_error_exists": 1}) as cloud:
        client = vast_client(cloud)
        try:
            _, pub = new_key()
            with pytest.raises(CreatedWithError) as info:
                await _launch(client, pub)
            pid = info.value.provider_id
            assert ledger_row(cloud, pid)["running"] is True  # it exists and bills
            assert await client.get(pid) is not None
            await client.destroy(pid)
            assert ledger_row(cloud, pid)["running"] is False
            # The knob was used up: the next launch succeeds.
            assert await _launch(client, pub, "y")
        finally:
            await client.aclose()


async def test_lambda_launch_500_after_creating(tmp_path: Path) -> None:
    async with running_sim(tmp_path, faults={"create_error_exists": 1}) as cloud:
        client = lambda_client(cloud)
        try:
            _, pub = new_key()
            with pytest.raises(Transient) as info:
                await _launch(client, pub, "l")
            assert info.value.may_exist and info.value.status == 500
            assert _injected(cloud, "lambda:create_error_exists") == 1  # not retried
            found = await client.list_instances(LABEL + "l")
            assert len(found) == 1  # the reconciler finds it by its label
            assert ledger_row(cloud, found[0].provider_id)["running"] is True
        finally:
            await client.aclose()


# --- listing lag -----------------------------------------------------------------------------


@pytest.mark.parametrize("make", [vast_client, lambda_client])
async def test_listing_lag(tmp_path: Path, make: object) -> None:
    clock = FakeClock()
    async with running_sim(tmp_path, clock, faults={"list_lag": "30s"}) as cloud:
        client = make(cloud)  # type: ignore[operator]
        try:
            _, pub = new_key()
            pid = await _launch(client, pub)
            assert await client.list_instances(LABEL) == []  # too new to be listed
            assert await client.get(pid) is not None  # but it exists
            await clock.advance(31)
            assert [i.provider_id for i in await client.list_instances(LABEL)] == [pid]
            await client.destroy(pid)
            assert [i.provider_id for i in await client.list_instances(LABEL)] == [pid]
            await clock.advance(31)

            async def unlisted() -> bool:  # Lambda: also once "terminating" has passed
                listed: list[ProviderInstance] = await client.list_instances(LABEL)
                return listed == []

            await eventually(unlisted)
        finally:
            await client.aclose()


# --- destroy that does nothing ---------------------------------------------------------------


@pytest.mark.parametrize("make", [vast_client, lambda_client])
async def test_destroy_does_nothing_once(tmp_path: Path, make: object) -> None:
    async with running_sim(tmp_path, faults={"destroy_noop": 1}) as cloud:
        client = make(cloud)  # type: ignore[operator]
        try:
            _, pub = new_key()
            pid = await _launch(client, pub)
            await _running(client, pid)
            await client.destroy(pid)  # answered success ...
            still = await client.get(pid)
            assert still is not None and still.state is ProviderState.RUNNING  # ... did nothing
            assert ledger_row(cloud, pid)["running"] is True
            await client.destroy(pid)
            assert ledger_row(cloud, pid)["running"] is False
        finally:
            await client.aclose()


# --- credit ----------------------------------------------------------------------------------


async def test_billing_draws_credit_down_to_insufficient_credit(tmp_path: Path) -> None:
    clock = FakeClock()
    async with running_sim(tmp_path, clock, credit=1.0) as cloud:
        client = vast_client(cloud)
        try:
            _, pub = new_key()
            pid = await _launch(client, pub)
            price = (await client.get(pid) or pytest.fail("gone")).price_per_hour
            await clock.advance(3600 / price + 60)  # more than $1 worth of time
            assert ((await client.account()).credit or 0) < 0
            with pytest.raises(InsufficientCredit):
                await _launch(client, pub, "y")
            assert ledger_row(cloud, pid)["running"] is True  # not ended: knob is off
        finally:
            await client.aclose()


async def test_zero_credit_refuses_launches(tmp_path: Path) -> None:
    async with running_sim(tmp_path) as cloud:
        await admin(cloud, "POST", "/_sim/faults", {"credit": 0})
        vast, lam = vast_client(cloud), lambda_client(cloud)
        try:
            _, pub = new_key()
            assert (await vast.account()).credit == 0
            with pytest.raises(InsufficientCredit):
                await _launch(vast, pub)
            # Lambda answers 403 global/account-inactive; the Lambda client maps that code to
            # AuthError (the key is unusable until the account is fixed).
            with pytest.raises(AuthError) as info:
                await _launch(lam, pub)
            assert info.value.status == 403
        finally:
            await vast.aclose()
            await lam.aclose()
        assert cloud.ledger()["instances"] == []


async def test_zero_credit_can_end_running_instances(tmp_path: Path) -> None:
    async with running_sim(tmp_path, faults={"end_on_zero_credit": True}) as cloud:
        client = vast_client(cloud)
        try:
            _, pub = new_key()
            pid = await _launch(client, pub)
            await admin(cloud, "POST", "/_sim/faults", {"credit": {"vast": 0}})
            assert await client.get(pid) is None  # the next call ended it
            assert ledger_row(cloud, pid)["ended_by"] == "credit"
        finally:
            await client.aclose()


# --- the machine itself ----------------------------------------------------------------------


@pytest.mark.parametrize("make", [vast_client, lambda_client])
async def test_kill_ssh_refuses_connections_while_the_api_says_running(
    tmp_path: Path, make: object
) -> None:
    async with running_sim(tmp_path) as cloud:
        client = make(cloud)  # type: ignore[operator]
        try:
            key, pub = new_key()
            pid = await _launch(client, pub)
            inst = await _running(client, pid)
            assert inst.ssh_port
            assert (await ssh_run("127.0.0.1", inst.ssh_port, key, "echo ok")).stdout == "ok\n"
            await admin(cloud, "POST", f"/_sim/instances/{pid}/kill-ssh")
            with pytest.raises(ConnectionRefusedError):
                await ssh_run("127.0.0.1", inst.ssh_port, key, "echo ok")
            again = await client.get(pid)
            assert again is not None and again.state is ProviderState.RUNNING
            assert again.ssh_port == inst.ssh_port
        finally:
            await client.aclose()


@pytest.mark.parametrize("make", [vast_client, lambda_client])
async def test_ended_from_outside(tmp_path: Path, make: object) -> None:
    async with running_sim(tmp_path) as cloud:
        client = make(cloud)  # type: ignore[operator]
        try:
            key, pub = new_key()
            pid = await _launch(client, pub)
            inst = await _running(client, pid)
            await admin(cloud, "POST", f"/_sim/instances/{pid}/end")
            gone = await client.get(pid)
            assert gone is None or gone.state is ProviderState.TERMINATED
            assert await client.list_instances(LABEL) == []
            row = ledger_row(cloud, pid)
            assert row["ended_by"] == "outside" and row["running"] is False
            with pytest.raises((OSError, asyncssh.Error)):
                await ssh_run("127.0.0.1", inst.ssh_port or 0, key, "echo ok")
            await client.destroy(pid)  # destroying what is gone is success
        finally:
            await client.aclose()
