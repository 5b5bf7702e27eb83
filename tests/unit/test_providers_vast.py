"""The Vast.ai client against respx, with the reference payloads (tests/fixtures/providers/vast).

Every endpoint, every documented error mapped to the taxonomy, the state map, paging, and
the created-with-error case. Time is a FakeClock whose sleeps are recorded, never waited.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import respx
from providers_support import GARBAGE, GARBAGE_IDS, load_fixture
from structlog.testing import capture_logs
from tests.conftest import AutoClock

from gpuwarden.core.clock import FakeClock
from gpuwarden.core.model import Billing
from gpuwarden.providers import vast_wire
from gpuwarden.providers.base import (
    AuthError,
    CreatedWithError,
    InsufficientCredit,
    InvalidRequest,
    LaunchSpec,
    NoCapacity,
    Offer,
    Provider,
    ProviderError,
    ProviderState,
    RateLimited,
    Requirements,
    Transient,
)
from gpuwarden.providers.http import Backoff
from gpuwarden.providers.vast import VastClient

BASE = "https://console.vast.ai"
KEY = "vast-SECRET-key-abcdef"
PUB = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOurKeyMaterial gpuwarden@host"


def load(name: str) -> Any:
    return load_fixture("vast", name)


@pytest.fixture
def router() -> respx.Router:
    return respx.Router(base_url=BASE, assert_all_called=False)


@pytest.fixture
async def client(router: respx.Router, auto_clock: AutoClock) -> AsyncIterator[VastClient]:
    c = VastClient(
        api_key=KEY,
        clock=auto_clock,
        max_retries=2,
        backoff=Backoff(base=0.5, cap=4.0, rate_limited_base=1.0),
        rng=lambda: 1.0,
        transport=httpx.MockTransport(router.async_handler),
    )
    yield c
    await c.aclose()


def offer(offer_id: str = "15207788", **raw: Any) -> Offer:
    return Offer(
        provider="vast",
        offer_id=offer_id,
        gpu_name="RTX 4090",
        num_gpus=1,
        gpu_ram_gb=24.0,
        price_per_hour=0.35,
        region="Texas, US",
        raw=raw,
    )


SPEC = LaunchSpec(
    label="gpuwarden-main-42",
    image="pytorch/pytorch:2.4.0-cuda12.4-cudnn9-runtime",
    disk_gb=20.0,
    onstart="touch ~/.no_auto_tmux",
    env={"GPUWARDEN_INSTANCE": "42"},
    ssh_public_key=PUB,
)


def test_the_client_is_a_provider(client: VastClient) -> None:
    assert isinstance(client, Provider)
    assert client.name == "vast" and client.billing is Billing.PER_SECOND


# --- search -------------------------------------------------------------------------------------


async def test_search_sends_real_filters_and_normalises(
    client: VastClient, router: respx.Router
) -> None:
    route = router.post("/api/v0/bundles/").mock(
        return_value=httpx.Response(200, json=load("search-offers.response.json"))
    )
    want = Requirements(
        gpu_name="RTX", min_gpu_ram_gb=22, max_price=0.6, min_reliability=0.98, limit=5
    )
    offers = await client.search_offers(want)
    sent = json.loads(route.calls.last.request.content)
    assert sent["verified"] == {"eq": True}
    assert sent["rentable"] == {"eq": True}
    assert sent["external"] == {"eq": False}
    assert sent["rented"] == {"eq": False}
    assert sent["num_gpus"] == {"eq": 1}
    assert sent["gpu_ram"] == {"gte": 22000}
    assert sent["dph_total"] == {"lte": 0.6}
    assert sent["reliability"] == {"gte": 0.98}
    assert "RTX 4090" in sent["gpu_name"]["in"] and "RTX 3090" in sent["gpu_name"]["in"]
    assert sent["type"] == "on-demand"
    assert sent["order"] == [["dph_total", "asc"]]
    assert sent["limit"] == 5
    assert [o.offer_id for o in offers] == ["14825071", "15207788"]
    cheap = offers[0]
    assert cheap.provider == "vast" and cheap.gpu_name == "RTX 3090"
    assert cheap.gpu_ram_gb == pytest.approx(24576 / 1024)
    assert cheap.price_per_hour == pytest.approx(0.164167)
    assert cheap.region == "Quebec, CA"
    assert cheap.billing is Billing.PER_SECOND
    assert cheap.reliability == pytest.approx(0.9962) and cheap.verified


async def test_search_matches_gpu_region_client_side(
    client: VastClient, router: respx.Router
) -> None:
    router.post("/api/v0/bundles/").mock(
        return_value=httpx.Response(200, json=load("search-offers.response.json"))
    )
    only_4090 = await client.search_offers(Requirements(gpu_name="4090"))
    assert [o.gpu_name for o in only_4090] == ["RTX 4090"]
    in_us = await client.search_offers(Requirements(region="US"))
    assert [o.region for o in in_us] == ["Texas, US"]
    unknown = await client.search_offers(Requirements(gpu_name="MI300"))
    assert unknown == []


async def test_search_for_interruptible_adds_spot_variants_from_min_bid(
    client: VastClient, router: respx.Router
) -> None:
    route = router.post("/api/v0/bundles/").mock(
        return_value=httpx.Response(200, json=load("search-offers.response.json"))
    )
    offers = await client.search_offers(Requirements(interruptible=True, max_price=0.2))
    sent = json.loads(route.calls.last.request.content)
    # One on-demand search: its rows carry min_bid; the price cap applies per variant here.
    assert sent["type"] == "on-demand" and "dph_total" not in sent and "gpu_name" not in sent
    spot = [o for o in offers if o.interruptible]
    on_demand = [o for o in offers if not o.interruptible]
    assert [o.price_per_hour for o in on_demand] == [pytest.approx(0.164167)]
    first = next(o for o in spot if o.offer_id == on_demand[0].offer_id)
    assert first.min_bid == pytest.approx(0.0889)
    assert first.on_demand_price == pytest.approx(0.164167)
    assert first.price_per_hour == pytest.approx(0.0889 + first.storage_per_hour)
    # The RTX 4090 is too dear on demand (0.35) but fits the cap as spot (min bid 0.1667).
    assert {o.gpu_name for o in spot} == {"RTX 3090", "RTX 4090"}
    assert all(o.price_per_hour <= 0.2 for o in offers)


async def test_searches_are_paced_at_ten_a_minute(
    client: VastClient, router: respx.Router, auto_clock: AutoClock
) -> None:
    router.post("/api/v0/bundles/").mock(return_value=httpx.Response(200, json={"offers": []}))
    await client.search_offers(Requirements())
    await client.search_offers(Requirements())
    assert auto_clock.slept == [pytest.approx(6.0)]


# --- launch -------------------------------------------------------------------------------------


async def test_launch_registers_the_key_then_rents(
    client: VastClient, router: respx.Router
) -> None:
    keys = router.get("/api/v0/ssh/").mock(
        return_value=httpx.Response(200, json=load("ssh-keys.list.response.json"))
    )
    add = router.post("/api/v0/ssh/").mock(
        return_value=httpx.Response(200, json=load("ssh-keys.create.response.json"))
    )
    rent = router.put("/api/v0/asks/15207788/").mock(
        return_value=httpx.Response(200, json=load("create-instance.response.json"))
    )
    launched = await client.launch(offer(), SPEC)
    assert launched.provider_id == "27741208"
    assert launched.instance_api_key == "d15a8e0c2b7f4a1c9f3e..."
    assert json.loads(add.calls.last.request.content) == {"ssh_key": PUB}
    body = json.loads(rent.calls.last.request.content)
    assert body == {
        "client_id": "me",
        "image": SPEC.image,
        "disk": 20.0,
        "label": "gpuwarden-main-42",
        "env": {"GPUWARDEN_INSTANCE": "42"},
        "onstart": "touch ~/.no_auto_tmux",
        "runtype": "ssh_direct",
        "cancel_unavail": True,
    }
    # The key is registered once per client: a second launch goes straight to the ask.
    await client.launch(offer(), SPEC)
    assert keys.call_count == 1 and add.call_count == 1 and rent.call_count == 2


async def test_launch_skips_registering_a_key_already_on_the_account(
    client: VastClient, router: respx.Router
) -> None:
    listed = load("ssh-keys.list.response.json")
    listed[0]["key"] = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOurKeyMaterial another-comment"
    router.get("/api/v0/ssh/").mock(return_value=httpx.Response(200, json=listed))
    add = router.post("/api/v0/ssh/").mock(return_value=httpx.Response(200, json={}))
    router.put("/api/v0/asks/15207788/").mock(
        return_value=httpx.Response(200, json=load("create-instance.response.json"))
    )
    await client.launch(offer(), SPEC)
    assert add.call_count == 0


async def test_a_bid_offer_sends_its_price(client: VastClient, router: respx.Router) -> None:
    router.get("/api/v0/ssh/").mock(return_value=httpx.Response(200, json=[]))
    router.post("/api/v0/ssh/").mock(return_value=httpx.Response(200, json={}))
    rent = router.put("/api/v0/asks/9/").mock(
        return_value=httpx.Response(200, json={"success": True, "new_contract": 5})
    )
    spot = replace(offer("9"), interruptible=True, min_bid=0.15, bid=0.2)
    await client.launch(spot, SPEC)
    assert json.loads(rent.calls.last.request.content)["price"] == 0.2
    await client.launch(replace(spot, bid=None), SPEC)  # no bid chosen: the minimum
    assert json.loads(rent.calls.last.request.content)["price"] == 0.15
    with pytest.raises(InvalidRequest):
        await client.launch(replace(spot, bid=None, min_bid=None), SPEC)


async def test_an_error_that_created_an_instance_returns_its_id(
    client: VastClient, router: respx.Router
) -> None:
    router.get("/api/v0/ssh/").mock(return_value=httpx.Response(200, json=[]))
    router.post("/api/v0/ssh/").mock(return_value=httpx.Response(200, json={}))
    rent = router.put("/api/v0/asks/15207788/").mock(
        return_value=httpx.Response(
            400,
            json={
                "success": False,
                "error": "invalid_price",
                "msg": "bid below market",
                "new_contract": 27741299,
            },
        )
    )
    with pytest.raises(CreatedWithError) as exc:
        await client.launch(offer(), SPEC)
    assert exc.value.provider_id == "27741299" and exc.value.may_exist
    assert exc.value.provider == "vast"
    assert rent.call_count == 1


CREATE_ERRORS = load("create-instance.errors.json")


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("400_invalid_args", InvalidRequest),
        ("400_invalid_price", InvalidRequest),
        ("403_not_your_own", NoCapacity),
        ("404_no_such_ask", NoCapacity),
        ("410_gone_cancel_unavail", NoCapacity),
        ("401_bad_key", AuthError),
    ],
)
async def test_launch_errors_map_to_the_taxonomy(
    client: VastClient, router: respx.Router, case: str, expected: type[ProviderError]
) -> None:
    router.get("/api/v0/ssh/").mock(return_value=httpx.Response(200, json=[]))
    router.post("/api/v0/ssh/").mock(return_value=httpx.Response(200, json={}))
    err = CREATE_ERRORS[case]
    rent = router.put("/api/v0/asks/15207788/").mock(
        return_value=httpx.Response(err["status"], json=err["body"])
    )
    with pytest.raises(expected) as exc:
        await client.launch(offer(), SPEC)
    assert type(exc.value) is expected
    assert exc.value.status == err["status"]
    assert rent.call_count == 1  # refusals are never retried


async def test_insufficient_credit_assumed_shape(client: VastClient, router: respx.Router) -> None:
    router.get("/api/v0/ssh/").mock(return_value=httpx.Response(200, json=[]))
    router.post("/api/v0/ssh/").mock(return_value=httpx.Response(200, json={}))
    body = CREATE_ERRORS["UNCONFIRMED_insufficient_credit"]["body"]
    router.put("/api/v0/asks/15207788/").mock(return_value=httpx.Response(400, json=body))
    with pytest.raises(InsufficientCredit):
        await client.launch(offer(), SPEC)


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(429, json=CREATE_ERRORS["429_rate_limited"]["body"]),
        httpx.Response(429, text="API requests too frequent: endpoint threshold=4.5"),
        httpx.Response(
            429, json={"success": False, "error": "rate_limit_exceeded", "msg": "slow down"}
        ),
    ],
)
async def test_launch_rate_limits_are_retried_then_raised(
    client: VastClient, router: respx.Router, auto_clock: AutoClock, response: httpx.Response
) -> None:
    router.get("/api/v0/ssh/").mock(return_value=httpx.Response(200, json=[]))
    router.post("/api/v0/ssh/").mock(return_value=httpx.Response(200, json={}))
    rent = router.put("/api/v0/asks/15207788/").mock(return_value=response)
    with pytest.raises(RateLimited):
        await client.launch(offer(), SPEC)
    assert rent.call_count == 3  # max_retries=2: a 429 was refused, so retrying is safe
    assert [s for s in auto_clock.slept if s >= 1.0] == [1.0, 2.0]  # rate-limit backoff


async def test_a_launch_that_may_have_run_is_not_repeated(
    client: VastClient, router: respx.Router
) -> None:
    router.get("/api/v0/ssh/").mock(return_value=httpx.Response(200, json=[]))
    router.post("/api/v0/ssh/").mock(return_value=httpx.Response(200, json={}))
    rent = router.put("/api/v0/asks/15207788/").mock(return_value=httpx.Response(502))
    with pytest.raises(Transient) as exc:
        await client.launch(offer(), SPEC)
    assert rent.call_count == 1 and exc.value.may_exist


async def test_an_overlong_onstart_is_refused_before_any_call(
    client: VastClient, router: respx.Router
) -> None:
    spec = LaunchSpec(label="l", image="i", onstart="x" * 5000, ssh_public_key=PUB)
    with pytest.raises(InvalidRequest):
        await client.launch(offer(), spec)
    assert router.calls.call_count == 0


# --- list, get ----------------------------------------------------------------------------------


async def test_list_follows_next_token_and_filters_by_label(
    client: VastClient, router: respx.Router
) -> None:
    page = load("list-instances-v1.response.json")
    first = dict(
        page,
        next_token="tok-2",
        instances=[dict(page["instances"][0], id=1, label="gpuwarden-main-1")],
    )
    second = dict(
        page,
        next_token=None,
        instances=[
            dict(page["instances"][0], id=2, label="someone-else"),
            dict(page["instances"][0], id=3, label=None),
            dict(page["instances"][0], id=4, label="gpuwarden-main-4", actual_status="loading"),
        ],
    )
    route = router.get("/api/v1/instances/").mock(
        side_effect=[httpx.Response(200, json=first), httpx.Response(200, json=second)]
    )
    found = await client.list_instances("gpuwarden-main-")
    assert [(i.provider_id, i.state) for i in found] == [
        ("1", ProviderState.RUNNING),
        ("4", ProviderState.PENDING),
    ]
    assert route.call_count == 2
    p1, p2 = (c.request.url.params for c in route.calls)
    assert p1["limit"] == "25" and "after_token" not in p1
    assert json.loads(p1["order_by"]) == [{"col": "id", "dir": "asc"}]
    assert json.loads(p1["select_filters"]) == {}
    assert p2["after_token"] == "tok-2"


async def test_list_stops_on_a_repeated_token(client: VastClient, router: respx.Router) -> None:
    route = router.get("/api/v1/instances/").mock(
        return_value=httpx.Response(200, json={"instances": [], "next_token": "same"})
    )
    assert await client.list_instances("x") == []
    assert route.call_count == 2


async def test_get_running_instance(client: VastClient, router: respx.Router) -> None:
    route = router.get("/api/v0/instances/27741208/").mock(
        return_value=httpx.Response(200, json=load("show-instance.running.response.json"))
    )
    inst = await client.get("27741208")
    assert inst is not None
    assert route.calls.last.request.url.params["owner"] == "me"
    assert inst.provider == "vast" and inst.provider_id == "27741208"
    assert inst.state is ProviderState.RUNNING
    assert (inst.ssh_host, inst.ssh_port, inst.ssh_user) == ("73.215.104.66", 41007, "root")
    assert inst.started_at == datetime.fromtimestamp(1735051310.4127, tz=UTC)
    assert inst.started_at is not None and inst.started_at.tzinfo is not None
    assert inst.gpu_name == "RTX 4090" and inst.num_gpus == 1
    assert inst.label == "supervisor-job-7f3a" and inst.region == "Texas, US"
    assert inst.price_per_hour == pytest.approx(0.3546)


async def test_get_loading_instance_uses_the_ssh_proxy(
    client: VastClient, router: respx.Router
) -> None:
    router.get("/api/v0/instances/27741208/").mock(
        return_value=httpx.Response(200, json=load("show-instance.loading.response.json"))
    )
    inst = await client.get("27741208")
    assert inst is not None and inst.state is ProviderState.PENDING
    assert (inst.ssh_host, inst.ssh_port) == ("ssh5.vast.ai", 31208)


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(200, json=load("show-instance.not-found.response.json")),
        httpx.Response(404, json={"success": False, "error": "no_such_instance", "msg": "gone"}),
    ],
)
async def test_get_of_a_gone_instance_is_none(
    client: VastClient, router: respx.Router, response: httpx.Response
) -> None:
    router.get("/api/v0/instances/99999999/").mock(return_value=response)
    assert await client.get("99999999") is None


@pytest.mark.parametrize("response", GARBAGE, ids=GARBAGE_IDS)
async def test_a_garbled_answer_about_an_instance_is_never_gone(
    client: VastClient, router: respx.Router, response: httpx.Response
) -> None:
    """Only Vast's own JSON may say an instance is gone; anything else is retried later."""
    router.get("/api/v0/instances/27741208/").mock(return_value=response)
    with pytest.raises(Transient):
        await client.get("27741208")


@pytest.mark.parametrize("response", GARBAGE, ids=GARBAGE_IDS)
async def test_a_garbled_listing_is_not_an_empty_one(
    client: VastClient, router: respx.Router, response: httpx.Response
) -> None:
    router.get("/api/v1/instances/").mock(return_value=response)
    with pytest.raises(Transient):
        await client.list_instances("gpuwarden-main-")


async def test_an_html_404_on_destroy_is_not_already_gone(
    client: VastClient, router: respx.Router
) -> None:
    router.delete("/api/v0/instances/27741208/").mock(
        return_value=httpx.Response(404, text="<html>Not Found</html>")
    )
    with pytest.raises(Transient):
        await client.destroy("27741208")


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"actual_status": None}, ProviderState.PENDING),
        ({"actual_status": "created"}, ProviderState.PENDING),
        ({"actual_status": "loading"}, ProviderState.PENDING),
        ({"actual_status": "running"}, ProviderState.RUNNING),
        ({"actual_status": "stopped"}, ProviderState.STOPPED),
        ({"actual_status": "exited"}, ProviderState.STOPPED),
        ({"actual_status": "frozen"}, ProviderState.STOPPED),
        ({"actual_status": "unknown"}, ProviderState.STOPPED),
        ({"actual_status": "offline"}, ProviderState.STOPPED),
        ({"actual_status": "rebooting"}, ProviderState.PENDING),
        (
            {"actual_status": "created", "status_msg": "Error: OCI runtime create failed: x"},
            ProviderState.STOPPED,
        ),
        (
            {"actual_status": "created", "cur_state": "stopped", "intended_status": "stopped"},
            ProviderState.STOPPED,
        ),
        ({"actual_status": "destroying", "cur_state": "unloaded"}, ProviderState.TERMINATING),
        ({"actual_status": "something-new"}, ProviderState.PENDING),
    ],
)
def test_status_map(fields: dict[str, Any], expected: ProviderState) -> None:
    assert vast_wire.state_of(fields) is expected


def test_ssh_endpoint_prefers_the_direct_port() -> None:
    raw = {"public_ipaddr": " 1.2.3.4\n", "ports": {"22/tcp": [{"HostPort": "40022"}]}}
    assert vast_wire.ssh_endpoint(raw) == ("1.2.3.4", 40022)
    assert vast_wire.ssh_endpoint({"ssh_host": "ssh1.vast.ai", "ssh_port": 2222}) == (
        "ssh1.vast.ai",
        2222,
    )
    assert vast_wire.ssh_endpoint({"ports": None}) == (None, None)


# --- destroy, account ---------------------------------------------------------------------------


async def test_destroy(client: VastClient, router: respx.Router) -> None:
    route = router.delete("/api/v0/instances/27741208/").mock(
        return_value=httpx.Response(200, json=load("destroy-instance.response.json"))
    )
    await client.destroy("27741208")
    assert route.call_count == 1
    assert json.loads(route.calls.last.request.content) == {}


@pytest.mark.parametrize("status", [200, 404])
async def test_destroy_of_a_missing_instance_succeeds(
    client: VastClient, router: respx.Router, status: int
) -> None:
    router.delete("/api/v0/instances/99999999/").mock(
        return_value=httpx.Response(status, json=load("destroy-instance.not-found.response.json"))
    )
    await client.destroy("99999999")  # no exception: already gone is success


async def test_destroy_retries_server_errors_to_the_bound(
    client: VastClient, router: respx.Router, auto_clock: AutoClock
) -> None:
    route = router.delete("/api/v0/instances/1/").mock(return_value=httpx.Response(503))
    with pytest.raises(Transient):
        await client.destroy("1")
    assert route.call_count == 3
    assert [s for s in auto_clock.slept if s >= 0.5] == [0.5, 1.0]


async def test_account_reads_credit(client: VastClient, router: respx.Router) -> None:
    router.get("/api/v0/users/current").mock(
        return_value=httpx.Response(200, json=load("users-current.response.json"))
    )
    acct = await client.account()
    assert acct.provider == "vast" and acct.credit == pytest.approx(24.73)
    assert acct.email == "ops@example.com"


async def test_a_bad_key_is_an_auth_error_and_not_retried(
    client: VastClient, router: respx.Router
) -> None:
    route = router.get("/api/v0/users/current").mock(
        return_value=httpx.Response(401, json=CREATE_ERRORS["401_bad_key"]["body"])
    )
    with pytest.raises(AuthError):
        await client.account()
    assert route.call_count == 1


async def test_search_404_invalid_user_key_quirk_is_an_auth_error(
    client: VastClient, router: respx.Router
) -> None:
    router.post("/api/v0/bundles/").mock(
        return_value=httpx.Response(404, json={"error": "auth_error", "msg": "Invalid user key"})
    )
    with pytest.raises(AuthError):
        await client.search_offers(Requirements())


async def test_daily_search_quota_is_not_waited_out(
    client: VastClient, router: respx.Router, auto_clock: AutoClock
) -> None:
    route = router.post("/api/v0/bundles/").mock(
        return_value=httpx.Response(
            429, json={"success": False, "error": "search_quota_exceeded", "msg": "quota"}
        )
    )
    with pytest.raises(RateLimited) as exc:
        await client.search_offers(Requirements())
    assert route.call_count == 1
    # FakeClock starts at midnight UTC: the quota resets a full day later.
    assert exc.value.retry_after == pytest.approx(86400)


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (500, "Internal Server Error", Transient),
        (503, {"detail": "unavailable"}, Transient),
        (402, {"msg": "pay"}, InsufficientCredit),
        (411, {"success": False, "msg": "Insufficient credit"}, InsufficientCredit),
        (400, {"success": False, "error": "invalid_args", "msg": "no"}, InvalidRequest),
        (403, {"success": False, "error": "forbidden", "msg": "no"}, AuthError),
        (200, {"success": True}, None),
        (200, [], None),
    ],
)
def test_classify_table(status: int, body: Any, expected: type[ProviderError] | None) -> None:
    err = vast_wire.classify(status, body, FakeClock().now())
    assert (type(err) if err else None) is expected


async def test_no_secret_in_logs_or_errors(client: VastClient, router: respx.Router) -> None:
    router.get("/api/v0/users/current").mock(
        side_effect=[httpx.Response(502), httpx.Response(401, json={"msg": "Invalid user key"})]
    )
    with capture_logs() as logs, pytest.raises(AuthError) as exc:
        await client.account()
    assert logs and all(e["provider"] == "vast" for e in logs)
    assert KEY not in repr(logs) and KEY not in str(exc.value)


@pytest.mark.parametrize(
    ("fields", "preempted"),
    [
        ({"is_bid": True, "cur_state": "stopped", "intended_status": "stopped",
          "next_state": "stopped", "actual_status": "stopped"}, True),
        ({"is_bid": True, "cur_state": "stopped", "intended_status": "running",
          "next_state": "stopped", "actual_status": "stopped"}, False),  # being stopped by us
        ({"is_bid": False, "cur_state": "stopped", "intended_status": "stopped",
          "next_state": "stopped", "actual_status": "stopped"}, False),  # on-demand: not a bid
        ({"is_bid": True, "cur_state": "running", "intended_status": "running",
          "next_state": "running", "actual_status": "running"}, False),
    ],
)  # fmt: skip
def test_an_outbid_spot_instance_reads_as_preempted(
    fields: dict[str, Any], preempted: bool
) -> None:
    seen = vast_wire.to_instance({"id": 7, "label": "gpuwarden-main-1", **fields}, "vast")
    assert seen.preempted is preempted
