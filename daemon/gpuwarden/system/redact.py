"""Redaction: no secret reaches a log line.

`redact` is the structlog processor that runs last before rendering, after exceptions have
been formatted to text, so it sees every string any output will write. It masks, with
"**********":
- SecretStr / SecretBytes values, wherever they are nested;
- values under secret-like keys (api_key, authorization, private_key, password, token,
  secret, credential, cookie, ...), in the event or in nested mappings such as headers;
- `Authorization: ...` and `Bearer ...` credentials inside any text;
- every value registered with `register_secret()` (the config's secrets are registered when
  it is loaded), even inside a longer string. Secrets shorter than 4 characters are masked
  only as whole values, so that they do not blank out ordinary words.
Objects of other types are turned into text first, so their str() cannot carry a secret past.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Mapping

from pydantic import BaseModel, SecretBytes, SecretStr
from structlog.typing import EventDict, WrappedLogger

MASK = "**********"


_SECRET_KEY = re.compile(
    r"(api[_-]?key|apikey|authorization|private[_-]?key|password|passwd|passphrase|token"
    r"|secret|credential|cookie)",
    re.IGNORECASE,
)
_AUTH_HEADER = re.compile(
    r"(?i)(\bauthorization[\"']?\s*[:=]\s*[\"']?)(?:(bearer|basic)\s+)?[^\s\"',}]+"
)
_BEARER = re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]{4,}")
_MIN_SUBSTRING = 4  # shorter registered secrets are masked only as whole values
_MIN_LINE = 16  # lines of a multi-line secret (a PEM key) registered on their own

_secrets: set[str] = set()
_secrets_lock = threading.Lock()


def register_secret(value: str | SecretStr | None) -> None:
    """Never log this value, even inside a longer string. Multi-line secrets (PEM keys) also
    register each long line, so one line of a key quoted in an error is masked too."""
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if not value or not value.strip():
        return
    with _secrets_lock:
        _secrets.add(value)
        for raw in value.splitlines():
            line = raw.strip()
            if len(line) >= _MIN_LINE and not line.startswith("-----"):
                _secrets.add(line)


def register_secrets_from(model: BaseModel) -> None:
    """Register every SecretStr value found in a (nested) pydantic model: the loaded config."""
    for value in _walk_model(model):
        register_secret(value)


def _walk_model(obj: object) -> Iterable[SecretStr]:
    if isinstance(obj, SecretStr):
        yield obj
    elif isinstance(obj, BaseModel):
        for name in type(obj).model_fields:
            yield from _walk_model(getattr(obj, name))
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _walk_model(v)
    elif isinstance(obj, list | tuple):
        for v in obj:
            yield from _walk_model(v)


def clear_secrets() -> None:
    """Forget registered secrets (tests)."""
    with _secrets_lock:
        _secrets.clear()


def scrub(text: str) -> str:
    """Mask registered secrets and credentials in a piece of text."""
    with _secrets_lock:
        known = sorted(_secrets, key=len, reverse=True)  # longest first: no partial leftovers
    if text in known:
        return MASK
    for secret in known:
        if len(secret) >= _MIN_SUBSTRING and secret in text:
            text = text.replace(secret, MASK)
    text = _AUTH_HEADER.sub(lambda m: m.group(1) + MASK, text)
    return _BEARER.sub(lambda m: m.group(1) + " " + MASK, text)


def _clean(value: object, depth: int = 0) -> object:
    if isinstance(value, SecretStr | SecretBytes):
        return MASK
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str) or depth > 8:
        # text, or a pathological nesting flattened rather than recursed into forever
        return scrub(str(value))
    if isinstance(value, Mapping):
        return {str(k): _clean_item(str(k), v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_clean(v, depth + 1) for v in value]
    # Anything else is rendered to text here, so its str() cannot smuggle a secret past us.
    return scrub(str(value))


def _clean_item(key: str, value: object, depth: int) -> object:
    if _SECRET_KEY.search(key) and value is not None and not isinstance(value, bool):
        return MASK
    return _clean(value, depth)


def redact(logger: WrappedLogger, method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: the last step before rendering. See the module docstring."""
    return {key: _clean_item(key, value, 0) for key, value in event_dict.items()}
