"""Structured logging: structlog with stable event names and key-values, three outputs, and a
redaction step that no output can bypass.

Outputs, chosen from where stdout goes (`configure(mode="auto")`):
- journal: stdout is the journal ($JOURNAL_STREAM matches its fstat) -> native journald
  entries with MESSAGE, PRIORITY, SYSLOG_IDENTIFIER=gpuwarden, EVENT, LOGGER and every key as
  an upper-cased field, so `journalctl INSTANCE_ID=... EVENT=instance_terminated` works;
- console: stdout is a terminal -> readable lines;
- json: anything else (a pipe, a file) -> one JSON object per line.

Redaction (redact.py, re-exported here) runs last before rendering, after exceptions are
formatted to text, so it sees every string that reaches an output: SecretStr values, values
under secret-like keys (api_key, authorization, private_key, password, token, secret, ...),
`Authorization:` and `Bearer` credentials inside text, and any value registered with
`register_secret()` (the config's secrets are registered when it is loaded) all become
"**********".

Records from the standard `logging` module (asyncssh, aiosqlite, httpx) are routed through
the same chain at WARNING and above, so they are redacted and rendered alike.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
from collections.abc import Mapping
from typing import Any, Literal, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from gpuwarden.core.clock import Clock, SystemClock
from gpuwarden.system import systemd
from gpuwarden.system.redact import (
    MASK,
    clear_secrets,
    redact,
    register_secret,
    register_secrets_from,
    scrub,
)

__all__ = [
    "MASK",
    "choose_mode",
    "clear_secrets",
    "close",
    "configure",
    "redact",
    "register_secret",
    "register_secrets_from",
    "scrub",
    "set_level",
]

IDENTIFIER = "gpuwarden"
Mode = Literal["auto", "json", "console", "journal"]
# The journald fields operators filter on (README Operations' journalctl recipes): the
# structlog keys event, instance_id, job_id, provider and reason, upper-cased by
# JournalRenderer, plus the entry's own. tests/unit/test_docs_journald_fields.py checks that
# the docs name only these and that the renderer really writes them.
JOURNAL_FIELDS = frozenset(
    {"EVENT", "INSTANCE_ID", "JOB_ID", "PROVIDER", "REASON", "SYSLOG_IDENTIFIER", "PRIORITY"}
)

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR, "critical": logging.CRITICAL}  # fmt: skip
_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2, "exception": 3}

# --- processors ------------------------------------------------------------------------------


class _Timestamper:
    """ISO 8601 UTC time from the injected clock (the daemon reads time only via Clock)."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock

    def __call__(self, logger: WrappedLogger, method: str, event_dict: EventDict) -> EventDict:
        event_dict.setdefault("timestamp", self._clock.now().isoformat(timespec="milliseconds"))
        return event_dict


def _add_level(logger: WrappedLogger, method: str, event_dict: EventDict) -> EventDict:
    event_dict.setdefault("level", "error" if method == "exception" else method)
    return event_dict


def _add_logger_name(logger: WrappedLogger, method: str, event_dict: EventDict) -> EventDict:
    name = getattr(logger, "name", None)
    if name:
        event_dict.setdefault("logger", name)
    return event_dict


_LEAD = ("timestamp", "level", "event", "logger")


def _lead_keys(logger: WrappedLogger, method: str, event_dict: EventDict) -> EventDict:
    """JSON lines read better with time, level and event first."""
    lead = {k: event_dict[k] for k in _LEAD if k in event_dict}
    return lead | {k: v for k, v in event_dict.items() if k not in lead}


def _message_text(event_dict: Mapping[str, Any]) -> str:
    """A one-line summary for the journal's MESSAGE: the event and its key-values."""
    skip = {"event", "level", "logger", "timestamp", "exception", "stack"}
    parts = [str(event_dict.get("event", ""))]
    for key, value in event_dict.items():
        if key not in skip:
            parts.append(f"{key}={_field_text(value)}")
    return " ".join(parts)


def _field_text(value: object) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, default=str)


class JournalRenderer:
    """Turns an event dict into the fields of one journald entry (for `_JournalSink`)."""

    def __call__(
        self, logger: WrappedLogger, method: str, event_dict: EventDict
    ) -> tuple[tuple[dict[str, object]], dict[str, Any]]:
        level = str(event_dict.get("level", method))
        message = _message_text(event_dict)
        exc = event_dict.get("exception")
        if exc:
            message += "\n" + str(exc)
        fields: dict[str, object] = {
            "MESSAGE": message,
            "PRIORITY": _PRIORITY.get(level, 6),
            "SYSLOG_IDENTIFIER": IDENTIFIER,
        }
        for key, value in event_dict.items():
            if key in ("timestamp", "level"):
                continue  # journald stamps entries itself; PRIORITY carries the level
            name = systemd.journal_key(key)
            if name in ("MESSAGE", "PRIORITY", "SYSLOG_IDENTIFIER"):
                name = "F_" + name  # a key-value must not overwrite the entry's own fields
            fields[name] = _field_text(value)
        return (fields,), {}


# --- sinks -----------------------------------------------------------------------------------


class _StreamSink:
    """Writes one rendered line per event to a text stream (stdout by default)."""

    def __init__(self, stream: TextIO, name: str | None) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self.name = name

    def msg(self, line: str) -> None:
        with self._lock:
            try:
                self._stream.write(line + "\n")
                self._stream.flush()
            except (OSError, ValueError):
                # stdout is gone (a closed pipe, a restarted journald stream): there is nowhere
                # to write, and a log call must never take a service loop down with it.
                pass

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


class _JournalSink:
    """Sends rendered journal entries; falls back to the stream if journald is unreachable."""

    def __init__(self, writer: systemd.JournalWriter, fallback: TextIO, name: str | None) -> None:
        self._writer = writer
        self._fallback = fallback
        self.name = name

    def msg(self, fields: dict[str, object]) -> None:
        try:
            self._writer.send(fields)
        except OSError:
            with contextlib.suppress(OSError, ValueError):  # see _StreamSink.msg
                self._fallback.write(f"{fields.get('MESSAGE', '')}\n")
                self._fallback.flush()

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


class _SinkFactory:
    def __init__(self, make: Any) -> None:
        self._make = make

    def __call__(self, *args: Any) -> Any:
        name = args[0] if args and isinstance(args[0], str) else None
        return self._make(name)


class _StdlibBridge(logging.Handler):
    """Feeds standard-library log records (asyncssh, aiosqlite, httpx) into structlog."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            log = structlog.get_logger(record.name)
            kw: dict[str, Any] = {}
            if record.exc_info:
                kw["exc_info"] = record.exc_info
            log.log(record.levelno, record.getMessage(), **kw)
        except Exception:  # a logging failure must not take the caller down
            self.handleError(record)


# --- setup -----------------------------------------------------------------------------------


def choose_mode(stream: TextIO, env: Mapping[str, str] | None = None) -> Mode:
    try:
        fd = stream.fileno()
    except (OSError, ValueError, AttributeError):
        return "json"
    if systemd.stream_is_journal(fd, env):
        return "journal"
    return "console" if stream.isatty() else "json"


def configure(
    *,
    mode: Mode = "auto",
    level: str = "info",
    stream: TextIO | None = None,
    clock: Clock | None = None,
    journal_socket: str | None = None,
    stdlib_level: str = "warning",
) -> Mode:
    """Set up structlog (and the stdlib bridge). Safe to call again, e.g. in tests or when the
    level changes on reload. Returns the mode chosen."""
    out = stream or sys.stdout
    chosen: Mode = choose_mode(out) if mode == "auto" else mode
    head: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        _add_level,
        _add_logger_name,
    ]
    if chosen != "journal":
        head.append(_Timestamper(clock or SystemClock()))
    head += [structlog.processors.StackInfoRenderer(), structlog.processors.format_exc_info]
    renderer: Processor
    if chosen == "journal":
        writer = _journal_writer(journal_socket)
        factory = _SinkFactory(lambda name: _JournalSink(writer, out, name))
        renderer = JournalRenderer()
    elif chosen == "console":
        factory = _SinkFactory(lambda name: _StreamSink(out, name))
        renderer = structlog.dev.ConsoleRenderer(
            colors=_colors(out), exception_formatter=structlog.dev.plain_traceback
        )
    else:
        factory = _SinkFactory(lambda name: _StreamSink(out, name))
        renderer = structlog.processors.JSONRenderer(default=str, ensure_ascii=False)
        head.append(_lead_keys)
    if chosen != "journal":
        close()
    _current.update(
        mode=chosen, level=level, stream=out, clock=clock, journal_socket=journal_socket,
        stdlib_level=stdlib_level,
    )  # fmt: skip
    structlog.configure(
        processors=[*head, redact, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(level, logging.INFO)),
        logger_factory=factory,
        # Not cached: a reload (or a test) may reconfigure, and loggers are module globals.
        cache_logger_on_first_use=False,
    )
    _bridge_stdlib(LEVELS.get(stdlib_level, logging.WARNING))
    return chosen


_current: dict[str, Any] = {}
# The journal socket the current configuration writes to, by the `journal_socket` it was
# opened for. One at a time: reconfiguring closes the one it replaces.
_journal: dict[str | None, systemd.JournalWriter] = {}


def _journal_writer(path: str | None) -> systemd.JournalWriter:
    """The open journal socket for `path`: kept across a reconfigure to the same place (a
    reload that changes the level), otherwise closed and replaced by a new one."""
    if path not in _journal:
        close()
        _journal[path] = systemd.JournalWriter(path)
    return _journal[path]


def close() -> None:
    """Close the journal socket, if one is open. Loggers configured for the journal then fall
    back to their stream; `configure` opens a new socket when called again."""
    for writer in _journal.values():
        writer.close()
    _journal.clear()


def set_level(level: str) -> None:
    """Change the level, keeping the output chosen by the last `configure` (config reload)."""
    configure(**{**_current, "level": level})


def _colors(stream: TextIO) -> bool:
    return stream.isatty() and "NO_COLOR" not in os.environ


def _bridge_stdlib(level: int) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _StdlibBridge):
            root.removeHandler(handler)
    bridge = _StdlibBridge(level)
    root.addHandler(bridge)
    root.setLevel(level)
