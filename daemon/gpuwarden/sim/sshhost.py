"""One simulated instance's SSH server: asyncssh on its own loopback port.

- Key auth only, with the public keys the account registered (read at each login, so a key
  added later works, as on Vast); any user name is accepted (root, ubuntu, ...).
- Exec requests run `bash -c <command>` with cwd = HOME = the instance's sandbox directory and
  the instance's environment (GPUWARDEN_SIM_INSTANCE, CONTAINER_ID, ...); stdout, stderr and
  the exit status are relayed. A shell request runs `bash` on pipes (no pty: the sim does not
  emulate terminals). Closing the channel sends SIGHUP to the command's process group, as
  sshd does; runners that detached (setsid/nohup) live on until the instance is destroyed.
- SFTP is rooted at the sandbox (asyncssh's chroot), so relative paths resolve inside it.
- Open sessions: `sessions` counts every open exec/shell/SFTP channel; interactive ones
  (shell or pty requests, what `who` would list) are also written to
  `<sandbox>/.gpuwarden-sim/sessions`, one `<id> <user> <kind> <started ISO time>` per line,
  and a `who` shim in `<sandbox>/.gpuwarden-sim/bin` (first on PATH) prints them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncssh
import structlog

log = structlog.get_logger(__name__)

SIM_DIR = ".gpuwarden-sim"
_CHUNK = 65536
_DRAIN_AFTER_EXIT = 2.0  # seconds to wait for output still in the pipes after the exit
# Run before an exec command: close every descriptor above stderr. uvloop (the daemon's loop)
# leaves extra copies of the session's pipe ends open in the child, so a detached job (setsid
# ... >/dev/null &) would still hold the session's stdout and the command would return only
# when the job ended (or after _DRAIN_AFTER_EXIT); sshd passes its child only 0, 1 and 2.
_CLOSE_INHERITED = (
    'for _gw_fd in /proc/$$/fd/*; do _gw_fd=${_gw_fd##*/}; [ "$_gw_fd" -gt 2 ] &&'
    ' eval "exec $_gw_fd>&-"; done; unset _gw_fd\n'
)
_PASS_ENV = ("LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR")
_WHO = """#!/bin/sh
# The sim's stand-in for who(1): one line per open interactive SSH session.
f="$HOME/.gpuwarden-sim/sessions"
[ -f "$f" ] || exit 0
while read -r id user kind started; do
  echo "$user pts/$id $started (127.0.0.1)"
done < "$f"
"""


def base_env(sandbox: Path, extra: Mapping[str, str], *, shims: bool = True) -> dict[str, str]:
    """The environment every process of a sim instance gets.

    PATH starts with the sandbox's shim directory (unless `shims` is off: a real sshd's
    sessions are seen by the real `who`) and the directory of the Python running the sim, so
    `python3` on a sim instance is the sim's own interpreter (with its packages).
    """
    dirs = [str(sandbox / SIM_DIR / "bin")] if shims else []
    path = os.pathsep.join(
        [*dirs, os.path.dirname(sys.executable), os.environ.get("PATH", "/usr/bin:/bin")]
    )
    env = {k: os.environ[k] for k in _PASS_ENV if k in os.environ}
    env.update(
        PATH=path,
        HOME=str(sandbox),
        SHELL="/bin/bash",
        LANG=env.get("LANG", "C.UTF-8"),
    )
    env.update(extra)
    return env


def prepare_sandbox(sandbox: Path) -> None:
    (sandbox / SIM_DIR / "bin").mkdir(parents=True, exist_ok=True)
    who = sandbox / SIM_DIR / "bin" / "who"
    who.write_text(_WHO)
    who.chmod(0o755)


async def run_detached(
    argv: Sequence[str], *, sandbox: Path, env: Mapping[str, str], log_name: str
) -> int:
    """Start a boot script in its own session, output appended to .gpuwarden-sim/<log_name>."""
    log_path = sandbox / SIM_DIR / log_name
    with log_path.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=sandbox,
            env=dict(env),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
    return proc.pid


class SshHost:
    """The SSH server of one instance. `start` binds a free loopback port; `stop` closes the
    listener and every open connection (the processes are the caller's to kill)."""

    def __init__(
        self,
        *,
        instance_id: str,
        sandbox: Path,
        env: Mapping[str, str],
        host_key: asyncssh.SSHKey,
        authorized: Callable[[], Sequence[str]],
        now: Callable[[], datetime],
        host: str = "127.0.0.1",
    ) -> None:
        self.instance_id = instance_id
        self.sandbox = sandbox
        self.env = dict(env)
        self._host_key = host_key
        self._authorized = authorized
        self._now = now
        self._host = host
        self._server: asyncssh.SSHAcceptor | None = None
        self._conns: set[asyncssh.SSHServerConnection] = set()
        self._open: dict[int, str] = {}  # session id -> kind (exec, shell, sftp)
        self._interactive: dict[int, str] = {}  # session id -> line of the sessions file
        self._ids = itertools.count(1)
        self.port: int | None = None

    @property
    def listening(self) -> bool:
        return self._server is not None

    @property
    def sessions(self) -> int:
        return len(self._open)

    @property
    def interactive_sessions(self) -> int:
        return len(self._interactive)

    async def start(self, port: int = 0) -> int:
        prepare_sandbox(self.sandbox)
        self._write_sessions()
        self._server = await asyncssh.create_server(
            lambda: _Server(self),
            self._host,
            port,
            server_host_keys=[self._host_key],
            process_factory=self._handle,
            sftp_factory=lambda chan: _Sftp(chan, self),
            encoding=None,
            line_editor=False,
            allow_scp=False,
            x11_forwarding=False,
            agent_forwarding=False,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()
        conns = list(self._conns)
        for conn in conns:
            conn.abort()
        for conn in conns:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.wait_closed(), 2)

    # --- auth -----------------------------------------------------------------------------

    def key_allowed(self, key: asyncssh.SSHKey) -> bool:
        """The provider's keys, and (as sshd reads it) the login's ~/.ssh/authorized_keys."""
        wanted = key.public_data
        for line in [*self._authorized(), *self._home_keys()]:
            try:
                if asyncssh.import_public_key(line).public_data == wanted:
                    return True
            except (asyncssh.KeyImportError, ValueError):
                continue
        return False

    def _home_keys(self) -> list[str]:
        try:
            text = (self.sandbox / ".ssh" / "authorized_keys").read_text(errors="replace")
        except OSError:
            return []
        return [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]

    # --- sessions -------------------------------------------------------------------------

    def _opened(self, kind: str, user: str, interactive: bool) -> int:
        sid = next(self._ids)
        self._open[sid] = kind
        if interactive:
            started = self._now().strftime("%Y-%m-%dT%H:%M:%S")
            self._interactive[sid] = f"{sid} {user or '-'} {kind} {started}"
            self._write_sessions()
        return sid

    def _closed(self, sid: int) -> None:
        self._open.pop(sid, None)
        if self._interactive.pop(sid, None) is not None:
            self._write_sessions()

    def _write_sessions(self) -> None:
        path = self.sandbox / SIM_DIR / "sessions"
        with contextlib.suppress(OSError):  # the sandbox may have been removed by hand
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in self._interactive.values()))
            tmp.replace(path)

    async def _handle(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        command = process.command
        pty = process.get_terminal_type() is not None
        kind = "exec" if command is not None else "shell"
        user = str(process.get_extra_info("username") or "")
        sid = self._opened(kind, user, interactive=pty or command is None)
        try:
            if process.subsystem is not None:  # only SFTP is offered (see sftp_factory)
                process.stderr.write(f"subsystem {process.subsystem} is not available\n".encode())
                process.exit(1)
                return
            status = await self._run(process, command, pty)
            process.exit(status)
        except (BrokenPipeError, ConnectionError, asyncssh.Error):
            pass  # the client went away; the finally clause forgets the session
        finally:
            self._closed(sid)

    async def _run(
        self, process: asyncssh.SSHServerProcess[bytes], command: str | None, pty: bool
    ) -> int:
        argv = ["bash", "-c", _CLOSE_INHERITED + command] if command is not None else ["bash"]
        env = dict(self.env)
        env.update({k: v for k, v in process.env.items() if k in _PASS_ENV})
        if pty:
            env["TERM"] = process.get_terminal_type() or "xterm"
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=self.sandbox,
            env=env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        assert proc.stdout and proc.stderr and proc.stdin
        outs = [
            asyncio.ensure_future(_pump_out(proc.stdout, process.stdout)),
            asyncio.ensure_future(_pump_out(proc.stderr, process.stderr)),
        ]
        feeder = asyncio.ensure_future(_pump_in(process.stdin, proc.stdin))
        hangup = asyncio.ensure_future(process.channel.wait_closed())
        exited = asyncio.ensure_future(proc.wait())
        try:
            await asyncio.wait([exited, hangup], return_when=asyncio.FIRST_COMPLETED)
            if not exited.done():  # the client hung up first: SIGHUP, as sshd does
                _signal_group(proc.pid, signal.SIGHUP)
                await asyncio.wait([exited], timeout=2)
                if not exited.done():
                    _signal_group(proc.pid, signal.SIGKILL)
                return await exited
            await asyncio.wait(outs, timeout=_DRAIN_AFTER_EXIT)
            code = exited.result()
            return code if code >= 0 else 128 - code
        finally:
            for task in (*outs, feeder, hangup, exited):
                task.cancel()
            await asyncio.gather(*outs, feeder, hangup, exited, return_exceptions=True)
            # A detached child (a job started with setsid ... &) may hold the command's stdout
            # and stderr open long after the command exited; the pumps are cancelled then, so
            # close our ends of the pipes here rather than leaving them to the collector.
            _close_pipes(proc)


def _close_pipes(proc: asyncio.subprocess.Process) -> None:
    # asyncio has no public close for a Process; its transport owns the pipes.
    transport = proc._transport  # type: ignore[attr-defined]
    transport.close()


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


async def _pump_out(src: asyncio.StreamReader, dst: asyncssh.SSHWriter[bytes]) -> None:
    with contextlib.suppress(BrokenPipeError, ConnectionError, asyncssh.Error):
        while chunk := await src.read(_CHUNK):
            dst.write(chunk)
            await dst.drain()


async def _pump_in(src: asyncssh.SSHReader[bytes], dst: asyncio.StreamWriter) -> None:
    try:
        while True:
            try:
                data = await src.read(_CHUNK)
            except (asyncssh.TerminalSizeChanged, asyncssh.BreakReceived, asyncssh.SignalReceived):
                continue
            if not data:
                break
            dst.write(data)
            await dst.drain()
    except (BrokenPipeError, ConnectionError, asyncssh.Error):
        pass
    finally:
        with contextlib.suppress(Exception):
            dst.close()


class _Server(asyncssh.SSHServer):
    def __init__(self, host: SshHost) -> None:
        self._host = host
        self._conn: asyncssh.SSHServerConnection | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        self._host._conns.add(conn)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._conn is not None:
            self._host._conns.discard(self._conn)

    def begin_auth(self, username: str) -> bool:
        return True  # authentication is always required

    def password_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        return self._host.key_allowed(key)


class _Sftp(asyncssh.SFTPServer):
    """SFTP rooted at the sandbox; counted as an open session while it lasts."""

    def __init__(self, chan: asyncssh.SSHServerChannel[Any], host: SshHost) -> None:
        self._sim_host = host
        user = str(chan.get_extra_info("username") or "")
        self._sid = host._opened("sftp", user, interactive=False)
        super().__init__(chan, chroot=os.fsencode(host.sandbox))

    def exit(self) -> None:
        self._sim_host._closed(self._sid)
        super().exit()
