"""The runner's remote side: `Connector` -> `RemoteConn`, the port the job runner drives (unit
tests give it a hand-written fake), and `SshConnector`, the real one over asyncssh
(remote/ssh.py), pinned to the host key the instance showed first (remote/hostkeys.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import asyncssh

from gpuwarden.core.model import Instance
from gpuwarden.remote import ssh as remote


class RemoteConn(Protocol):
    """One connection to an instance; paths are relative to the login home."""

    async def write(self, rel: str, data: bytes) -> None: ...
    async def read(self, rel: str) -> bytes | None: ...
    async def start(self, job_dir: str, argv: list[str]) -> None: ...
    async def status(self, job_dir: str) -> remote.RemoteStatus: ...
    async def wait_end(self, job_dir: str, seconds: float) -> bool: ...
    async def kill(self, job_dir: str) -> None: ...
    async def tail(self, rel: str, offset: int) -> tuple[list[str], int]: ...
    async def get(self, rel: str, local: Path, max_bytes: int) -> None: ...
    async def close(self) -> None: ...


class Connector(Protocol):
    async def connect(self, inst: Instance) -> RemoteConn: ...


@dataclass
class SshConn:
    conn: asyncssh.SSHClientConnection
    timeout: float

    async def write(self, rel: str, data: bytes) -> None:
        await remote.write_file(self.conn, rel, data)

    async def read(self, rel: str) -> bytes | None:
        return await remote.read_file(self.conn, rel)

    async def start(self, job_dir: str, argv: list[str]) -> None:
        await remote.start_detached(self.conn, job_dir, argv, timeout=self.timeout)

    async def status(self, job_dir: str) -> remote.RemoteStatus:
        return await remote.job_status(self.conn, job_dir, timeout=self.timeout)

    async def wait_end(self, job_dir: str, seconds: float) -> bool:
        return await remote.wait_job_end(self.conn, job_dir, seconds, timeout=self.timeout)

    async def kill(self, job_dir: str) -> None:
        await remote.kill(self.conn, f"{job_dir}/pid", timeout=self.timeout)

    async def tail(self, rel: str, offset: int) -> tuple[list[str], int]:
        return await remote.tail_progress(self.conn, rel, offset)

    async def get(self, rel: str, local: Path, max_bytes: int) -> None:
        await remote.download(self.conn, rel, local, max_bytes=max_bytes)

    async def close(self) -> None:
        self.conn.close()


@dataclass
class SshConnector:
    key: asyncssh.SSHKey
    connect_timeout: float
    known_hosts: Path | None = None

    async def connect(self, inst: Instance) -> RemoteConn:
        if not inst.ssh_host or not inst.ssh_port:
            raise ConnectionError(f"instance {inst.id} has no SSH endpoint yet")
        target = remote.SshTarget(inst.ssh_host, inst.ssh_port, inst.ssh_user)
        conn = await remote.connect(
            target,
            self.key,
            timeout=self.connect_timeout,
            known_hosts=self.known_hosts,
            host_key=inst.extra.get("host_key"),
        )
        return SshConn(conn, timeout=max(30.0, self.connect_timeout))
