"""The shared provider HTTP machinery: backoff, retry-after, pacing, retry bounds, secrets.

Time is a FakeClock throughout: nothing here waits on the wall clock.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest
import respx
from structlog.testing import capture_logs
from tests.conftest import AutoClock

from gpuwarden.core.clock import FakeClock, settle
from gpuwarden.providers.base import (
    InvalidRequest,
    ProviderError,
    RateLimited,
    Transient,
)
from gpuwarden.providers.http import (
    ApiClient,
    Backoff,
    Pacer,
    backoff_delay,
    parse_retry_after,
)

BASE = "https://api.test/v1"
KEY = "sk-test-SECRET-0123456789"


def classify(status: int, body: Any, now: Any) -> ProviderError | None:
    if status < 400:
        return None
    if status == 429:
        return RateLimited("slow down")
    if status >= 500:
        return Transient("server")
    return InvalidRequest("bad")


def make(
    clock: FakeClock,
    router: respx.Router,
    *,
    max_retries: int = 3,
    pacing: dict[str, float] | None = None,
    backoff: Backoff | None = None,
) -> ApiClient:
    return ApiClient(
        provider="test",
        base_url=BASE,
        api_key=KEY,
        clock=clock,
        classify=classify,
        max_retries=max_retries,
        pacing=pacing or {},
        backoff=backoff or Backoff(base=0.5, cap=4.0, rate_limited_base=2.0, max_retry_after=60),
        rng=lambda: 1.0,
        transport=httpx.MockTransport(router.async_handler),
    )


@pytest.fixture
def router() -> respx.Router:
    return respx.Router(base_url=BASE, assert_all_called=False)


# --- pure parts ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "rnd", "expected"),
    [
        (0, 1.0, 0.5),
        (1, 1.0, 1.0),
        (2, 1.0, 2.0),
        (3, 1.0, 4.0),
        (6, 1.0, 4.0),
        (3, 0.25, 1.0),
        (0, 0.0, 0.0),
    ],
)
def test_backoff_is_exponential_capped_and_jittered(
    attempt: int, rnd: float, expected: float
) -> None:
    assert backoff_delay(attempt, rnd, base=0.5, cap=4.0) == pytest.approx(expected)


def test_retry_after_reads_seconds_and_http_dates() -> None:
    now = FakeClock().now()
    assert parse_retry_after("7", now) == 7.0
    assert parse_retry_after(" 1.5 ", now) == 1.5
    assert parse_retry_after("-3", now) == 0.0
    assert parse_retry_after(format_datetime(now + timedelta(seconds=30), usegmt=True), now) == 30
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after(None, now) is None


async def test_pacer_reserves_slots_per_class() -> None:
    clock = FakeClock()
    pacer = Pacer(clock, {"general": 1.0, "launch": 12.0})
    assert pacer.reserve(["general", "launch"]) == 0.0
    assert pacer.reserve(["general"]) == 1.0
    assert pacer.reserve(["general", "launch"]) == 12.0  # launch's slot dominates
    assert pacer.reserve(["general"]) == 13.0
    assert pacer.reserve(["other"]) == 0.0  # unpaced class


# --- pacing holds, on a stepped clock -----------------------------------------------------------


async def test_pacing_holds_calls_until_the_clock_moves(router: respx.Router) -> None:
    clock = FakeClock()
    route = router.get("/x").mock(return_value=httpx.Response(200, json={"ok": True}))
    api = make(clock, router, pacing={"general": 1.0})
    tasks = [asyncio.create_task(api.request("GET", "/x")) for _ in range(3)]
    await settle()
    assert route.call_count == 1
    await clock.advance(0.99)
    assert route.call_count == 1
    await clock.advance(0.01)
    assert route.call_count == 2
    await clock.advance(1.0)
    assert route.call_count == 3
    results = await asyncio.gather(*tasks)
    assert all(r.body == {"ok": True} for r in results)
    await api.aclose()


async def test_launch_class_paces_twelve_seconds(router: respx.Router) -> None:
    clock = FakeClock()
    route = router.post("/launch").mock(return_value=httpx.Response(200, json={}))
    api = make(clock, router, pacing={"general": 1.0, "launch": 12.0})
    first = asyncio.create_task(api.request("POST", "/launch", pace=("general", "launch")))
    second = asyncio.create_task(api.request("POST", "/launch", pace=("general", "launch")))
    await settle()
    assert first.done() and route.call_count == 1
    await clock.advance(11.9)
    assert route.call_count == 1 and not second.done()
    await clock.advance(0.1)
    await asyncio.wait_for(second, 5)
    assert route.call_count == 2
    await api.aclose()


# --- retries ------------------------------------------------------------------------------------


async def test_transient_retries_stop_at_the_bound(router: respx.Router) -> None:
    clock = AutoClock()
    route = router.get("/x").mock(return_value=httpx.Response(503, text="busy"))
    api = make(clock, router, max_retries=3)
    start = clock.monotonic()
    with pytest.raises(Transient) as exc:
        await api.request("GET", "/x")
    assert route.call_count == 4  # the first try and three retries
    assert clock.slept == [0.5, 1.0, 2.0]  # full jitter at rng=1.0: the exponential ceiling
    assert clock.monotonic() - start == pytest.approx(3.5)
    assert exc.value.status == 503 and exc.value.provider == "test"
    await api.aclose()


async def test_zero_retries_means_one_call(router: respx.Router) -> None:
    clock = AutoClock()
    route = router.get("/x").mock(return_value=httpx.Response(500))
    api = make(clock, router, max_retries=0)
    with pytest.raises(Transient):
        await api.request("GET", "/x")
    assert route.call_count == 1 and clock.slept == []
    await api.aclose()


async def test_transient_then_success_returns_the_reply(router: respx.Router) -> None:
    clock = AutoClock()
    router.get("/x").mock(side_effect=[httpx.Response(502), httpx.Response(200, json={"n": 1})])
    api = make(clock, router)
    reply = await api.request("GET", "/x")
    assert reply.status == 200 and reply.body == {"n": 1}
    assert clock.slept == [0.5]
    await api.aclose()


async def test_rate_limit_honours_retry_after(router: respx.Router) -> None:
    clock = AutoClock()
    router.get("/x").mock(
        side_effect=[
            httpx.Response(429, headers={"Retry-After": "3"}),
            httpx.Response(200, json={}),
        ]
    )
    api = make(clock, router)
    await api.request("GET", "/x")
    assert clock.slept == [3.0]
    await api.aclose()


async def test_rate_limit_without_retry_after_uses_the_larger_base(router: respx.Router) -> None:
    clock = AutoClock()
    route = router.get("/x").mock(return_value=httpx.Response(429, text="too frequent"))
    api = make(clock, router, max_retries=2)
    with pytest.raises(RateLimited) as exc:
        await api.request("GET", "/x")
    assert route.call_count == 3
    assert clock.slept == [2.0, 4.0]
    assert exc.value.retry_after is None
    await api.aclose()


async def test_a_long_retry_after_goes_to_the_caller(router: respx.Router) -> None:
    clock = AutoClock()
    route = router.get("/x").mock(return_value=httpx.Response(429, headers={"Retry-After": "3600"}))
    api = make(clock, router)
    with pytest.raises(RateLimited) as exc:
        await api.request("GET", "/x")
    assert route.call_count == 1 and clock.slept == []
    assert exc.value.retry_after == 3600
    await api.aclose()


async def test_refusals_are_not_retried(router: respx.Router) -> None:
    clock = AutoClock()
    route = router.get("/x").mock(return_value=httpx.Response(400, json={"e": 1}))
    api = make(clock, router)
    with pytest.raises(InvalidRequest):
        await api.request("GET", "/x")
    assert route.call_count == 1
    await api.aclose()


async def test_transport_errors_become_transient_and_are_retried(router: respx.Router) -> None:
    clock = AutoClock()
    route = router.get("/x").mock(
        side_effect=[httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), httpx.Response(200)]
    )
    api = make(clock, router)
    reply = await api.request("GET", "/x")
    assert reply.status == 200 and reply.body is None
    assert route.call_count == 3
    await api.aclose()


async def test_a_sent_non_idempotent_request_is_not_repeated(router: respx.Router) -> None:
    clock = AutoClock()
    route = router.post("/launch").mock(side_effect=httpx.ReadTimeout("slow"))
    api = make(clock, router)
    with pytest.raises(Transient) as exc:
        await api.request("POST", "/launch", idempotent=False)
    assert route.call_count == 1
    assert exc.value.may_exist
    assert isinstance(exc.value.__cause__, httpx.ReadTimeout)
    await api.aclose()


async def test_a_non_idempotent_5xx_is_not_repeated(router: respx.Router) -> None:
    clock = AutoClock()
    route = router.post("/launch").mock(return_value=httpx.Response(500))
    api = make(clock, router)
    with pytest.raises(Transient):
        await api.request("POST", "/launch", idempotent=False)
    assert route.call_count == 1
    await api.aclose()


async def test_a_non_idempotent_request_is_retried_when_surely_not_sent(
    router: respx.Router,
) -> None:
    clock = AutoClock()
    route = router.post("/launch").mock(
        side_effect=[
            httpx.ConnectError("refused"),
            httpx.Response(429),
            httpx.Response(200, json={"id": 1}),
        ]
    )
    api = make(clock, router)
    reply = await api.request("POST", "/launch", idempotent=False)
    assert reply.body == {"id": 1} and route.call_count == 3
    await api.aclose()


# --- wire details -------------------------------------------------------------------------------


async def test_base_path_is_kept_and_bearer_auth_sent(router: respx.Router) -> None:
    clock = AutoClock()
    route = router.get("/instances").mock(return_value=httpx.Response(200, json={"data": []}))
    api = make(clock, router)
    await api.request("GET", "/instances", params={"a": "b"})
    req = route.calls.last.request
    assert str(req.url) == f"{BASE}/instances?a=b"
    assert req.headers["authorization"] == f"Bearer {KEY}"
    await api.aclose()


async def test_plain_text_bodies_are_kept_as_text(router: respx.Router) -> None:
    clock = AutoClock()
    router.get("/x").mock(return_value=httpx.Response(200, text="hello"))
    api = make(clock, router)
    assert (await api.request("GET", "/x")).body == "hello"
    await api.aclose()


async def test_the_key_never_reaches_the_logs(
    router: respx.Router, caplog: pytest.LogCaptureFixture
) -> None:
    clock = AutoClock()
    router.get("/x").mock(
        side_effect=[httpx.Response(503), httpx.ConnectError("x"), httpx.Response(400)]
    )
    api = make(clock, router)
    caplog.set_level(logging.DEBUG)
    with capture_logs() as logs, pytest.raises(InvalidRequest) as exc:
        await api.request("GET", "/x", params={"q": "1"})
    assert [e["event"] for e in logs] == [
        "provider_retry",
        "provider_retry",
        "provider_request_failed",
    ]
    assert logs[0]["path"] == "/x" and logs[0]["status"] == 503 and logs[0]["attempt"] == 0
    assert KEY not in repr(logs)
    assert KEY not in caplog.text
    assert KEY not in str(exc.value)
    assert "Bearer" not in repr(logs) + caplog.text
    await api.aclose()
