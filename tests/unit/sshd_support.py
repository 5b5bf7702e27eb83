"""A real OpenSSH instance host for tests: Debian's `sshd` on a loopback port with its own
config, host key and authorized_keys (absolute paths in a temporary directory), logging in a
user created for the test with the login shell and home the case needs.

sshd and useradd need root; CI (.ci/run) installs openssh-server and runs as root. Elsewhere
the cases skip with the reason; in CI (CI=true) they fail instead, so they never silently
stop running there.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import pytest
from tests.conftest import unavailable

from gpuwarden.sim.openssh import (
    PRIVSEP_DIR,
    READY_TIMEOUT,
    SSHD,
    base_config,
    free_port,
    unavailable_reason,
)


def require_root_sshd() -> None:
    if (reason := unavailable_reason()) is not None:
        unavailable(reason)


@dataclass(frozen=True)
class Login:
    """A user to log in as: its name, home, login shell and whether it is root (uid 0)."""

    name: str
    home: Path
    shell: str
    root: bool


@contextlib.contextmanager
def login_user(base: Path, shell: str, *, root: bool) -> Iterator[Login]:
    """A user made for this test, removed afterwards. Its home is `base`/home (not /root, not
    /home). `root`: an alias of uid 0, so that the case runs as root without writing into the
    real /root; otherwise an ordinary user owning its home, like Lambda's `ubuntu`."""
    name = f"gwtest-{uuid.uuid4().hex[:8]}"
    home = base / "home"
    home.mkdir()
    # Password "*": no password login, but not "locked" ("!"), which sshd without PAM refuses.
    args = ["useradd", "--no-create-home", "--home-dir", str(home), "--shell", shell]
    args += ["--password", "*"]
    if root:
        args += ["--non-unique", "--uid", "0", "--gid", "0"]
    subprocess.run([*args, name], check=True, capture_output=True, timeout=30)
    try:
        if not root:
            shutil.chown(home, name, name)
            # The home sits in a directory of ours (straight under /tmp): let the user in.
            base.chmod(0o711)
        yield Login(name, home, shell, root)
    finally:
        # -f: a uid-0 alias shares its uid with every root process, which userdel would refuse.
        subprocess.run(["userdel", "-f", name], check=False, capture_output=True, timeout=30)


@dataclass
class Sshd:
    """One running sshd and the client key it accepts."""

    port: int
    key: asyncssh.SSHKey
    proc: subprocess.Popen[bytes]
    log: Path


@contextlib.contextmanager
def running_sshd(base: Path) -> Iterator[Sshd]:
    """sshd on 127.0.0.1 (foreground, -D -e), its files in `base`. SFTP is sshd's own
    internal-sftp, so that a chatty login shell cannot garble it (as on real hosts whose
    sftp-server starts without the login shell's rc files)."""
    PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
    etc = base / "sshd"
    etc.mkdir()
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    host_key.write_private_key(str(etc / "host_ed25519"))
    (etc / "host_ed25519").chmod(0o600)
    client_key = asyncssh.generate_private_key("ssh-ed25519")
    authorized = etc / "authorized_keys"
    authorized.write_text(client_key.export_public_key().decode())
    # sshd reads authorized_keys as the user logging in.
    etc.chmod(0o755)
    authorized.chmod(0o644)
    port = free_port()
    config = etc / "sshd_config"
    lines = base_config(
        port=port,
        host="127.0.0.1",
        host_key=etc / "host_ed25519",
        pid_file=etc / "sshd.pid",
        # The test's key, and (as on a rented host) the login's own ~/.ssh/authorized_keys.
        authorized=f"{authorized} .ssh/authorized_keys",
    )
    config.write_text(lines + "Subsystem sftp internal-sftp\nLogLevel VERBOSE\n")
    log = etc / "sshd.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(SSHD), "-f", str(config), "-D", "-e"], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        _wait_listening(port, proc, log)
        yield Sshd(port, client_key, proc, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _wait_listening(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Until sshd accepts connections (it binds before it forks nothing in -D mode)."""
    deadline = READY_TIMEOUT
    step = 0.02
    waited = 0.0
    while True:
        if proc.poll() is not None:
            pytest.fail(f"sshd exited {proc.returncode}: {log.read_text()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        if waited > deadline:
            pytest.fail(f"sshd did not listen on {port} within {deadline:g}s: {log.read_text()}")
        # A connect attempt returns at once when refused: pace the retries.
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=step)
        waited += step


CONDA_PYTHON = Path("/opt/conda/bin/python3")


@contextlib.contextmanager
def conda_python() -> Iterator[Path]:
    """/opt/conda/bin/python3, where pytorch images keep Python: a link to this machine's
    Python 3, made for the test and removed after (skipped if /opt/conda is there already:
    something else owns it)."""
    conda = CONDA_PYTHON.parents[1]
    if conda.exists():
        pytest.skip(f"{conda} exists already on this machine: the test will not touch it")
    python = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
    if python is None:
        unavailable("no python3 in /usr/local/bin, /usr/bin or /bin to stand for conda's")
    CONDA_PYTHON.parent.mkdir(parents=True)
    try:
        CONDA_PYTHON.symlink_to(os.path.realpath(python))
        yield CONDA_PYTHON
    finally:
        shutil.rmtree(conda, ignore_errors=True)


def children_of(pid: int) -> list[tuple[int, str]]:
    """(pid, state) of the processes whose parent is `pid`, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(stat[1]) == pid:
            found.append((int(entry.name), stat[0]))
    return found


@contextlib.contextmanager
def pid_namespace_without_reaper(base: Path) -> Iterator[int]:
    """A PID namespace (with its own /proc) whose PID 1 is `sleep`, which never reaps: a
    container without init. Yields PID 1's pid as seen from here, for `nsenter --target`.
    Killing PID 1 at the end ends everything in the namespace."""
    probe = subprocess.run(
        ["unshare", "--pid", "--fork", "true"], capture_output=True, text=True, check=False
    )
    if probe.returncode != 0:
        pytest.skip(f"unshare --pid is not permitted here: {probe.stderr.strip()}")
    init = base / "init"
    # Says it is up, then becomes a PID 1 that never calls wait().
    init.write_text("#!/bin/sh\necho up\nexec sleep infinity\n")
    init.chmod(0o755)
    outer = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", str(init)], stdout=subprocess.PIPE
    )
    try:
        assert outer.stdout is not None
        ready, _, _ = select.select([outer.stdout], [], [], READY_TIMEOUT)
        assert ready and outer.stdout.readline() == b"up\n", "the namespace's PID 1 did not start"
        [(pid1, _)] = children_of(outer.pid)
        yield pid1
    finally:
        for pid, _ in children_of(outer.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        outer.kill()
        outer.wait(timeout=10)
        if outer.stdout is not None:
            outer.stdout.close()
