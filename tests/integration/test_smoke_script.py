"""deploy/smoke.sh, the installed package's smoke test that CI runs on a freshly built and
installed wheel (.ci/run). Here it runs against this venv's `gpuwarden` (--gpuwarden), so
that the script itself is checked in every `make test`: the example config, a daemon on the
sim cloud, one job to a PNG, SIGTERM and exit 0; and it says plainly when something fails."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "smoke.sh"
GPUWARDEN = Path(sys.executable).with_name("gpuwarden")


def smoke(tmpdir: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUWARDEN_")}
    env["TMPDIR"] = str(tmpdir)  # its work directory goes here, not into /tmp
    return subprocess.run(
        ["bash", str(SCRIPT), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


@pytest.mark.slow
def test_the_smoke_test_runs_a_job_and_stops_cleanly(short_dir: Path) -> None:
    result = smoke(short_dir, "--gpuwarden", GPUWARDEN)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    for said in ("the example config is valid", "answers on its socket", "PNG", "exit 0", "ok"):
        assert said in out, (said, out)
    assert list(short_dir.iterdir()) == []  # its work directory is gone


@pytest.mark.slow
def test_the_smoke_test_fails_plainly_when_the_daemon_cannot_start(short_dir: Path) -> None:
    broken = short_dir / "gpuwarden"
    broken.write_text('#!/bin/sh\n[ "$1" = check-config ] && exit 0\necho boom >&2\nexit 3\n')
    broken.chmod(0o755)
    result = smoke(short_dir, "--gpuwarden", broken)
    assert result.returncode == 1
    assert "FAILED: the daemon died at start-up" in result.stderr
    assert "boom" in result.stderr
    assert [p.name for p in short_dir.iterdir()] == ["gpuwarden"]


def test_an_unknown_option_is_refused(tmp_path: Path) -> None:
    result = smoke(tmp_path, "--frobnicate")
    assert result.returncode == 1
    assert "unknown option '--frobnicate'" in result.stderr
