"""SSH to rented instances (asyncssh): the key, connecting, and (in later modules) running
detached commands, uploads, downloads and probes.

User text never enters a command line here: commands are argument lists quoted with
shlex.join, and prompts travel only inside JSON files sent over SFTP.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import asyncssh


@dataclass(frozen=True, slots=True)
class SshTarget:
    host: str
    port: int
    user: str = "root"


def load_or_create_key(pem: str | None, path: Path) -> tuple[asyncssh.SSHKey, str]:
    """The daemon's SSH key and its OpenSSH public line. Generated (ed25519, 0600) if absent."""
    if pem:
        key = asyncssh.import_private_key(pem)
    elif path.exists():
        key = asyncssh.read_private_key(str(path))
    else:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = asyncssh.generate_private_key("ssh-ed25519", comment="gpuwarden")
        path.write_bytes(key.export_private_key())
        path.chmod(0o600)
    public = key.export_public_key().decode().strip()
    return key, public


async def connect(
    target: SshTarget,
    key: asyncssh.SSHKey,
    *,
    timeout: float,
    known_hosts: Path | None = None,
) -> asyncssh.SSHClientConnection:
    """Open a connection. Rented hosts are new to us, so host keys are accepted unless a
    known_hosts file is configured."""
    return await asyncssh.connect(
        target.host,
        target.port,
        username=target.user,
        client_keys=[key],
        known_hosts=str(known_hosts) if known_hosts else None,
        connect_timeout=timeout,
        login_timeout=timeout,
        keepalive_interval=15,
    )
