"""The notifier: tells the operator, through apprise (ntfy, Slack, email, webhooks, ...),
what costs or may cost money (see notify/plan.py for what and when).

It never blocks the guard or a store write: its store listener only maps the event to a
message (pure, cheap) and appends it to a bounded queue; when the queue is full the oldest
message is dropped and counted (`dropped`, logged as `notify_dropped`). A sender task
delivers the queue in order, rate-limited by a token bucket (notify.rate_per_minute after
notify.burst at once), each message retried with backoff (2 s, 4 s, ... MAX_ATTEMPTS tries)
and bounded by SEND_TIMEOUT, so a receiver that hangs delays only other messages. The main
loop plans the messages that time alone calls for (a lease about to end, a destroy failing
for too long) from the store's instances, and sleeps until the next falls due or an
instance event may move it. On the way out it sends, within a short deadline, the messages
still queued and, if instances are still live, that the daemon stopped with them billing.

The URLs are secrets (they carry tokens): they live in settings as SecretStr, are registered
with the log redaction at load, and are never logged here.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Protocol

import structlog

from gpuwarden.core.heartbeat import BEAT_EVERY
from gpuwarden.core.model import EntityKind, Event, NotifyKind
from gpuwarden.fleet.app import App
from gpuwarden.fleet.terminator import ESCALATE_AGE
from gpuwarden.notify.plan import (
    MAX_ATTEMPTS,
    Message,
    TokenBucket,
    from_event,
    planned,
    retry_delay,
    stopped_billing,
)

log = structlog.get_logger(__name__)

SEND_TIMEOUT = 30.0  # seconds one delivery may take before it counts as failed
FAREWELL_MAX = 5.0  # seconds for the last messages at shutdown (at most half its timeout)
_REPLAN_EVENTS = frozenset({"state", "extended"})  # instance events that may move a plan


class Sender(Protocol):
    async def send(self, message: Message) -> bool:
        """Deliver to every target; True when all took it."""
        ...


class AppriseSender:
    """Delivery through apprise's asyncio API (its blocking plugins run in its threads)."""

    def __init__(self, urls: Sequence[str]) -> None:
        # Imported here, not at the top: every daemon imports this module, and apprise
        # costs about a quarter of a second at start-up that a daemon without notify.urls
        # would pay for nothing.
        import apprise

        self._info, self._warning = apprise.NotifyType.INFO, apprise.NotifyType.WARNING
        self._apprise = apprise.Apprise()
        for url in urls:
            self._apprise.add(url)

    async def send(self, message: Message) -> bool:
        kind = self._warning if message.warning else self._info
        result = await self._apprise.async_notify(
            body=message.body, title=message.title, notify_type=kind
        )
        return bool(result)


class Notifier:
    """The `notifier` service. `make_sender` builds the delivery for a list of URLs (tests
    pass a fake); it is rebuilt when a config reload changes notify.urls."""

    name = "notifier"

    def __init__(
        self,
        app: App,
        *,
        make_sender: Callable[[Sequence[str]], Sender] = AppriseSender,
        send_timeout: float = SEND_TIMEOUT,
    ) -> None:
        self.app = app
        self._make_sender = make_sender
        self.send_timeout = send_timeout
        self._sender: Sender | None = None
        self._sender_urls: tuple[str, ...] = ()
        self._queue: deque[Message] = deque()
        self._ready = asyncio.Event()
        self._wake = asyncio.Event()
        self._sent: dict[str, str] = {}  # planned message key -> its instance id
        self._bucket: TokenBucket | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self.dropped = 0  # messages dropped because the queue was full
        self._dropped_told = 0
        self.delivered = 0
        self.failed = 0  # messages given up after MAX_ATTEMPTS
        # For tests, which wait on these instead of on time: the main loop is asleep; the
        # sender waits for a retry or for the rate limit.
        self.asleep = asyncio.Event()
        self.next_wake: datetime | None = None
        self.retrying = False
        self.throttled = False

    async def start(self) -> None:
        """Listen from before the first reconciler pass, so that what it finds is told."""
        self._subscribe()

    def settled(self) -> bool:
        """Asleep with no wake-up pending (as the guard's `settled`): tests wait on this."""
        due = self.next_wake is not None and self.next_wake <= self.app.clock.now()
        return self.asleep.is_set() and not self._wake.is_set() and not due

    def _subscribe(self) -> None:
        if self._unsubscribe is None:
            self._unsubscribe = self.app.store.subscribe(self._on_event)

    # --- the store listener: cheap, never blocks ---------------------------------------------

    def _on_event(self, event: Event) -> None:
        if event.kind is EntityKind.INSTANCE and event.name in _REPLAN_EVENTS:
            self._wake.set()
        cfg = self.app.settings.notify
        if not cfg.urls:
            return
        message = from_event(event, self.app.installation)
        if message is not None and message.kind in cfg.events:
            self.put(message)

    def put(self, message: Message) -> None:
        """Queue a message; a full queue drops its oldest."""
        limit = self.app.settings.notify.queue_size
        while len(self._queue) >= limit:
            self._queue.popleft()
            self.dropped += 1
        self._queue.append(message)
        self._ready.set()

    @property
    def queued(self) -> int:
        return len(self._queue)

    # --- the main loop: plans, beats, watches the sender ---------------------------------------

    async def run(self) -> None:
        app = self.app
        app.heartbeats.register(self.name)
        self._subscribe()
        sender = asyncio.create_task(self._send_loop(), name="notifier-send")
        try:
            while not app.stopping.is_set():
                wake = await self._safe_plan()
                app.heartbeats.beat(self.name)
                if sender.done():
                    sender.result()  # the send loop never ends by itself: raise its error
                self.next_wake = wake
                self.asleep.set()
                await app.clock.sleep_until(wake, self._wake)
                self.asleep.clear()
        finally:
            if self._unsubscribe is not None:
                self._unsubscribe()
                self._unsubscribe = None
            sender.cancel()
            await asyncio.wait({sender})
            if app.stopping.is_set():
                await self._farewell()

    async def _safe_plan(self) -> datetime:
        try:
            return await self.plan_once()
        except Exception:  # a store hiccup: log it, try again in a second
            log.exception("notify_plan_failed")
            return self.app.clock.now() + timedelta(seconds=1)

    async def plan_once(self) -> datetime:
        """Queue the planned messages due now; returns when the next pass is due."""
        app = self.app
        cfg = app.settings.notify
        now = app.clock.now()
        wake = now + timedelta(seconds=BEAT_EVERY)
        if not cfg.urls:
            return wake
        live = await app.store.live_instances()
        ids = {i.id for i in live}
        self._sent = {k: iid for k, iid in self._sent.items() if iid in ids}
        due, later = planned(
            live,
            installation=app.installation,
            lease_warning=cfg.lease_warning,
            escalate_after=ESCALATE_AGE,
            now=now,
        )
        for message in due:
            if message.key not in self._sent and message.kind in cfg.events:
                self._sent[message.key] = message.instance_id
                self.put(message)
        return wake if later is None else min(wake, later)

    # --- delivery ------------------------------------------------------------------------

    def _current_sender(self) -> Sender | None:
        urls = tuple(u.get_secret_value() for u in self.app.settings.notify.urls)
        if urls != self._sender_urls:
            self._sender = self._make_sender(urls) if urls else None
            self._sender_urls = urls
        return self._sender

    async def _send_loop(self) -> None:
        while True:
            if not self._queue:
                self._ready.clear()
                await self._ready.wait()
                continue
            if self.dropped != self._dropped_told:
                log.warning("notify_dropped", dropped=self.dropped - self._dropped_told)
                self._dropped_told = self.dropped
            await self._take_token()
            if self._queue:
                await self._deliver(self._queue.popleft())

    async def _take_token(self) -> None:
        cfg = self.app.settings.notify
        rate = cfg.rate_per_minute / 60.0
        if self._bucket is None or (self._bucket.rate, self._bucket.burst) != (rate, cfg.burst):
            self._bucket = TokenBucket(rate, cfg.burst)
        while (wait := self._bucket.take(self.app.clock.monotonic())) > 0:
            self.throttled = True
            await self.app.clock.sleep(wait)
        self.throttled = False

    async def _deliver(self, message: Message) -> None:
        for attempt in range(1, MAX_ATTEMPTS + 1):
            sender = self._current_sender()
            if sender is None:
                return  # notify.urls emptied by a reload: nothing to send to
            if await self._try(sender, message):
                self.delivered += 1
                log.info("notify_sent", kind=message.kind.value, attempt=attempt)
                return
            if attempt < MAX_ATTEMPTS:
                delay = retry_delay(attempt)
                log.warning(
                    "notify_retry", kind=message.kind.value, attempt=attempt, retry_in_s=delay
                )
                self.retrying = True
                await self.app.clock.sleep(delay)
                self.retrying = False
        self.failed += 1
        log.error("notify_failed", kind=message.kind.value, attempts=MAX_ATTEMPTS)

    async def _try(self, sender: Sender, message: Message) -> bool:
        try:
            async with asyncio.timeout(self.send_timeout):
                return await sender.send(message)
        except TimeoutError:
            log.warning("notify_timeout", kind=message.kind.value, timeout_s=self.send_timeout)
        except Exception as exc:  # a plugin's bug or a refused connection: retried
            log.warning("notify_error", kind=message.kind.value, error=repr(exc))
        return False

    async def _farewell(self) -> None:
        """At shutdown: say that instances are still billing, and send what is queued, one
        try each, within FAREWELL_MAX (or half the shutdown timeout, if shorter)."""
        app = self.app
        cfg = app.settings.notify
        budget = min(FAREWELL_MAX, app.settings.daemon.shutdown_timeout.total_seconds() / 2)
        try:
            async with asyncio.timeout(budget):
                sender = self._current_sender()
                if sender is None:
                    return
                live = await app.store.live_instances()
                if live and NotifyKind.STOPPED_BILLING in cfg.events:
                    deadman = app.limits().deadman_timeout
                    self._queue.appendleft(stopped_billing(live, app.installation, deadman))
                while self._queue:
                    if await self._try(sender, self._queue.popleft()):
                        self.delivered += 1
        except TimeoutError:
            log.warning("notify_farewell_cut", unsent=len(self._queue), timeout_s=budget)
        except Exception:
            log.exception("notify_farewell_failed")
