"""Vast's query language as the sim evaluates it: `{"field": {"op": value}}` filters with
eq/neq/gt/gte/lt/lte/in/notin (numeric strings coerced, as the server does for the CLI),
`order` lists, and the keyset paging tokens of GET /api/v1/instances/."""

from __future__ import annotations

import base64
import binascii
import functools
import json
from collections.abc import Callable, Sequence
from typing import Any

OPS = ("eq", "neq", "gt", "gte", "lt", "lte", "in", "notin")


class QueryError(ValueError):
    pass


def _coerce(value: Any, like: Any) -> Any:
    """Make a filter value comparable with the field's value (CLI sends numbers as strings)."""
    if isinstance(like, bool):
        if isinstance(value, str):
            return value.strip().lower() in ("true", "1", "yes")
        return bool(value)
    if isinstance(like, int | float) and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _compare(op: str, have: Any, arg: Any) -> bool:  # noqa: PLR0911 - one per operator
    if op in ("in", "notin"):
        if not isinstance(arg, list):
            raise QueryError(f"operator {op!r} needs a list")
        hit = any(_compare("eq", have, a) for a in arg)
        return hit if op == "in" else not hit
    arg = _coerce(arg, have)
    if op == "eq":
        return bool(have == arg)
    if op == "neq":
        return bool(have != arg)
    if have is None:
        return False
    try:
        if op == "gt":
            return bool(have > arg)
        if op == "gte":
            return bool(have >= arg)
        if op == "lt":
            return bool(have < arg)
        return bool(have <= arg)  # lte
    except TypeError:
        raise QueryError(f"cannot compare {have!r} with {arg!r}") from None


def matches(
    row: dict[str, Any], filters: dict[str, Any], value_of: Callable[[dict[str, Any], str], Any]
) -> bool:
    """All filters hold for `row`. A field the row does not have is not filtered on."""
    for name, cond in filters.items():
        conds = cond if isinstance(cond, dict) else {"eq": cond}
        for op in conds:
            if op not in OPS:
                raise QueryError(f"unknown operator {op!r} for {name!r}")
        have = value_of(row, name)
        if have is _MISSING:
            continue
        for op, arg in conds.items():
            if not _compare(op, have, arg):
                return False
    return True


_MISSING = object()


def offer_value(offer: dict[str, Any], name: str) -> Any:
    """A search filter's field in an offer. `verified` is a filter over `verification`,
    `geolocation` filters by 2-letter country code, GPU names accept RTX_4090 for RTX 4090."""
    if name == "verified":
        return offer["verification"] == "verified"
    if name == "geolocation":
        return country(offer["geolocation"])
    if name == "gpu_name":
        return _GpuName(offer["gpu_name"])
    if name == "reliability":
        return offer.get("reliability2", offer.get("reliability"))
    return offer.get(name, _MISSING)


def instance_value(inst: dict[str, Any], name: str) -> Any:
    return inst.get(name, _MISSING)


class _GpuName(str):
    """A GPU name that equals its underscored CLI spelling."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, str):
            return self.replace("_", " ").lower() == other.replace("_", " ").lower()
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    __hash__ = str.__hash__


def country(geolocation: str) -> str:
    return geolocation.rsplit(",", 1)[-1].strip()


def _cmp_values(a: Any, b: Any) -> int:
    if a == b:
        return 0
    if a is None:
        return -1
    if b is None:
        return 1
    try:
        return -1 if a < b else 1
    except TypeError:
        return -1 if str(a) < str(b) else 1


def order_key(directives: Sequence[tuple[str, bool]]) -> Callable[[dict[str, Any]], Any]:
    """A sort key for (field, descending) directives, then id ascending as the tie-breaker."""

    def cmp(x: dict[str, Any], y: dict[str, Any]) -> int:
        for name, desc in directives:
            c = _cmp_values(x.get(name), y.get(name))
            if c:
                return -c if desc else c
        return _cmp_values(x.get("id"), y.get("id"))

    return functools.cmp_to_key(cmp)


def parse_offer_order(order: Any) -> list[tuple[str, bool]]:
    if order is None:
        return [("score", True)]
    if not isinstance(order, list):
        raise QueryError("order must be a list of [field, 'asc'|'desc']")
    out = []
    for item in order:
        if isinstance(item, str):
            out.append((item.lstrip("-"), item.startswith("-")))
        elif isinstance(item, list | tuple) and item and isinstance(item[0], str):
            direction = str(item[1]).lower() if len(item) > 1 else "asc"
            out.append((item[0], direction == "desc"))
        else:
            raise QueryError(f"bad order entry {item!r}")
    return out


def parse_instance_order(raw: str | None) -> list[tuple[str, bool]]:
    if not raw:
        return [("id", False)]
    try:
        items = json.loads(raw)
    except json.JSONDecodeError:
        raise QueryError("order_by is not JSON") from None
    if not isinstance(items, list):
        raise QueryError("order_by must be a JSON array")
    out = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("col"), str):
            raise QueryError(f"bad order_by entry {item!r}")
        out.append((item["col"], str(item.get("dir", "asc")).lower() == "desc"))
    return out


def encode_token(row: dict[str, Any], directives: Sequence[tuple[str, bool]]) -> str:
    values = {name: row.get(name) for name, _ in directives}
    values["id"] = row.get("id")
    return base64.b64encode(json.dumps({"values": values}).encode()).decode()


def decode_token(token: str) -> dict[str, Any]:
    try:
        data = json.loads(base64.b64decode(token, validate=True))
        values = data["values"]
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise QueryError("invalid after_token") from None
    if not isinstance(values, dict):
        raise QueryError("invalid after_token")
    return values


def page_after(
    rows: list[dict[str, Any]],
    directives: Sequence[tuple[str, bool]],
    token: str | None,
    limit: int,
) -> tuple[list[dict[str, Any]], str | None]:
    """Keyset paging: the `limit` rows after the token's row in sort order, and the next token."""
    key = order_key(directives)
    ordered = sorted(rows, key=key)
    if token:
        after = key(decode_token(token))
        ordered = [r for r in ordered if key(r) > after]
    page = ordered[:limit]
    more = len(ordered) > limit
    return page, (encode_token(page[-1], directives) if more and page else None)
