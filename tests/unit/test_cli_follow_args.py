"""The CLI's duration arguments and `events --follow --id LABEL`, without a daemon: a fake
client stands in for the socket."""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest

from gpuwarden.cli.commands_control import lease_hours, seconds_arg
from gpuwarden.cli.follow import follow
from gpuwarden.cli.output import Out


@pytest.mark.parametrize(("text", "seconds"), [("600", 600.0), ("90s", 90.0), ("1h30m", 5400.0)])
def test_a_wait_timeout_is_a_duration_or_a_bare_number_of_seconds(
    text: str, seconds: float
) -> None:
    assert seconds_arg(text) == seconds


@pytest.mark.parametrize(("text", "hours"), [("2", 2.0), ("0.5", 0.5), ("30m", 0.5)])
def test_a_lease_is_a_duration_or_a_bare_number_of_hours(text: str, hours: float) -> None:
    assert lease_hours(text) == hours


@pytest.mark.parametrize("text", ["0", "-5", "nan", "inf", "soon", "0s"])
def test_a_time_that_is_not_finite_and_positive_is_refused(text: str) -> None:
    for parse in (seconds_arg, lease_hours):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


class _Stream:
    def __init__(self, events: list[dict[str, Any]]) -> None:
        self._events = events

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self._gen()

    async def _gen(self) -> AsyncIterator[dict[str, Any]]:
        for ev in self._events:
            yield ev
        raise _Done

    async def aclose(self) -> None:
        return None


class _Done(Exception):
    pass


class _Client:
    """events.list resolves a label to the instance's id, as the daemon does."""

    def __init__(self, live: list[dict[str, Any]]) -> None:
        self.live = live

    async def open_events(self) -> _Stream:
        return _Stream(self.live)

    async def call(self, method: str, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        assert method == "events.list"
        assert params["entity_id"] in ("gpuwarden-main-de38ba3c", "i-abc")
        return [{"id": 1, "entity_id": "i-abc", "name": "state"}]


async def test_following_a_label_shows_the_new_events_of_its_instance() -> None:
    """The stream carries ids only: the label is resolved once, then new events match."""
    live = [
        {"id": 2, "entity_id": "i-other", "name": "state"},
        {"id": 3, "entity_id": "i-abc", "name": "activity"},
    ]
    shown: list[Any] = []
    with pytest.raises(_Done):
        await follow(
            _Client(live),  # type: ignore[arg-type]
            Out(False),
            {"entity_id": "gpuwarden-main-de38ba3c"},
            "gpuwarden-main-de38ba3c",
            lambda _out, ev: shown.append(ev["id"]),
        )
    assert shown == [1, 3]
