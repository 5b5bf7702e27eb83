"""Checking what an instance reports (its `result.json`, its progress lines) before anything
in it is acted on.

The instance is not trusted: a broken runner, a full disk over there or a hostile host can
write anything. A result is refused as a whole (the job fails with the reason, and the
instance is given back) unless every entry names one plain file by a safe name, once, with
a sha256 and a size within the cap, and there are no more entries than images asked for.
Names are never taken as paths: a name that is not its own basename is refused, not cut
down, so nothing an instance says can point outside the job's output directory.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Our own files in the job's output directory: an image may not take their names.
RESERVED = frozenset({"result.json"})
MAX_NAME = 128
_SHA256 = re.compile(r"[0-9a-f]{64}")
# After a dropped connection the runner waits before the next try, doubling up to this
# (seconds), so an instance that fails every call costs a log line now and then, not a core.
MAX_DROP_BACKOFF = 30.0
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
# The largest progress step or total taken from an instance (far above any job's steps times
# images; a larger number would not fit the database's integer).
MAX_COUNT = 1_000_000_000


class BadResult(Exception):
    """The instance's result.json cannot be trusted; the message says why."""


@dataclass(frozen=True, slots=True)
class ResultFile:
    name: str
    sha256: str
    size: int | None  # as the runner reported it; checked again against the download


def parse_result(
    raw: bytes, *, max_files: int, max_bytes: int
) -> tuple[dict[str, Any], list[ResultFile]]:
    """The result as a dict and its checked file entries; BadResult when any part is off."""
    try:
        result = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadResult(f"result.json is not JSON: {exc}") from None
    if not isinstance(result, dict):
        raise BadResult("result.json is not a JSON object")
    entries = result.get("files", [])
    if not isinstance(entries, list):
        raise BadResult("result.json: files is not a list")
    if not entries:
        raise BadResult("result.json names no image")
    if len(entries) > max_files:
        raise BadResult(
            f"result.json names {len(entries)} files; at most {max_files} were asked for"
        )
    files: list[ResultFile] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        checked = _entry(entry, index, max_bytes)
        if checked.name in seen:
            raise BadResult(f"result.json names {checked.name!r} twice")
        seen.add(checked.name)
        files.append(checked)
    return result, files


def _entry(entry: Any, index: int, max_bytes: int) -> ResultFile:
    if not isinstance(entry, dict):
        raise BadResult(f"result.json: files[{index}] is not an object")
    name = entry.get("name")
    if not isinstance(name, str):
        raise BadResult(f"result.json: files[{index}].name is not a string")
    if not safe_name(name):
        raise BadResult(
            f"result.json: files[{index}].name {name[:MAX_NAME]!r} is not a plain file name"
        )
    sha = entry.get("sha256")
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        raise BadResult(f"result.json: files[{index}].sha256 is not a sha256")
    size = entry.get("bytes")
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise BadResult(f"result.json: files[{index}].bytes is not a size")
        if size > max_bytes:
            raise BadResult(
                f"result.json: {name} is {size} bytes, over the cap of {max_bytes} "
                "(jobs.max_image_mb)"
            )
    return ResultFile(name, sha, size)


def safe_name(name: str) -> bool:
    """A name that is one plain file in one directory: letters, digits, `_`, `.` and `-`,
    not starting with a dot (no `.`, `..` or hidden files, which is where downloads are
    staged), no separator or NUL, not one of our own files, and short."""
    return (
        0 < len(name) <= MAX_NAME
        and _SAFE_NAME.fullmatch(name) is not None
        and name not in RESERVED
    )


def drop_backoff(drops: int, poll: float) -> float:
    """Seconds to wait after the `drops`-th dropped connection in a row: the poll interval,
    doubled each time, at most MAX_DROP_BACKOFF."""
    return float(min(MAX_DROP_BACKOFF, max(poll, 0.1) * 2 ** min(drops - 1, 16)))


def max_image_bytes(mb: float) -> int:
    return int(mb * 1_000_000)


def first_use_seconds(
    result: Mapping[str, Any], ceiling_s: float
) -> tuple[dict[str, float], list[str]]:
    """What the job spent on the machine's first use: installing the engine (`setup_s`) and
    downloading the model (`download_s`), each as setup_seconds reads it, the two together at
    most `ceiling_s` (the hard cap: no instance lives longer, so no setup on one took longer;
    a larger figure would inflate every cold-start estimate after it). Also what was not taken
    as reported, one line each, for the log."""
    seconds: dict[str, float] = {}
    doubts: list[str] = []
    left = max(0.0, ceiling_s)
    for key in ("setup_s", "download_s"):
        raw = result.get(key)
        value = setup_seconds(result, key)
        if raw is not None and value == 0.0 and raw != 0:
            doubts.append(f"{key}={_shown(raw)} is not a number of seconds: counted as 0")
        elif value > left:
            doubts.append(f"{key}={_shown(raw)} is over the {left:g} s it could be: counted so")
            value = left
        seconds[key] = value
        left -= value
    return seconds, doubts


def finite_only(value: Any) -> Any:
    """`value` (parsed JSON) with every NaN or infinite number made None: Python's json reads
    them (NaN, Infinity, 1e999), but they are not JSON, and what is kept is shown as JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_only(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_only(v) for v in value]
    return value


def progress_count(value: Any) -> int | None:
    """A progress line's `step` or `total` when it is a count (an int from 0 to MAX_COUNT,
    not a bool); None otherwise: the line is then skipped, not taken."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
        return None
    return int(value)


def _shown(value: Any) -> str:
    return repr(value)[:40]


def setup_seconds(result: Mapping[str, Any], key: str = "setup_s") -> float:
    """The seconds the runner spent installing its engine (result.json's `setup_s`) or, with
    key="download_s", downloading the model; 0.0 when it did nothing of the kind, or from a
    runner too old to say, or from a value that is not a number of seconds (the instance's
    answer is not trusted to be well formed)."""
    value = result.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    return float(value) if math.isfinite(value) and value > 0 else 0.0
