"""The detached-job scripts of remote/ssh.py, run for real under bash in a temporary HOME
(standing in for an SSH exec, which runs `bash -c <command>` in the login home): start,
status, kill, and the quoting of argument lists."""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gpuwarden.remote import ssh as remote


@dataclass
class Completed:
    exit_status: int | None
    stdout: str
    stderr: str


@dataclass
class LocalShell:
    """Quacks like asyncssh's connection for `run`: bash -c COMMAND with HOME=home."""

    home: Path
    commands: list[str]

    async def run(self, command: str, *, check: bool = False, timeout: float | None = None) -> Any:
        self.commands.append(command)
        env = {"PATH": os.environ["PATH"], "HOME": str(self.home)}
        proc = await asyncio.create_subprocess_exec(
            "bash",
            "-c",
            command,
            cwd=self.home,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
        return Completed(proc.returncode, out.decode(), err.decode())


async def wait_status(shell: Any, job_dir: str, want: str) -> remote.RemoteStatus:
    async with asyncio.timeout(10):
        while True:
            st = await remote.job_status(shell, job_dir, timeout=5)
            if st.state == want:
                return st
            await asyncio.sleep(0.05)


def test_parse_status() -> None:
    assert remote.parse_status("running\n") == remote.RemoteStatus("running")
    assert remote.parse_status("exited 3\n") == remote.RemoteStatus("exited", 3)
    assert remote.parse_status("exited x") == remote.RemoteStatus("dead")
    assert remote.parse_status("absent") == remote.RemoteStatus("absent")
    with pytest.raises(remote.RemoteCommandError):
        remote.parse_status("")
    with pytest.raises(remote.RemoteCommandError):
        remote.parse_status("banner text")


async def test_a_detached_job_records_its_pid_output_and_exit_code(tmp_path: Path) -> None:
    shell: Any = LocalShell(tmp_path, [])  # stands in for an asyncssh connection
    job_dir = ".gpuwarden/jobs/j1"
    assert (await remote.job_status(shell, job_dir, timeout=5)).state == "absent"
    hostile = ["'; touch pwned; '", "$(touch pwned)", "`touch pwned`", "a b\nc"]
    code = "import sys, json; print(json.dumps(sys.argv[1:])); sys.exit(3)"
    await remote.start_detached(
        shell,
        job_dir,
        [sys.executable, "-c", code, *hostile],
        timeout=5,
    )
    st = await wait_status(shell, job_dir, "exited")
    assert st.exit_code == 3
    box = tmp_path / job_dir
    assert box.joinpath("pid").read_text().strip().isdigit()
    import json

    assert json.loads(box.joinpath("log").read_text()) == hostile  # arrived unchanged
    assert list(tmp_path.rglob("pwned")) == []


async def test_kill_ends_the_whole_process_group(tmp_path: Path) -> None:
    shell: Any = LocalShell(tmp_path, [])  # stands in for an asyncssh connection
    job_dir = ".gpuwarden/jobs/j2"
    await remote.start_detached(shell, job_dir, ["sleep", "60"], timeout=5)
    await wait_status(shell, job_dir, "running")
    pid = int((tmp_path / job_dir / "pid").read_text())
    assert await remote.is_alive(shell, f"{job_dir}/pid", timeout=5)
    await remote.kill(shell, f"{job_dir}/pid", timeout=10)
    st = await wait_status(shell, job_dir, "dead")  # killed: no exit code was written
    assert st.exit_code is None
    assert not await remote.is_alive(shell, f"{job_dir}/pid", timeout=5)
    assert gone_or_zombie(pid)


def gone_or_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except (OSError, IndexError):
        return True


async def test_start_returns_at_once_while_the_job_runs(tmp_path: Path) -> None:
    """The detached command must not hold the SSH channel (its output goes elsewhere)."""
    shell: Any = LocalShell(tmp_path, [])  # stands in for an asyncssh connection
    job_dir = ".gpuwarden/jobs/j3"
    async with asyncio.timeout(3):
        await remote.start_detached(shell, job_dir, ["sleep", "30"], timeout=5)
    await wait_status(shell, job_dir, "running")
    await remote.kill(shell, f"{job_dir}/pid", timeout=10)
