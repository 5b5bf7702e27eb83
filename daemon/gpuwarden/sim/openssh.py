"""One simulated instance served by a real OpenSSH `sshd` (`providers.sim.ssh = "openssh"`).

The asyncssh host (sshhost.py) runs every command as the sim's own user with bash; real
instances are OpenSSH with a login shell, privilege separation and internal-sftp. This host
starts one `sshd -D` per instance on its own loopback port, with its own config, host key and
authorized_keys in `<sandbox>/.gpuwarden-sim/sshd/`:

- the login is the user the provider's client logs in as (Vast `root`, Lambda `ubuntu`, which
  must exist on this machine); its HOME is the sandbox (sshd's `SetEnv`, which comes after
  the passwd home), and internal-sftp starts there (`-d`), so `cd ~` and relative SFTP paths
  land in the sandbox as on the asyncssh host;
- every session gets the instance's environment (GPUWARDEN_SIM_INSTANCE, ...), so that
  procs.py finds and kills the instance's processes, sshd's included, when it ends;
- the authorized keys are the account's at boot (sshd reads a file; a key registered after the
  boot is not seen, unlike the asyncssh host);
- no `who` shim: the real `who` (and the probe's own fallback) see sshd's sessions.

sshd needs root here (privilege separation, and logging in users other than its own); the
sim refuses the mode at start otherwise (`openssh_unavailable`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import socket
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import asyncssh
import structlog

from gpuwarden.sim.sshhost import SIM_DIR, prepare_sandbox

log = structlog.get_logger(__name__)

SSHD = Path("/usr/sbin/sshd")
PRIVSEP_DIR = Path("/run/sshd")  # sshd refuses to start without it
READY_TIMEOUT = 10.0
_LISTENING = b"Server listening on"


def unavailable_reason() -> str | None:
    """Why real sshd instances cannot run here, or None when they can."""
    if not SSHD.is_file():
        return f"{SSHD} is not installed (apt-get install openssh-server)"
    if os.geteuid() != 0:
        return "sshd serving other users needs root (privilege separation, logins as root/ubuntu)"
    return None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def base_config(
    *, port: int, host: str, host_key: Path, pid_file: Path, authorized: str | Path
) -> str:
    """The sshd_config lines every sshd of ours starts from: one loopback port, its own host
    key, pid file and authorized_keys (absolute paths; `authorized` may list several, as
    sshd's AuthorizedKeysFile does), key logins only, no PAM (no system
    login stack to depend on), and no StrictModes (the files sit in a sandbox or a test's
    temporary directory, not in a home sshd would check)."""
    return (
        f"Port {port}\n"
        f"ListenAddress {host}\n"
        f"HostKey {host_key}\n"
        f"PidFile {pid_file}\n"
        f"AuthorizedKeysFile {authorized}\n"
        "UsePAM no\n"
        "StrictModes no\n"
        "PermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "PubkeyAuthentication yes\n"
    )


def _quote(value: str) -> str:
    # sshd_config splits on whitespace outside double quotes and has no escape for them.
    if '"' in value or "\n" in value:
        raise ValueError(f"cannot pass {value!r} through sshd_config")
    return f'"{value}"'


class OpensshHost:
    """A real sshd for one instance: `start` binds a free loopback port; `stop` ends sshd
    (the sessions' processes are the caller's to kill, as with the asyncssh host)."""

    def __init__(
        self,
        *,
        instance_id: str,
        sandbox: Path,
        env: Mapping[str, str],
        host_key: asyncssh.SSHKey,
        authorized: Callable[[], Sequence[str]],
        user: str,
        host: str = "127.0.0.1",
    ) -> None:
        self.instance_id = instance_id
        self.sandbox = sandbox
        self.env = dict(env)
        self.user = user
        self._host_key = host_key
        self._authorized = authorized
        self._host = host
        self._proc: asyncio.subprocess.Process | None = None
        self._pump: asyncio.Task[None] | None = None
        self.port: int | None = None

    @property
    def listening(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    @property
    def sessions(self) -> int:
        return len(self._session_titles())

    @property
    def interactive_sessions(self) -> int:
        return sum(1 for title in self._session_titles() if "@pts/" in title)

    def _session_titles(self) -> list[str]:
        """sshd names each session's unprivileged process `sshd: <user>@<tty or notty>`."""
        if self._proc is None:
            return []
        titles = []
        for pid in _descendants(self._proc.pid):
            with contextlib.suppress(OSError):
                title = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")[0]
                if title.startswith(b"sshd: ") and b"@" in title:
                    titles.append(title.decode(errors="replace"))
        return titles

    async def start(self, port: int = 0) -> int:
        reason = unavailable_reason()
        if reason is not None:
            raise OSError(reason)
        config = self._lay_down(port)
        etc = config.parent
        self._proc = await asyncio.create_subprocess_exec(
            str(SSHD),
            "-D",
            "-e",
            "-f",
            str(config),
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pump = asyncio.create_task(self._log_lines(etc / "sshd.log", ready))
        try:
            await asyncio.wait_for(ready, READY_TIMEOUT)
        except (TimeoutError, OSError):
            await self.stop()
            log_text = (etc / "sshd.log").read_text(errors="replace")[-2000:]
            raise OSError(f"sshd did not start on port {self.port}: {log_text}") from None
        assert self.port is not None  # chosen by _lay_down
        return self.port

    def _lay_down(self, port: int) -> Path:
        """The sandbox made the login's, and sshd's files: host key, keys, config."""
        try:
            account = pwd.getpwnam(self.user)
        except KeyError:
            raise OSError(f"no user {self.user!r} on this machine for sshd to log in") from None
        prepare_sandbox(self.sandbox)
        if account.pw_uid != 0:
            # The login owns its home, as Lambda's ubuntu does.
            for path in (self.sandbox, *self.sandbox.rglob("*")):
                os.chown(path, account.pw_uid, account.pw_gid, follow_symlinks=False)
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        etc = self.sandbox / SIM_DIR / "sshd"
        etc.mkdir(mode=0o755, exist_ok=True)
        key_path = etc / "host_ed25519"
        self._host_key.write_private_key(str(key_path))
        key_path.chmod(0o600)
        authorized = etc / "authorized_keys"
        authorized.write_text("".join(line.strip() + "\n" for line in self._authorized()))
        authorized.chmod(0o644)  # sshd reads it as the user logging in
        self.port = port or free_port(self._host)
        config = etc / "sshd_config"
        config.write_text(self._config(key_path, authorized, etc / "sshd.pid"))
        return config

    def _config(self, host_key: Path, authorized: Path, pid_file: Path) -> str:
        assert self.port is not None
        env = " ".join(_quote(f"{k}={v}") for k, v in self.env.items())
        return base_config(
            port=self.port,
            host=self._host,
            host_key=host_key,
            pid_file=pid_file,
            authorized=authorized,
        ) + (
            f"AllowUsers {self.user}\n"
            "PrintMotd no\n"
            f"Subsystem sftp internal-sftp -d {_quote(str(self.sandbox))}\n"
            f"SetEnv {env}\n"
            "LogLevel INFO\n"
        )

    async def _log_lines(self, path: Path, ready: asyncio.Future[None]) -> None:
        """Copy sshd's log to `path`; `ready` once it listens (or fails, if it exits first)."""
        assert self._proc is not None and self._proc.stderr is not None
        with path.open("ab") as out:
            while line := await self._proc.stderr.readline():
                out.write(line)
                out.flush()
                if _LISTENING in line and not ready.done():
                    ready.set_result(None)
        if not ready.done():
            ready.set_exception(OSError("sshd exited"))

    async def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self._pump is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pump, 5)
            self._pump = None


def _descendants(root: int) -> list[int]:
    """Every process under `root`, from /proc (parents read from each stat line)."""
    parent: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = (entry / "stat").read_text().rsplit(") ", 1)[1].split()
            parent[int(entry.name)] = int(stat[1])
    found: list[int] = []
    frontier = [root]
    while frontier:
        pid = frontier.pop()
        kids = [p for p, pp in parent.items() if pp == pid]
        found.extend(kids)
        frontier.extend(kids)
    return found
