"""The probe's count of interactive sessions where the host keeps no login records (utmp),
as in most containers: only terminals an SSH login holds count (sshd's session processes,
titled "sshd: USER@pts/N"), not every /dev/pts entry, or idle would never fire. The real
probe.sh runs under each `sh` there is here, with GPUWARDEN_PROBE_ROOT pointing it at a
made-up /proc, /dev/pts and /run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from gpuwarden.loops.watchdog import probe_script

SHELLS = [s for s in ("dash", "bash", "busybox") if shutil.which(s)]


def fake_host(root: Path, cmdlines: dict[int, str], terminals: int = 4) -> None:
    """A /proc with these command lines (`|` between arguments; the kernel shows them joined
    by NUL) and a /dev/pts with `terminals` entries."""
    pts = root / "dev" / "pts"
    pts.mkdir(parents=True)
    for n in range(terminals):
        (pts / str(n)).touch()
    (pts / "ptmx").touch()
    for pid, cmdline in cmdlines.items():
        d = root / "proc" / str(pid)
        d.mkdir(parents=True)
        (d / "cmdline").write_bytes(cmdline.replace("|", "\0").encode() + b"\0")


def sessions(tmp_path: Path, shell: str, extra_path: Path | None = None) -> int:
    argv = [shell, "sh"] if shell == "busybox" else [shell]
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    path = os.environ["PATH"] if extra_path is None else f"{extra_path}:{os.environ['PATH']}"
    env = {"PATH": path, "HOME": str(home), "GPUWARDEN_PROBE_ROOT": str(tmp_path / "root")}
    result = subprocess.run(
        [*argv, "-c", probe_script()],
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    count: int = json.loads(result.stdout.splitlines()[-1])["sessions"]
    return count


@pytest.mark.parametrize("shell", SHELLS)
def test_terminals_without_an_ssh_login_do_not_count(tmp_path: Path, shell: str) -> None:
    fake_host(
        tmp_path / "root",
        {
            1: "/bin/bash",  # the container's own tty
            40: "-bash",  # a login shell, e.g. in a multiplexer left running
            41: "tmux|new|-s|work",
            50: "/usr/sbin/sshd|-D",
            51: "sshd: root@notty",  # an exec channel like our own: no terminal
            52: "sshd: ubuntu [priv]",
        },
    )
    assert sessions(tmp_path, shell) == 0


@pytest.mark.parametrize("shell", SHELLS)
def test_each_terminal_an_ssh_login_holds_counts_once(tmp_path: Path, shell: str) -> None:
    fake_host(
        tmp_path / "root",
        {
            50: "/usr/sbin/sshd|-D",
            60: "sshd: ubuntu [priv]",
            61: "sshd: ubuntu@pts/1",
            62: "-bash",
            70: "sshd-session: root@pts/2,pts/3",  # OpenSSH 9.8+: two sessions, one connection
            71: "sshd-session: root@pts/3",  # the same terminal seen twice counts once
        },
    )
    assert sessions(tmp_path, shell) == 3


@pytest.mark.parametrize("shell", SHELLS)
def test_login_records_are_read_where_the_host_keeps_them(tmp_path: Path, shell: str) -> None:
    root = tmp_path / "root"
    fake_host(root, {61: "sshd: ubuntu@pts/1"})
    (root / "run").mkdir()
    (root / "run" / "utmp").write_bytes(b"\1" * 384)
    shims = tmp_path / "shims"
    shims.mkdir()
    who = shims / "who"
    who.write_text("#!/bin/sh\necho 'ubuntu pts/1'\necho 'ubuntu pts/4'\n")
    who.chmod(0o755)
    assert sessions(tmp_path, shell, extra_path=shims) == 2
