"""Events as the control socket streams them (and as `gpuwarden events --json` prints them)."""

from __future__ import annotations

from datetime import UTC
from typing import Any

from pydantic_core import to_jsonable_python

from gpuwarden.core.model import EntityKind, Event


def event_json(ev: Event) -> dict[str, Any]:
    """An event as the socket streams it (and as `gpuwarden events --json` prints it)."""
    return {
        "id": ev.id,
        "at": ev.at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        "kind": ev.kind.value,
        "entity_id": ev.entity_id,
        "name": ev.name,
        "from_state": ev.from_state,
        "to_state": ev.to_state,
        "reason": ev.reason,
        "details": to_jsonable_python(ev.details, fallback=str),
    }


def lagged_json(dropped: int) -> dict[str, Any]:
    return {
        "id": None,
        "at": None,
        "kind": EntityKind.DAEMON.value,
        "entity_id": "control",
        "name": "lagged",
        "from_state": None,
        "to_state": None,
        "reason": None,
        "details": {"dropped": dropped},
    }
