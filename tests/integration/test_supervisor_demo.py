"""`make demo` works: the demo starts the daemon on config.example.toml in a temporary
state dir, sees it ready, and stops it cleanly, leaving nothing behind."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gpuwarden.cli import demo

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parents[2] / "config.example.toml"


async def test_the_demo_runs_end_to_end(capsys: pytest.CaptureFixture[str]) -> None:
    code = await demo.run_demo(EXAMPLE, verbose=False)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "The demo ran end to end." in out
    assert out.count("\n  ok ") == len(demo.STEPS)
    state = re.search(r"state dir (\S+)", out)
    assert state is not None
    assert not Path(state.group(1)).parent.exists()  # cleaned up


async def test_a_failing_step_stops_the_demo_and_says_so(
    capsys: pytest.CaptureFixture[str],
) -> None:
    async def broken(d: demo.Demo) -> str:
        raise demo.DemoFailed("the thing did not happen")

    steps = [demo.STEPS[1], demo.STEPS[2], ("Break", broken), demo.STEPS[-1]]
    code = await demo.run_demo(EXAMPLE, steps=steps, verbose=False)
    out = capsys.readouterr().out
    assert code == 1
    assert "FAILED: the thing did not happen" in out
    assert "not run" in out  # the steps after it are listed as skipped
