"""SSH to rented instances (asyncssh): the key, connecting, running detached commands, and
writing, reading and downloading files over SFTP.

User text never enters a command line here: commands are argument lists quoted with
shlex.join, and prompts travel only inside JSON files sent over SFTP.
"""

from __future__ import annotations

import os
import posixpath
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncssh

if TYPE_CHECKING:
    from gpuwarden.config.settings import Settings


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


def key_source(settings: Settings) -> tuple[str | None, Path]:
    """Where the daemon's key comes from: ssh.private_key (PEM) if set, and the file that
    holds it otherwise (ssh.private_key_file, default <state_dir>/ssh/id_ed25519)."""
    ssh = settings.ssh
    pem = ssh.private_key.get_secret_value() if ssh.private_key else None
    return pem, ssh.private_key_file or settings.daemon.state_dir / "ssh" / "id_ed25519"


def daemon_key(settings: Settings) -> tuple[asyncssh.SSHKey, str]:
    """The daemon's configured SSH key and public line (`load_or_create_key` of `key_source`)."""
    return load_or_create_key(*key_source(settings))


async def connect(
    target: SshTarget,
    key: asyncssh.SSHKey,
    *,
    timeout: float,
    known_hosts: Path | None = None,
    host_key: str | None = None,
) -> asyncssh.SSHClientConnection:
    """Open a connection. The host key is checked against a configured known_hosts file, else
    against `host_key` (the key this instance showed the first time: remote/hostkeys.py),
    else (the first connection to a new rented host) accepted."""
    trusted: Any = None
    if known_hosts:
        trusted = str(known_hosts)
    elif host_key:
        trusted = ([asyncssh.import_public_key(host_key)], [], [])
    return await asyncssh.connect(
        target.host,
        target.port,
        username=target.user,
        client_keys=[key],
        known_hosts=trusted,
        connect_timeout=timeout,
        login_timeout=timeout,
        keepalive_interval=15,
    )


# --- files over SFTP (paths relative to the login home) ------------------------------------


def _parent(rel: str) -> str:
    return posixpath.dirname(rel.rstrip("/"))


async def write_file(conn: asyncssh.SSHClientConnection, remote_rel: str, data: bytes) -> None:
    """Write bytes to `remote_rel` through a temporary name and a rename, so a reader never
    sees half a file (the job spec JSON travels this way: user text never meets a shell).
    Readable by the login user only: these are job specs, the Hugging Face token and
    authorized_keys, none of them for other users of the machine (the server's umask would
    leave 0644)."""
    tmp = remote_rel + ".part"
    async with conn.start_sftp_client() as sftp:
        if _parent(remote_rel):
            await sftp.makedirs(_parent(remote_rel), exist_ok=True)
        owner_only = asyncssh.SFTPAttrs(permissions=0o600)
        async with sftp.open(tmp, "wb", owner_only, encoding=None) as f:
            await f.write(data)
        await sftp.posix_rename(tmp, remote_rel)


async def read_file(
    conn: asyncssh.SSHClientConnection, remote_rel: str, *, limit: int = 16 << 20
) -> bytes | None:
    """The bytes of a small remote file, or None when it does not exist."""
    async with conn.start_sftp_client() as sftp:
        try:
            async with sftp.open(remote_rel, "rb", encoding=None) as f:
                data = _as_bytes(await f.read(limit))
        except asyncssh.SFTPNoSuchFile:
            return None
    return data


class DownloadRefused(Exception):
    """The remote file is not one we take: not a regular file, or over the size cap."""


async def download(
    conn: asyncssh.SSHClientConnection, remote_rel: str, local: Path, *, max_bytes: int
) -> None:
    """Copy a remote regular file of at most `max_bytes` to `local` through `<local>.part`
    and an atomic rename, so a crash mid-download never leaves a truncated file under the
    final name. The cap is checked before and during the copy (the file may grow), so an
    instance cannot fill our disk; a device or FIFO (endless) is refused."""
    local.parent.mkdir(parents=True, exist_ok=True)
    part = local.with_name(local.name + ".part")
    async with conn.start_sftp_client() as sftp:
        attrs = await sftp.stat(remote_rel)
        if attrs.type != asyncssh.FILEXFER_TYPE_REGULAR:
            raise DownloadRefused(f"{remote_rel} is not a regular file")
        if attrs.size is not None and attrs.size > max_bytes:
            raise DownloadRefused(f"{remote_rel} is {attrs.size} bytes, over {max_bytes}")
        copied = 0
        try:
            async with sftp.open(remote_rel, "rb", encoding=None) as src:
                with part.open("wb") as dst:
                    while chunk := _as_bytes(await src.read(1 << 20)):
                        copied += len(chunk)
                        if copied > max_bytes:
                            raise DownloadRefused(f"{remote_rel} grew over {max_bytes} bytes")
                        dst.write(chunk)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
    os.replace(part, local)


async def tail_progress(
    conn: asyncssh.SSHClientConnection, remote_rel: str, offset: int, *, limit: int = 1 << 20
) -> tuple[list[str], int]:
    """Complete lines of a remote file from byte `offset` on, and the offset after the last
    complete line (a half-written last line is left for the next call). ([], offset) when
    the file does not exist yet."""
    async with conn.start_sftp_client() as sftp:
        try:
            async with sftp.open(remote_rel, "rb", encoding=None) as f:
                await f.seek(offset)
                data = _as_bytes(await f.read(limit))
        except asyncssh.SFTPNoSuchFile:
            return [], offset
    end = data.rfind(b"\n")
    if end < 0:
        return [], offset
    chunk = data[: end + 1]
    lines = [ln.decode("utf-8", "replace") for ln in chunk.splitlines() if ln.strip()]
    return lines, offset + len(chunk)


# --- commands (argument lists only) ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CommandResult:
    exit_status: int | None
    stdout: str
    stderr: str


async def run(
    conn: asyncssh.SSHClientConnection, argv: Sequence[str], timeout: float
) -> CommandResult:
    """Run a command given as an argument list (quoted with shlex.join, never user text) in
    the login home, and wait for it at most `timeout` seconds."""
    proc = await conn.run("cd ~ && " + shlex.join(argv), check=False, timeout=timeout)
    return CommandResult(
        proc.exit_status,
        _text(proc.stdout),
        _text(proc.stderr),
    )


def _as_bytes(value: bytes | str) -> bytes:
    # asyncssh types reads as AnyStr; with encoding=None they are bytes.
    return value if isinstance(value, bytes) else value.encode()


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


# The wrapper that runs a detached job: it writes its pid (the process group leader, since
# setsid made it one), the job's output to `log`, and the exit code to `exit` when the command
# ends. So the daemon can tell "still running" (pid alive), "finished" (exit file) and "died"
# (pid gone, no exit file: killed, OOM, reboot) apart, across SSH drops and its own restarts.
_WRAPPER = """\
d=$1; shift
echo $$ > "$d/pid.tmp" && mv "$d/pid.tmp" "$d/pid"
"$@" >> "$d/log" 2>&1
echo $? > "$d/exit.tmp" && mv "$d/exit.tmp" "$d/exit"
"""

# A process counts as alive unless it is gone or a zombie: in a container whose PID 1 does
# not reap orphans, a finished or killed wrapper may linger as a zombie for ever.
_ALIVE = """\
alive() { kill -0 "$1" 2>/dev/null && [ "$(cut -d' ' -f3 "/proc/$1/stat" 2>/dev/null)" != Z ]; }
"""

# The answer follows a fixed marker line, and only what follows the last marker is read: a login
# shell or its rc files may print anything first ("Welcome to Ubuntu ...").
ANSWER_MARK = "--gpuwarden-answer--"

# The exit file is the wrapper's last act, so it is checked first (and again after the pid
# check, for a job that ended between the two).
_STATUS = (
    _ALIVE
    + f"echo {ANSWER_MARK}\n"
    + """\
d=$1
if [ -f "$d/exit" ]; then echo "exited $(cat "$d/exit")"
elif [ -f "$d/pid" ] && alive "$(cat "$d/pid")"; then echo running
elif [ -f "$d/exit" ]; then echo "exited $(cat "$d/exit")"
elif [ -f "$d/pid" ]; then echo dead
else echo absent
fi
"""
)

# The group is signalled as `kill -SIG -PGID`: dash (Debian's and Ubuntu's sh) rejects
# `kill -SIG -- -PGID` ("Illegal number: -"), and busybox ash rejects "--" too; this form works
# in dash, bash and busybox ash alike. The job's own children die with it, not just the wrapper,
# and KILL follows while any of the group lives (a child may ignore TERM after its parent died).
# The group counts as alive while a member other than a zombie is left (read from /proc: where
# PID 1 does not reap, the killed job's processes stay zombies, and `kill -0 -PGID` sees them).
_GROUP_ALIVE = """\
group_alive() {
  for s in /proc/[0-9]*/stat; do
    { read -r l < "$s"; } 2>/dev/null || continue
    l=${l##*) }
    set -- $l
    [ "$1" != Z ] && [ "$3" = "$g" ] && return 0
  done
  return 1
}
"""

_KILL = (
    _ALIVE
    + _GROUP_ALIVE
    + """\
p=$(cat "$1" 2>/dev/null) || exit 0
case $p in ''|*[!0-9]*) exit 0 ;; esac
g=$p
kill -TERM -"$p" 2>/dev/null || kill -TERM "$p" 2>/dev/null || exit 0
for _ in 1 2 3 4 5 6 7 8 9 10; do
  { alive "$p" || group_alive; } || exit 0
  sleep 0.2
done
kill -KILL -"$p" 2>/dev/null || kill -KILL "$p" 2>/dev/null
exit 0
"""
)


# After the launch, wait (at most ~10 s) until the wrapper has written its pid file: a status
# read that came first would find the job absent, and the runner would take it for dead.
_AWAIT_PID = """\
i=0
while [ ! -f "$d/pid" ]; do
  i=$((i + 1))
  if [ "$i" -gt 200 ]; then echo "the job wrote no pid file within 10 s" >&2; exit 1; fi
  sleep 0.05 2>/dev/null || sleep 1
done
"""


async def start_detached(
    conn: asyncssh.SSHClientConnection, job_dir_rel: str, argv: Sequence[str], *, timeout: float
) -> None:
    """Start `argv` in its own session (setsid + nohup) inside `job_dir_rel`'s wrapper, so
    that it survives the SSH connection and the daemon. Returns once the wrapper has written
    its pid file, so that a status read from then on finds the job."""
    # The detached command is a simple command on its own line, so that its redirections
    # (away from the SSH channel) apply in the forked child before anything runs: a
    # backgrounded `a && b` list would keep the channel open until the job ends.
    detach = shlex.join(["setsid", "nohup", "sh", "-c", _WRAPPER, "sh", job_dir_rel, *argv])
    cmd = (
        "cd ~ || exit 1\n"
        + "d="
        + shlex.quote(job_dir_rel)
        + '\nmkdir -p "$d" || exit 1\n'
        # An earlier attempt's pid and exit files must not be read as this one's.
        + 'rm -f "$d/pid" "$d/pid.tmp" "$d/exit" "$d/exit.tmp" || exit 1\n'
        + detach
        + " </dev/null >/dev/null 2>&1 &\n"
        + _AWAIT_PID
    )
    proc = await conn.run(cmd, check=False, timeout=timeout)
    if proc.exit_status not in (0, None):
        raise RemoteCommandError(f"could not start the job: {_text(proc.stderr).strip()}")


# Waits on the instance, at most $2 checks 0.1 s apart, for a started job to end: exit 0 once
# the exit file is there or the process is gone; 1 if it still runs, never started, or this
# `sleep` takes no fractions (the caller then polls as before).
_WAIT_END = """\
d=$1; n=$2
p=$(cat "$d/pid" 2>/dev/null) || exit 1
i=0
while [ ! -f "$d/exit" ] && kill -0 "$p" 2>/dev/null; do
  i=$((i + 1))
  if [ "$i" -gt "$n" ]; then exit 1; fi
  sleep 0.1 2>/dev/null || exit 1
done
"""
WAIT_END_STEP = 0.1  # seconds between two checks on the instance


async def wait_job_end(
    conn: asyncssh.SSHClientConnection, job_dir_rel: str, seconds: float, *, timeout: float
) -> bool:
    """Wait up to `seconds` (at most half of `timeout`) on the instance for a detached job to
    end; True if it did. One command instead of a poll interval's sleep: the end is seen
    within WAIT_END_STEP, not within the interval."""
    checks = int(min(seconds, timeout / 2) / WAIT_END_STEP)
    if checks < 1:
        return False
    try:
        res = await run(conn, ["sh", "-c", _WAIT_END, "sh", job_dir_rel, str(checks)], timeout)
    except TimeoutError:
        # A slow instance (each check forks a `sleep`) outlasted the bound: this command's
        # channel is closed, the connection is fine, and the job's status still decides. Not a
        # dropped connection: enough of those and the job would be given up as lost.
        return False
    return res.exit_status == 0


# Where a job's Python is looked for, in order: names on PATH, then the places images keep it
# (pytorch/pytorch sets /opt/conda/bin by a Docker ENV, which SSH sessions do not inherit).
# `python` counts only if it is Python 3.
PYTHON_CANDIDATES = (
    "python3",
    "/opt/conda/bin/python3",
    "/usr/local/bin/python3",
    "/usr/bin/python3",
    "python",
)


def _python_search(candidates: Sequence[str]) -> str:
    """The fixed shell text that runs `"$@"` with the first Python 3 of `candidates`, or exits
    127 saying where it looked. Only our constants enter it, each shell-quoted."""
    names = ", ".join(c for c in candidates if "/" not in c)
    paths = ", ".join(c for c in candidates if "/" in c)
    where = f"looked for {names} on PATH (%s)" + (f" and at {paths}" if paths else "")
    message = "no python3 on the instance: " + where.replace("%", "%%").replace("(%%s)", "(%s)")
    quoted = " ".join(shlex.quote(c) for c in candidates)
    fmt = shlex.quote(message + "\\n")  # printf's format: it turns \n into the newline
    return f"""\
for py in {quoted}; do
  case $py in
    */*) [ -f "$py" ] && [ -x "$py" ] || continue ;;
    *) command -v "$py" >/dev/null 2>&1 || continue ;;
  esac
  "$py" -c 'import sys; sys.exit(sys.version_info[0] != 3)' >/dev/null 2>&1 && exec "$py" "$@"
done
printf {fmt} "$PATH" >&2
exit 127
"""


def python_argv(args: Sequence[str], *, candidates: Sequence[str] = PYTHON_CANDIDATES) -> list[str]:
    """An argument list that runs `python3 ARGS` with the instance's Python 3 wherever it is
    (see PYTHON_CANDIDATES), for start_detached."""
    return ["sh", "-c", _python_search(candidates), "sh", *args]


class RemoteCommandError(Exception):
    """A remote command we rely on failed."""


@dataclass(frozen=True, slots=True)
class RemoteStatus:
    state: str  # running | exited | dead | absent
    exit_code: int | None = None


async def job_status(
    conn: asyncssh.SSHClientConnection, job_dir_rel: str, *, timeout: float
) -> RemoteStatus:
    """What became of a detached job: running, exited (with its code), dead (pid gone and no
    exit code: killed), or absent (never started here)."""
    res = await run(conn, ["sh", "-c", _STATUS, "sh", job_dir_rel], timeout)
    return parse_status(res.stdout)


def answer(text: str) -> str:
    """What a framed remote script answered: the text after its last ANSWER_MARK line."""
    lines = text.splitlines()
    marks = [i for i, line in enumerate(lines) if line.strip() == ANSWER_MARK]
    if not marks:
        raise RemoteCommandError(f"no answer from the instance: {text.strip()[-200:]!r}")
    return "\n".join(lines[marks[-1] + 1 :])


def parse_status(text: str) -> RemoteStatus:
    """The status check's answer, from everything it printed (banners included)."""
    words = answer(text).split()
    if not words:
        raise RemoteCommandError("no answer from the status check")
    if words[0] == "exited":
        try:
            return RemoteStatus("exited", int(words[1]))
        except (IndexError, ValueError):
            return RemoteStatus("dead")
    if words[0] in ("running", "dead", "absent"):
        return RemoteStatus(words[0])
    raise RemoteCommandError(f"unexpected status answer {' '.join(words)[:200]!r}")


async def is_alive(conn: asyncssh.SSHClientConnection, pid_file: str, *, timeout: float) -> bool:
    """True while the process whose pid is in `pid_file` (relative to home) lives."""
    res = await run(conn, ["sh", "-c", _ALIVE + 'alive "$(cat "$1")"', "sh", pid_file], timeout)
    return res.exit_status == 0


async def kill(conn: asyncssh.SSHClientConnection, pid_file: str, *, timeout: float) -> None:
    """End the process group whose leader's pid is in `pid_file`: TERM, then KILL after ~2 s."""
    await run(conn, ["sh", "-c", _KILL, "sh", pid_file], timeout)
