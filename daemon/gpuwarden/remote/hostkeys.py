"""Who is who over SSH: the instance's host key (trusted on first use, then pinned), the
known_hosts file the daemon writes for `gpuwarden ssh`, and the operators' public keys put
into an instance's ~/.ssh/authorized_keys.

Rented hosts are new to us, so the first key an instance shows is taken as its own and kept
in the instance's `extra` ("host_key"); every later connection (the watchdog's, the jobs
runner's, the operator's `gpuwarden ssh` through the known_hosts file) must see that same
key. A different key is a failed connection, not a new truth.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import asyncssh
import structlog

from gpuwarden.remote.ssh import read_file, write_file

if TYPE_CHECKING:
    from gpuwarden.config.settings import Settings

log = structlog.get_logger(__name__)

AUTHORIZED_KEYS = ".ssh/authorized_keys"  # relative to the login home, as SFTP sees it


def known_hosts_path(settings: Settings) -> Path:
    """<state_dir>/known_hosts: the host keys of live instances as first seen, which the
    daemon writes and `gpuwarden ssh` checks against."""
    return settings.daemon.state_dir / "known_hosts"


def key_material(line: str) -> str:
    """'ssh-ed25519 AAAA... comment' -> 'ssh-ed25519 AAAA...': comments do not identify keys."""
    return " ".join(line.split()[:2])


def server_host_key(conn: asyncssh.SSHClientConnection) -> str | None:
    """The host key the server showed on this connection, as 'type base64'."""
    key = conn.get_server_host_key()
    if key is None:
        return None
    return key_material(key.export_public_key().decode())


def fingerprint(host_key: str) -> str:
    """The SHA256 fingerprint OpenSSH prints for a key ('SHA256:...')."""
    return str(asyncssh.import_public_key(host_key).get_fingerprint("sha256"))


def known_hosts_line(host: str, port: int, host_key: str) -> str:
    """One known_hosts line in OpenSSH's form: a host on a port other than 22 is [host]:port."""
    name = host if port == 22 else f"[{host}]:{port}"
    return f"{name} {key_material(host_key)}"


def write_known_hosts(path: Path, entries: Iterable[tuple[str, int, str]]) -> None:
    """Write (host, port, host key) entries as a known_hosts file, whole and at once (through
    a temporary name and a rename). Mode 0644: host keys are public, and operators in the
    state directory's group read it for `gpuwarden ssh`."""
    text = "".join(known_hosts_line(h, p, k) + "\n" for h, p, k in sorted(set(entries)))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.chmod(0o644)
    os.replace(tmp, path)


def keys_digest(keys: Sequence[str]) -> str:
    """A short digest of a set of public keys: the instance keeps the digest of the keys put
    on it, so a changed `ssh.authorized_keys` is put on again and an unchanged one is not."""
    joined = "\n".join(sorted(key_material(k) for k in keys))
    return hashlib.sha256(joined.encode()).hexdigest()[:16]


def merged_authorized_keys(current: str, keys: Sequence[str]) -> str | None:
    """`current` (an authorized_keys file) with each of `keys` that is missing appended, or
    None when all are there already. Lines already present are kept as they are."""
    present = {key_material(line) for line in current.splitlines() if line.strip()}
    missing = [k.strip() for k in keys if key_material(k) not in present]
    if not missing:
        return None
    head = current if not current or current.endswith("\n") else current + "\n"
    return head + "".join(k + "\n" for k in dict.fromkeys(missing))


async def install_authorized_keys(conn: asyncssh.SSHClientConnection, keys: Sequence[str]) -> int:
    """Append the missing `keys` to the login's ~/.ssh/authorized_keys over SFTP (no shell, so
    no key text meets a command line); returns how many were added."""
    data = await read_file(conn, AUTHORIZED_KEYS)
    current = data.decode("utf-8", "replace") if data else ""
    merged = merged_authorized_keys(current, keys)
    if merged is None:
        return 0
    await write_file(conn, AUTHORIZED_KEYS, merged.encode())
    before = {key_material(line) for line in current.splitlines() if line.strip()}
    return len({key_material(k) for k in keys} - before)


async def ensure_authorized_keys(
    conn: asyncssh.SSHClientConnection, keys: Sequence[str], have: str | None
) -> str | None:
    """Put `keys` on the instance unless `have` (the digest of what it was given last) says it
    has them; returns the digest of what it has now, or None when there are no keys or the
    copy failed (tried again at the next probe: a host that refuses SFTP is not unhealthy)."""
    digest = keys_digest(keys) if keys else None
    if digest is None or digest == have:
        return digest
    try:
        await install_authorized_keys(conn, keys)
    except (OSError, asyncssh.Error) as exc:
        log.warning("authorized_keys_not_installed", error=str(exc))
        return None
    return digest
