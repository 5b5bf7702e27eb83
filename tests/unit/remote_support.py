"""A stand-in for an instance on this machine: `LocalShell` runs remote commands as an SSH
exec would (`<login shell> -c <command>` in the login home), and `LocalConn` is the runner's
RemoteConn on top of it, with plain files for what goes over SFTP. So the real detached-job
scripts and the real job runner (txt2img.py, preview engine) run without an SSH server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import processes_with

from gpuwarden.core.model import Instance
from gpuwarden.remote import ssh as remote

# What the detached-job scripts need on PATH, beyond `sh`.
JOB_TOOLS = ("setsid", "nohup", "mkdir", "rm", "mv", "cat", "cut", "sleep")


@dataclass
class Completed:
    exit_status: int | None
    stdout: str
    stderr: str


@dataclass
class LocalShell:
    """Quacks like asyncssh's connection for `run`: SHELL -c COMMAND with HOME=home, and
    PATH = `path` (this process's PATH if None)."""

    home: Path
    commands: list[str] = field(default_factory=list)
    shell: str = "bash"
    path: str | None = None
    banner: str = ""  # printed first, as a chatty login shell or its rc files would

    async def run(self, command: str, *, check: bool = False, timeout: float | None = None) -> Any:
        self.commands.append(command)
        if self.banner:
            command = f"printf '%s\\n' {shlex.quote(self.banner)}\n{command}"
        env = {"PATH": self.path or os.environ["PATH"], "HOME": str(self.home)}
        proc = await asyncio.create_subprocess_exec(
            self.shell,
            "-c",
            command,
            cwd=self.home,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()  # as asyncssh closes the channel of a command past its timeout
            await proc.communicate()  # its pipes end with its last child (a check's sleep)
            raise
        return Completed(proc.returncode, out.decode(), err.decode())


def bare_path(bin_dir: Path, *extra: str) -> str:
    """A PATH of one directory holding links to `sh` and the job tools only (and `extra`),
    as on an instance whose Python is not on the SSH session's PATH."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in ("sh", *JOB_TOOLS, *extra):
        found = shutil.which(name)
        assert found is not None, f"{name} is not installed here"
        if not (bin_dir / name).exists():
            (bin_dir / name).symlink_to(found)
    return str(bin_dir)


async def wait_all_gone(marker: str, timeout: float = 5.0) -> None:
    """Wait until no live process carries `marker` (TimeoutError after `timeout` seconds)."""
    async with asyncio.timeout(timeout):
        while processes_with(marker):
            await asyncio.sleep(0.05)


def kill_leftovers(marker: str) -> None:
    """SIGKILL the processes carrying `marker` (what a test started), so a failure leaks none."""
    for pid in processes_with(marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@dataclass
class LocalConn:
    """The runner's RemoteConn on a LocalShell: commands through the real scripts, files
    directly in the shell's home."""

    shell: LocalShell
    timeout: float = 10.0

    def _path(self, rel: str) -> Path:
        return self.shell.home / rel

    @property
    def _conn(self) -> Any:
        return self.shell  # stands in for an asyncssh connection

    async def write(self, rel: str, data: bytes) -> None:
        path = self._path(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(path.name + ".part")
        part.write_bytes(data)
        part.replace(path)

    async def read(self, rel: str) -> bytes | None:
        path = self._path(rel)
        return path.read_bytes() if path.is_file() else None

    async def start(self, job_dir: str, argv: list[str]) -> None:
        await remote.start_detached(self._conn, job_dir, argv, timeout=self.timeout)

    async def status(self, job_dir: str) -> remote.RemoteStatus:
        return await remote.job_status(self._conn, job_dir, timeout=self.timeout)

    async def wait_end(self, job_dir: str, seconds: float) -> bool:
        return await remote.wait_job_end(self._conn, job_dir, seconds, timeout=self.timeout)

    async def kill(self, job_dir: str) -> None:
        await remote.kill(self._conn, f"{job_dir}/pid", timeout=self.timeout)

    async def tail(self, rel: str, offset: int) -> tuple[list[str], int]:
        path = self._path(rel)
        if not path.is_file():
            return [], offset
        data = path.read_bytes()[offset:]
        end = data.rfind(b"\n")
        if end < 0:
            return [], offset
        return data[: end + 1].decode().splitlines(), offset + end + 1

    async def get(self, rel: str, local: Path, max_bytes: int) -> None:
        if self._path(rel).stat().st_size > max_bytes:
            raise remote.DownloadRefused(f"{rel} is over {max_bytes} bytes")
        shutil.copyfile(self._path(rel), local)

    async def close(self) -> None:
        return None


@dataclass
class LocalConnector:
    shell: LocalShell

    async def connect(self, inst: Instance) -> LocalConn:
        return LocalConn(self.shell)
