"""The Lambda Cloud client against respx, with the reference payloads
(tests/fixtures/providers/lambda): endpoints, error codes, statuses, SSH keys, pacing.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import respx
from providers_support import GARBAGE, GARBAGE_IDS, load_fixture
from structlog.testing import capture_logs
from tests.conftest import AutoClock

from gpuwarden.core.clock import FakeClock
from gpuwarden.core.model import Billing
from gpuwarden.providers import lambda_wire
from gpuwarden.providers.base import (
    AuthError,
    InsufficientCredit,
    InvalidRequest,
    LaunchSpec,
    NoCapacity,
    NotFound,
    Offer,
    Provider,
    ProviderError,
    ProviderState,
    RateLimited,
    Requirements,
    Transient,
)
from gpuwarden.providers.http import Backoff
from gpuwarden.providers.lambdacloud import LambdaClient

BASE = "https://cloud.lambda.ai/api/v1"
KEY = "secret_lambda_KEY_0123456789"
PUB = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOurKeyMaterial gpuwarden@host"
IID = "0920582c7ff041399e34823a0be62549"


def load(name: str) -> Any:
    return load_fixture("lambda", name)


ERRORS = load("errors.json")


@pytest.fixture
def router() -> respx.Router:
    return respx.Router(base_url=BASE, assert_all_called=False)


@pytest.fixture
async def client(router: respx.Router, auto_clock: AutoClock) -> AsyncIterator[LambdaClient]:
    c = LambdaClient(
        api_key=KEY,
        clock=auto_clock,
        max_retries=2,
        backoff=Backoff(base=0.5, cap=4.0, rate_limited_base=2.0),
        rng=lambda: 1.0,
        transport=httpx.MockTransport(router.async_handler),
    )
    yield c
    await c.aclose()


def offer(offer_id: str = "gpu_1x_a10@us-east-1") -> Offer:
    return Offer(
        provider="lambda",
        offer_id=offer_id,
        gpu_name="A10 PCIe",
        num_gpus=1,
        gpu_ram_gb=24,
        price_per_hour=0.75,
        region="us-east-1",
        billing=Billing.PER_MINUTE,
    )


SPEC = LaunchSpec(
    label="gpuwarden-main-42",
    image="ignored-on-lambda",
    onstart="echo started > ~/onstart.log",
    env={"GPUWARDEN_INSTANCE": "42 x", "-p 8000:8000": "1"},
    ssh_public_key=PUB,
)


def error_response(case: str, status: int) -> httpx.Response:
    return httpx.Response(status, json=ERRORS[case])


def test_the_client_is_a_provider(client: LambdaClient) -> None:
    assert isinstance(client, Provider)
    assert client.name == "lambda" and client.billing is Billing.PER_MINUTE


# --- search -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1x A10 (24 GB PCIe)", ("A10 PCIe", 24.0)),
        ("A10 (24 GB PCIe)", ("A10 PCIe", 24.0)),
        ("8x Tesla V100 (16 GB)", ("Tesla V100", 16.0)),
        ("H100 (80 GB SXM5)", ("H100 SXM5", 80.0)),
        ("1x GH200 (96 GB)", ("GH200", 96.0)),
        ("N/A", None),
    ],
)
def test_parse_description(text: str, expected: tuple[str, float] | None) -> None:
    assert lambda_wire.parse_description(text) == expected


async def test_search_gives_one_offer_per_type_and_region(
    client: LambdaClient, router: respx.Router
) -> None:
    router.get("/instance-types").mock(
        return_value=httpx.Response(200, json=load("instance-types.response.json"))
    )
    offers = await client.search_offers(Requirements(gpu_name="A10", min_gpu_ram_gb=24))
    ids = [o.offer_id for o in offers]
    assert ids[:2] == ["gpu_1x_a10@us-east-1", "gpu_1x_a10@us-west-1"]
    # "A10" is a model, not a substring of "A100"; sold-out and CPU types never appear.
    assert {o.gpu_name for o in offers} == {"A10 PCIe"}
    assert not any(i.startswith(("gpu_1x_a100", "cpu_")) for i in ids)
    a10 = offers[0]
    assert a10.provider == "lambda" and a10.gpu_name == "A10 PCIe"
    assert a10.gpu_ram_gb == 24.0 and a10.num_gpus == 1
    assert a10.price_per_hour == pytest.approx(0.75)
    assert a10.region == "us-east-1"
    assert a10.billing is Billing.PER_MINUTE
    assert [o.price_per_hour for o in offers] == sorted(o.price_per_hour for o in offers)


async def test_search_filters_price_gpus_and_region(
    client: LambdaClient, router: respx.Router
) -> None:
    router.get("/instance-types").mock(
        return_value=httpx.Response(200, json=load("instance-types.response.json"))
    )
    cheap = await client.search_offers(Requirements(max_price=1.0))
    assert {o.offer_id.split("@")[0] for o in cheap} == {"gpu_1x_a10"}
    eight = await client.search_offers(Requirements(num_gpus=8, region="us-east-1"))
    assert {o.offer_id for o in eight} == {
        "gpu_8x_a100_80gb_sxm4@us-east-1",
        "gpu_8x_a100@us-east-1",
        "gpu_8x_b200_sxm6@us-east-1",
    }
    assert all(o.num_gpus == 8 for o in eight)
    assert await client.search_offers(Requirements(gpu_name="MI300")) == []


# --- launch -------------------------------------------------------------------------------------


async def test_launch_registers_our_key_and_launches(
    client: LambdaClient, router: respx.Router
) -> None:
    router.get("/ssh-keys").mock(
        return_value=httpx.Response(200, json=load("ssh-keys.list.response.json"))
    )
    add = router.post("/ssh-keys").mock(
        return_value=httpx.Response(200, json=load("ssh-keys.add.response.json"))
    )
    launch = router.post("/instance-operations/launch").mock(
        return_value=httpx.Response(200, json=load("launch.response.json"))
    )
    launched = await client.launch(offer(), SPEC)
    assert launched.provider_id == IID and launched.instance_api_key is None
    assert json.loads(add.calls.last.request.content) == {"name": "gpuwarden", "public_key": PUB}
    body = json.loads(launch.calls.last.request.content)
    assert body == {
        "region_name": "us-east-1",
        "instance_type_name": "gpu_1x_a10",
        "ssh_key_names": ["gpuwarden"],
        "name": "gpuwarden-main-42",
        "quantity": 1,
        "user_data": (
            "#!/bin/bash\nexport GPUWARDEN_INSTANCE='42 x'\necho started > ~/onstart.log"
        ),
    }
    await client.launch(offer(), SPEC)
    assert add.call_count == 1 and launch.call_count == 2  # the key is resolved once


async def test_launch_reuses_a_key_registered_under_another_name(
    client: LambdaClient, router: respx.Router
) -> None:
    keys = load("ssh-keys.list.response.json")
    keys["data"][0]["public_key"] = PUB.replace("gpuwarden@host", "other-comment")
    router.get("/ssh-keys").mock(return_value=httpx.Response(200, json=keys))
    add = router.post("/ssh-keys").mock(return_value=httpx.Response(200, json={}))
    launch = router.post("/instance-operations/launch").mock(
        return_value=httpx.Response(200, json=load("launch.response.json"))
    )
    await client.launch(offer(), SPEC)
    assert add.call_count == 0
    assert json.loads(launch.calls.last.request.content)["ssh_key_names"] == ["supervisor-2f9c1a"]


async def test_our_name_holding_another_key_gets_a_suffixed_name(
    client: LambdaClient, router: respx.Router
) -> None:
    keys = load("ssh-keys.list.response.json")
    keys["data"][0]["name"] = "gpuwarden"
    router.get("/ssh-keys").mock(return_value=httpx.Response(200, json=keys))
    add = router.post("/ssh-keys").mock(return_value=httpx.Response(200, json={}))
    launch = router.post("/instance-operations/launch").mock(
        return_value=httpx.Response(200, json=load("launch.response.json"))
    )
    await client.launch(offer(), SPEC)
    material = " ".join(PUB.split()[:2])
    expected = "gpuwarden-" + hashlib.sha256(material.encode()).hexdigest()[:8]
    assert json.loads(add.calls.last.request.content)["name"] == expected
    assert json.loads(launch.calls.last.request.content)["ssh_key_names"] == [expected]


async def test_launches_are_paced_twelve_seconds_apart(
    client: LambdaClient, router: respx.Router, auto_clock: AutoClock
) -> None:
    router.get("/ssh-keys").mock(return_value=httpx.Response(200, json={"data": []}))
    router.post("/ssh-keys").mock(return_value=httpx.Response(200, json={}))
    times: list[float] = []

    def launched(request: httpx.Request) -> httpx.Response:
        times.append(auto_clock.monotonic())
        return httpx.Response(200, json=load("launch.response.json"))

    router.post("/instance-operations/launch").mock(side_effect=launched)
    for _ in range(3):
        await client.launch(offer(), SPEC)
    assert times[1] - times[0] == pytest.approx(12.0)
    assert times[2] - times[1] == pytest.approx(12.0)


async def test_general_requests_are_paced_one_a_second(
    client: LambdaClient, router: respx.Router, auto_clock: AutoClock
) -> None:
    times: list[float] = []

    def listed(request: httpx.Request) -> httpx.Response:
        times.append(auto_clock.monotonic())
        return httpx.Response(200, json={"data": []})

    router.get("/instances").mock(side_effect=listed)
    for _ in range(3):
        await client.list_instances("gpuwarden-")
    assert [b - a for a, b in itertools.pairwise(times)] == [1.0, 1.0]


def test_user_data_forms() -> None:
    assert lambda_wire.user_data("", {"A": "1"}) is None
    assert lambda_wire.user_data("#!/bin/sh\necho hi", {"A": "$(x)"}) == (
        "#!/bin/sh\nexport A='$(x)'\necho hi"
    )
    cfg = "#cloud-config\nruncmd: [ls]"
    assert lambda_wire.user_data(cfg, {"A": "1"}) == cfg
    with pytest.raises(InvalidRequest):
        lambda_wire.user_data("x" * (lambda_wire.USER_DATA_LIMIT + 1), {})


@pytest.mark.parametrize(
    ("case", "status", "expected"),
    [
        ("400 (launch) capacity", 400, NoCapacity),
        ("400 (launch) quota", 400, NoCapacity),
        ("400 (launch/ssh-keys/instances POST) bad params", 400, InvalidRequest),
        ("400 (launch) fs region", 400, InvalidRequest),
        ("400|404 (launch) unknown type/region/key", 404, NoCapacity),
        ("401 (any endpoint)", 401, AuthError),
        ("403 (any endpoint)", 403, AuthError),
        ("403 (launch)", 403, InsufficientCredit),
    ],
)
async def test_launch_errors_map_to_the_taxonomy(
    client: LambdaClient,
    router: respx.Router,
    case: str,
    status: int,
    expected: type[ProviderError],
) -> None:
    router.get("/ssh-keys").mock(return_value=httpx.Response(200, json={"data": []}))
    router.post("/ssh-keys").mock(return_value=httpx.Response(200, json={}))
    launch = router.post("/instance-operations/launch").mock(
        return_value=error_response(case, status)
    )
    with pytest.raises(expected) as exc:
        await client.launch(offer(), SPEC)
    assert type(exc.value) is expected and exc.value.status == status
    assert launch.call_count == 1


async def test_a_launch_that_may_have_run_is_not_repeated(
    client: LambdaClient, router: respx.Router
) -> None:
    router.get("/ssh-keys").mock(return_value=httpx.Response(200, json={"data": []}))
    router.post("/ssh-keys").mock(return_value=httpx.Response(200, json={}))
    launch = router.post("/instance-operations/launch").mock(
        return_value=error_response("500 (generic)", 500)
    )
    with pytest.raises(Transient):
        await client.launch(offer(), SPEC)
    assert launch.call_count == 1


async def test_a_rate_limited_launch_is_retried_to_the_bound(
    client: LambdaClient, router: respx.Router
) -> None:
    router.get("/ssh-keys").mock(return_value=httpx.Response(200, json={"data": []}))
    router.post("/ssh-keys").mock(return_value=httpx.Response(200, json={}))
    launch = router.post("/instance-operations/launch").mock(return_value=httpx.Response(429))
    with pytest.raises(RateLimited):
        await client.launch(offer(), SPEC)
    assert launch.call_count == 3


async def test_a_bad_offer_id_is_refused_before_any_call(
    client: LambdaClient, router: respx.Router
) -> None:
    with pytest.raises(InvalidRequest):
        await client.launch(offer("gpu_1x_a10"), SPEC)
    assert router.calls.call_count == 0


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (500, ERRORS["500 (generic)"], Transient),
        (503, ERRORS["503-ish upstream (status unconfirmed)"], Transient),
        (502, "<html>bad gateway</html>", Transient),
        (429, None, RateLimited),
        (404, ERRORS["404 (GET /instances/{id}, terminate, restart)"], NotFound),
        (400, {"error": {"code": "global/something-new"}}, InvalidRequest),
        (403, {}, AuthError),
        (200, {"data": {}}, None),
    ],
)
def test_classify_table(status: int, body: Any, expected: type[ProviderError] | None) -> None:
    err = lambda_wire.classify(status, body, FakeClock().now())
    assert (type(err) if err else None) is expected


# --- list, get ----------------------------------------------------------------------------------


async def test_list_filters_by_name_and_maps_booting(
    client: LambdaClient, router: respx.Router
) -> None:
    listed = load("instances.list.booting.response.json")
    other = dict(listed["data"][0], id="x" * 32, name="gpuwarden-main-7")
    listed["data"].append(other)
    router.get("/instances").mock(return_value=httpx.Response(200, json=listed))
    found = await client.list_instances("gpuwarden-main-")
    assert [i.provider_id for i in found] == ["x" * 32]
    assert found[0].state is ProviderState.PENDING
    assert found[0].ssh_host is None and found[0].ssh_port is None
    assert len(await client.list_instances("")) == 2


async def test_get_active_instance(client: LambdaClient, router: respx.Router) -> None:
    router.get(f"/instances/{IID}").mock(
        return_value=httpx.Response(200, json=load("instances.get.active.response.json"))
    )
    inst = await client.get(IID)
    assert inst is not None
    assert inst.provider == "lambda" and inst.provider_id == IID
    assert inst.state is ProviderState.RUNNING
    assert (inst.ssh_host, inst.ssh_port, inst.ssh_user) == ("198.51.100.2", 22, "ubuntu")
    assert inst.label == "supervisor-job-7f3a" and inst.region == "us-east-1"
    assert inst.gpu_name == "A10 PCIe" and inst.num_gpus == 1
    assert inst.price_per_hour == pytest.approx(0.75)


async def test_get_honours_the_sim_ssh_port_extension(
    client: LambdaClient, router: respx.Router
) -> None:
    body = load("instances.get.active.response.json")
    body["data"]["ip"] = "127.0.0.1"
    body["data"]["ssh_port"] = 40123
    router.get(f"/instances/{IID}").mock(return_value=httpx.Response(200, json=body))
    inst = await client.get(IID)
    assert inst is not None and (inst.ssh_host, inst.ssh_port) == ("127.0.0.1", 40123)


@pytest.mark.parametrize("response", GARBAGE, ids=GARBAGE_IDS)
async def test_a_garbled_answer_about_an_instance_is_never_gone(
    client: LambdaClient, router: respx.Router, response: httpx.Response
) -> None:
    """Only Lambda's own JSON may say an instance is gone; anything else is retried later."""
    router.get(f"/instances/{IID}").mock(return_value=response)
    with pytest.raises(Transient):
        await client.get(IID)


@pytest.mark.parametrize("response", GARBAGE, ids=GARBAGE_IDS)
async def test_a_garbled_listing_is_not_an_empty_one(
    client: LambdaClient, router: respx.Router, response: httpx.Response
) -> None:
    router.get("/instances").mock(return_value=response)
    with pytest.raises(Transient):
        await client.list_instances("gpuwarden-main-")


async def test_an_html_404_on_destroy_is_not_already_gone(
    client: LambdaClient, router: respx.Router
) -> None:
    router.post("/instance-operations/terminate").mock(
        return_value=httpx.Response(404, text="<html>Not Found</html>")
    )
    with pytest.raises(Transient):
        await client.destroy(IID)


async def test_get_of_a_gone_instance_is_none(client: LambdaClient, router: respx.Router) -> None:
    router.get(f"/instances/{IID}").mock(
        return_value=error_response("404 (GET /instances/{id}, terminate, restart)", 404)
    )
    assert await client.get(IID) is None


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ("booting", ProviderState.PENDING),
        ("active", ProviderState.RUNNING),
        ("unhealthy", ProviderState.STOPPED),
        ("terminating", ProviderState.TERMINATING),
        ("terminated", ProviderState.TERMINATED),
        ("preempted", ProviderState.TERMINATED),
        ("new-status", ProviderState.PENDING),
    ],
)
def test_status_map(status: str, expected: ProviderState) -> None:
    assert lambda_wire.state_of(status) is expected


# --- destroy, account ---------------------------------------------------------------------------


async def test_destroy_terminates(client: LambdaClient, router: respx.Router) -> None:
    route = router.post("/instance-operations/terminate").mock(
        return_value=httpx.Response(200, json=load("terminate.response.json"))
    )
    await client.destroy(IID)
    assert json.loads(route.calls.last.request.content) == load("terminate.request.json")


async def test_destroy_of_a_missing_instance_succeeds(
    client: LambdaClient, router: respx.Router
) -> None:
    route = router.post("/instance-operations/terminate").mock(
        return_value=error_response("404 (GET /instances/{id}, terminate, restart)", 404)
    )
    await client.destroy(IID)
    assert route.call_count == 1


async def test_destroy_retries_provider_unavailable_to_the_bound(
    client: LambdaClient, router: respx.Router
) -> None:
    route = router.post("/instance-operations/terminate").mock(
        return_value=error_response("503-ish upstream (status unconfirmed)", 503)
    )
    with pytest.raises(Transient):
        await client.destroy(IID)
    assert route.call_count == 3


async def test_account_has_no_credit_but_checks_the_key(
    client: LambdaClient, router: respx.Router
) -> None:
    route = router.get("/ssh-keys").mock(
        side_effect=[
            httpx.Response(200, json=load("ssh-keys.list.response.json")),
            error_response("403 (any endpoint)", 403),
        ]
    )
    acct = await client.account()
    assert acct.provider == "lambda" and acct.credit is None
    with pytest.raises(AuthError):
        await client.account()
    assert route.call_count == 2


async def test_no_secret_in_logs_or_errors(client: LambdaClient, router: respx.Router) -> None:
    router.get("/instances").mock(
        side_effect=[httpx.Response(500), error_response("401 (any endpoint)", 401)]
    )
    with capture_logs() as logs, pytest.raises(AuthError) as exc:
        await client.list_instances("x")
    assert [e["event"] for e in logs] == ["provider_retry", "provider_request_failed"]
    assert KEY not in repr(logs) and KEY not in str(exc.value)
