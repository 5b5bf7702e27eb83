"""The HTTP machinery shared by the provider clients: pacing, bounded retries, error mapping.

Each client hands `ApiClient` a classifier that turns (status, body) into the error taxonomy
of `providers.base`; this module owns everything else:

* **Pacing**: a minimum interval between calls per endpoint class (Lambda allows one request
  per second and one launch per 12 s), kept with the injected clock so tests step time.
* **Retries**: Transient and RateLimited are retried a bounded number of times with
  exponential backoff and full jitter (AWS architecture blog's "full jitter"), honouring a
  retry-after when the provider gives one. A request that may have taken effect (a launch
  that timed out after it was sent) is not repeated: the caller tracks what may exist.
* **Transport errors** (timeouts, refused connections, broken streams) become Transient.
* **Secrets**: the Authorization header lives in the httpx client only; logs carry method,
  path (without query), status and attempt.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any, ClassVar, Required, TypedDict

import httpx
import structlog

from gpuwarden.core.clock import Clock
from gpuwarden.providers.base import NotFound, ProviderError, RateLimited, Transient

log = structlog.get_logger(__name__)

# (status, decoded body, now) -> an error of the taxonomy, or None when the reply is a success.
Classifier = Callable[[int, Any, datetime], ProviderError | None]

GENERAL = "general"


@dataclass(frozen=True, slots=True)
class Backoff:
    """Retry timing. Delays are `random() * min(cap, base * 2**attempt)` (full jitter)."""

    base: float = 0.5
    cap: float = 30.0
    # Rate limits clear slower than blips: without a retry-after, back off from a larger base.
    rate_limited_base: float = 2.0
    # A retry-after longer than this (Vast's daily search quota resets at midnight) is not
    # waited out inside one call: the RateLimited error goes to the caller instead.
    max_retry_after: float = 120.0


def backoff_delay(attempt: int, rnd: float, *, base: float, cap: float) -> float:
    """Full-jitter exponential backoff for retry number `attempt` (0 for the first retry)."""
    return max(0.0, rnd) * min(cap, base * (2.0**attempt))


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date; None if unusable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, (when - now).total_seconds())


class Pacer:
    """A minimum interval between calls of each endpoint class, on the injected clock.

    A call names the classes it belongs to (a Lambda launch is both "general" and "launch");
    it waits for the latest of their next free slots and reserves the following slot in each.
    Reservation happens before the sleep, so concurrent callers queue up in call order.
    """

    def __init__(self, clock: Clock, intervals: Mapping[str, float]) -> None:
        self._clock = clock
        self._intervals = dict(intervals)
        self._next: dict[str, float] = {}

    @property
    def intervals(self) -> Mapping[str, float]:
        return dict(self._intervals)

    def reserve(self, classes: Sequence[str]) -> float:
        """Reserve the next slot for `classes`; return how long to wait for it (seconds)."""
        now = self._clock.monotonic()
        start = now
        for c in classes:
            start = max(start, self._next.get(c, now))
        for c in classes:
            self._next[c] = start + self._intervals.get(c, 0.0)
        return start - now

    async def wait(self, classes: Sequence[str]) -> float:
        delay = self.reserve(classes)
        if delay > 0:
            await self._clock.sleep(delay)
        return delay


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: Any  # decoded JSON, or the text when the body is not JSON


def _decode(resp: httpx.Response) -> Any:
    if not resp.content:
        return None
    try:
        return resp.json()
    except ValueError:
        return resp.text


# Failures where the request never reached the server: always safe to repeat.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


class ApiClient:
    """An httpx.AsyncClient with Bearer auth, pacing, retries and error classification."""

    def __init__(
        self,
        *,
        provider: str,
        base_url: str,
        api_key: str,
        clock: Clock,
        classify: Classifier,
        timeout: float = 30.0,
        max_retries: int = 4,
        pacing: Mapping[str, float] | None = None,
        backoff: Backoff | None = None,
        rng: Callable[[], float] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.provider = provider
        self._clock = clock
        self._classify = classify
        self._max_retries = max(0, max_retries)
        self.pacer = Pacer(clock, pacing or {})
        self._backoff = backoff or Backoff()
        # Jitter needs no cryptographic strength.
        self._rng = rng or random.random
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers={
                "Authorization": f"Bearer {api_key}",
                "Accept": "application/json",
                "User-Agent": "gpuwarden/0.1",
            },
            timeout=timeout,
            transport=transport,
            # Lambda's deprecated host redirects; httpx drops the auth header across origins.
            follow_redirects=True,
        )

    @property
    def base_url(self) -> str:
        return str(self._http.base_url).rstrip("/")

    @property
    def max_retries(self) -> int:
        return self._max_retries

    async def aclose(self) -> None:
        await self._http.aclose()

    async def request(
        self,
        method: str,
        path: str,
        *,
        pace: Sequence[str] = (GENERAL,),
        json: Any = None,
        params: Mapping[str, str] | None = None,
        idempotent: bool = True,
    ) -> Reply:
        """Send one logical request; retry what is safe to retry; raise the taxonomy's error.

        `idempotent=False` (a launch) retries only failures where the request surely did not
        take effect: a refused connection or a rate limit. A timeout after sending raises
        Transient at once so that the caller can look for what may have been created.
        """
        rlog = log.bind(provider=self.provider, method=method, path=path)
        attempt = 0
        while True:
            await self.pacer.wait(pace)
            err, sent, cause = await self._attempt(method, path, json, params)
            if isinstance(err, Reply):
                rlog.debug("provider_request", status=err.status, attempt=attempt)
                return err
            what = {"status": err.status, "attempt": attempt, "error": type(err).__name__}
            delay = self._retry_delay(err, attempt, sent=sent, idempotent=idempotent)
            if delay is None:
                # "No such thing" is often the answer the caller wanted (destroy, get).
                emit = rlog.debug if isinstance(err, NotFound) else rlog.warning
                emit("provider_request_failed", **what)
                raise err from cause
            rlog.info("provider_retry", **what, delay=round(delay, 3))
            await self._clock.sleep(delay)
            attempt += 1

    async def _attempt(
        self, method: str, path: str, json: Any, params: Mapping[str, str] | None
    ) -> tuple[Reply | ProviderError, bool, BaseException | None]:
        """One HTTP exchange: (reply or error, whether the request may have been sent, cause)."""
        kwargs: dict[str, Any] = {}
        if json is not None:
            kwargs["json"] = json
        if params:
            kwargs["params"] = dict(params)
        try:
            resp = await self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:  # timeouts, connection and protocol errors
            err = Transient(f"{type(exc).__name__} on {method} {path}", provider=self.provider)
            return err, not isinstance(exc, _NOT_SENT), exc
        body = _decode(resp)
        now = self._clock.now()
        error = self._classify(resp.status_code, body, now)
        if error is None:
            return Reply(resp.status_code, body), True, None
        error.provider = error.provider or self.provider
        if error.status is None:
            error.status = resp.status_code
        if isinstance(error, RateLimited) and error.retry_after is None:
            error.retry_after = parse_retry_after(resp.headers.get("retry-after"), now)
        return error, True, None

    def _retry_delay(
        self, err: ProviderError, attempt: int, *, sent: bool, idempotent: bool
    ) -> float | None:
        """How long to wait before retrying `err`, or None when it must go to the caller."""
        if attempt >= self._max_retries:
            return None
        b = self._backoff
        if isinstance(err, RateLimited):
            if err.retry_after is not None:
                return None if err.retry_after > b.max_retry_after else err.retry_after
            return backoff_delay(attempt, self._rng(), base=b.rate_limited_base, cap=b.cap)
        if isinstance(err, Transient) and (idempotent or not sent):
            return backoff_delay(attempt, self._rng(), base=b.base, cap=b.cap)
        return None


class ClientOptions(TypedDict, total=False):
    """What every HTTP provider client takes (ApiClient's options); api_key and clock are
    required, the rest fall back to the client's defaults."""

    name: str
    base_url: str | None
    api_key: Required[str]
    clock: Required[Clock]
    timeout: float
    max_retries: int
    pacing: Mapping[str, float] | None
    backoff: Backoff | None
    rng: Callable[[], float] | None
    transport: httpx.AsyncBaseTransport | None


class HttpProvider:
    """The plumbing the provider clients share: a `name`, an ApiClient built from the common
    options with the client's defaults, and `aclose`. A client sets the three defaults and
    passes its wire module's error classifier."""

    default_name: ClassVar[str]
    default_base_url: ClassVar[str]
    default_pacing: ClassVar[Mapping[str, float]]

    def __init__(self, classify: Classifier, options: ClientOptions) -> None:
        self.name: str = options.get("name", self.default_name)
        pacing = options.get("pacing")
        self._api = ApiClient(
            provider=self.name,
            base_url=options.get("base_url") or self.default_base_url,
            api_key=options["api_key"],
            clock=options["clock"],
            classify=classify,
            timeout=options.get("timeout", 30.0),
            max_retries=options.get("max_retries", 4),
            pacing=self.default_pacing if pacing is None else pacing,
            backoff=options.get("backoff"),
            rng=options.get("rng"),
            transport=options.get("transport"),
        )

    @property
    def api(self) -> ApiClient:
        return self._api

    async def aclose(self) -> None:
        await self._api.aclose()


def error_text(body: Any, *keys: str, limit: int = 300) -> str:
    """A short human message from an error body (dict fields or plain text), for exceptions."""
    if isinstance(body, Mapping):
        for k in keys:
            v = body.get(k)
            if isinstance(v, str) and v:
                return v[:limit]
        return ""
    if isinstance(body, str):
        return body.strip()[:limit]
    return ""
