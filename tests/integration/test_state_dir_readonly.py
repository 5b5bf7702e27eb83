"""A state directory the daemon cannot write (issue 17, item 9): `gpuwarden run` exits 1
(start-up failed, as the README's table says) with a message naming the directory and the
reason, and no traceback. A read-only bind mount makes it unwritable even for root (CI runs
as root, where file modes do not stop anything); a state dir that is a file needs nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from tests.conftest import daemon_env, unavailable

pytestmark = pytest.mark.slow


def config(tmp_path: Path, state: Path) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(
        f'[daemon]\nstate_dir = "{state}"\nsocket = "{tmp_path / "c.sock"}"\n'
        "[providers.sim]\nenabled = false\n"
    )
    return path


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, env=daemon_env(), capture_output=True, text=True, timeout=60, check=False
    )


def assert_refused_clearly(got: subprocess.CompletedProcess[str], state: Path, why: str) -> None:
    assert got.returncode == 1, got.stderr
    assert f"cannot use the state directory {state}" in got.stderr
    assert why in got.stderr
    assert "Traceback" not in got.stderr + got.stdout
    events = [json.loads(line) for line in got.stdout.splitlines() if line.startswith("{")]
    [failed] = [e for e in events if e["event"] == "state_dir_unusable"]
    assert failed["level"] == "error" and "exception" not in failed


NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
READ_ONLY_BIND = 'mount --bind -o ro "$1" "$1" && shift && exec "$@"'


def unwritable(state: Path) -> tuple[list[str], str] | str:
    """A command prefix under which `state` cannot be written, and the reason the daemon
    will meet; or why neither way works here. First a private read-only bind mount (unwritable
    even for root), else the daemon as user nobody on a directory of mode 0555."""
    if shutil.which("unshare") is not None:
        probe = run(["unshare", "--mount", "--propagation", "private", "true"])
        if probe.returncode == 0:
            prefix = ["unshare", "--mount", "--propagation", "private", "sh", "-c"]
            return [*prefix, READ_ONLY_BIND, "sh", str(state)], "Read-only file system"
        mount = f"unshare --mount is refused ({probe.stderr.strip()})"
    else:
        mount = "unshare (util-linux) is not installed"
    if shutil.which("setpriv") is not None and os.geteuid() == 0:
        state.chmod(0o555)
        top = Path(tempfile.gettempdir())
        for part in state.parents:  # user nobody must reach the config beside it
            if part.is_relative_to(top) and part != top:
                part.chmod(0o755)
        probe = run([*NOBODY, sys.executable, "-c", "pass"])
        if probe.returncode == 0:
            return NOBODY, "Permission denied"
        return f"{mount}, and user nobody cannot run {sys.executable}"
    return f"{mount}, and there is no setpriv or we are not root to drop to user nobody"


def test_a_read_only_state_dir_is_a_clear_start_up_failure(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    cfg = config(tmp_path, state)
    way = unwritable(state)
    if isinstance(way, str):
        unavailable(way)
    prefix, why = way
    got = run([*prefix, sys.executable, "-m", "gpuwarden", "run", "--config", str(cfg)])
    assert_refused_clearly(got, state, why)
    assert list(state.iterdir()) == []


def test_a_state_dir_that_is_a_file_is_a_clear_start_up_failure(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.write_text("not a directory")
    got = run([sys.executable, "-m", "gpuwarden", "run", "--config", str(config(tmp_path, state))])
    assert_refused_clearly(got, state, "File exists")
    assert state.read_text() == "not a directory"
