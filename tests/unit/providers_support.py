"""Helpers of the provider client tests: the reference payloads of
tests/fixtures/providers/<provider>/ as they go over the wire. (The clock whose sleeps pass at
once is tests/conftest.py's AutoClock, the `auto_clock` fixture.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx

FIXTURES = Path(__file__).parent.parent / "fixtures" / "providers"


def _strip(value: Any) -> Any:
    """Drop the reference annotations (`_http`, `_note`, `_source`): not on the wire."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if not k.startswith("_")}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def load_fixture(provider: str, name: str) -> Any:
    """tests/fixtures/providers/<provider>/<name>, annotations dropped."""
    return _strip(json.loads((FIXTURES / provider / name).read_text()))


# Answers that say nothing about an instance (a proxy's page, an outage, a truncated body):
# a client must take each as a transient error, never as "gone" or "none left".
GARBAGE = [
    httpx.Response(200, text="<html><body>Bad gateway</body></html>"),
    httpx.Response(200, content=b""),
    httpx.Response(200, json={"unexpected": True}),
    httpx.Response(404, text="<html><body>404 Not Found</body></html>"),
    httpx.Response(404, content=b""),
]
GARBAGE_IDS = ["html-200", "empty-200", "json-without-the-payload", "html-404", "empty-404"]
