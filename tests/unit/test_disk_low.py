"""The state dir's free space (issue 17, item 3): a warning while it is under
daemon.low_disk_mb, repeated at most every ten minutes, and a note once it recovers; the
reconciler checks it on every pass."""

from __future__ import annotations

from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

from structlog.testing import capture_logs
from tests.conftest import MakeApp

from gpuwarden.config.settings import Settings
from gpuwarden.core.clock import FakeClock
from gpuwarden.loops.reconciler import Reconciler
from gpuwarden.system.disk import LowDiskWarning, free_bytes

MB = 1_000_000


def events(logs: list[MutableMapping[str, Any]]) -> list[Any]:
    return [e["event"] for e in logs if str(e["event"]).startswith("state_disk")]


def test_low_disk_warns_once_then_every_ten_minutes_and_says_when_it_recovers(
    tmp_path: Path,
) -> None:
    watch = LowDiskWarning()
    with capture_logs() as logs:
        assert watch.check(tmp_path, 500 * MB, now=0.0, free=100 * MB)
        assert watch.check(tmp_path, 500 * MB, now=599.0, free=90 * MB)  # said already
        assert watch.check(tmp_path, 500 * MB, now=600.0, free=80 * MB)
        assert not watch.check(tmp_path, 500 * MB, now=601.0, free=900 * MB)
        assert not watch.check(tmp_path, 500 * MB, now=602.0, free=900 * MB)
    assert events(logs) == ["state_disk_low", "state_disk_low", "state_disk_ok"]
    assert logs[0]["free_mb"] == 100.0 and logs[0]["floor_mb"] == 500.0
    assert logs[0]["log_level"] == "warning"


def test_a_floor_of_zero_never_warns_and_the_real_disk_is_measured(tmp_path: Path) -> None:
    assert not LowDiskWarning().check(tmp_path, 0, now=0.0, free=0)
    free = free_bytes(tmp_path)
    assert free is not None and free > 0
    assert free_bytes(tmp_path / "no" / "such") is None


async def test_the_reconciler_warns_while_the_state_disk_is_low(
    tmp_path: Path, make_app: MakeApp, clock: FakeClock
) -> None:
    # A floor far above any real disk's free space: every pass finds it low.
    settings = Settings(daemon={"state_dir": str(tmp_path), "low_disk_mb": 1e15})
    app = await make_app(settings, clock)
    with capture_logs() as logs:
        await Reconciler(app).pass_once()
    [low] = [e for e in logs if e["event"] == "state_disk_low"]
    assert low["path"] == str(tmp_path)
