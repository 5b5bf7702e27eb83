"""Helpers of the provider client tests: a clock whose sleeps pass at once, and the reference
payloads of tests/fixtures/providers/<provider>/ as they go over the wire."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gpuwarden.core.clock import FakeClock

FIXTURES = Path(__file__).parent.parent / "fixtures" / "providers"


class AutoClock(FakeClock):
    """A FakeClock whose sleeps move time at once and are recorded (no waiting at all)."""

    def __init__(self) -> None:
        super().__init__()
        self.slept: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        await self.advance(seconds)


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
