"""The job path and the probe on a real OpenSSH server (sshd_support): the real asyncssh
SshConnector uploads the runner and the spec over SFTP, starts it detached, follows its
progress, downloads the image and checks its checksum; a cancel midway is checked on the
process tree (nothing of the job alive, not only the wrapper's pid); and the watchdog's
SshProber runs the probe there. One case per kind of host the daemon meets:

- root with bash (Vast): uid 0, here an alias of root whose home is the test's;
- an ordinary user whose home is not /root (Lambda's `ubuntu`), bash;
- dash as the login shell (Debian, Ubuntu);
- a login shell that prints a banner before every command, whose PATH holds no Python
  (Python only under a directory off the PATH, as /opt/conda/bin in pytorch images);
- busybox ash as the login shell and as `sh`, with busybox's own tools (minimal images);
- Python only under /opt/conda/bin (pytorch images), none on the PATH: the job must run with
  that one;
- a PID namespace whose PID 1 never reaps (a container without init): root's login shell
  enters it, so the job's detached start and its cancel happen there, and cancel must leave
  nothing of the job alive (zombies are allowed: nobody reaps them).

No utmp records (as in containers; this machine keeps none): the probe must count exactly
the SSH session with a terminal when one is open, and none otherwise.

Real Store and FakeClock (the runner's polls are stepped; sshd and the processes run in real
time). Slow: each case starts its own sshd."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from jobs_fakes import add_instance, add_job, cancel_midway, drive, settings
from remote_support import JOB_TOOLS, bare_path, kill_leftovers, wait_all_gone
from sshd_support import (
    CONDA_PYTHON,
    Login,
    Sshd,
    children_of,
    conda_python,
    login_user,
    pid_namespace_without_reaper,
    require_root_sshd,
    running_sshd,
)
from tests.conftest import MakeApp, eventually

from gpuwarden.config.settings import Settings
from gpuwarden.core.clock import FakeClock
from gpuwarden.core.model import Instance, JobState
from gpuwarden.fleet.app import App
from gpuwarden.jobs.runner import Outcome, Runner, SshConnector, sha256_of
from gpuwarden.loops.watchdog import SshProber
from gpuwarden.remote import deadman, hostkeys
from gpuwarden.remote import ssh as remote
from gpuwarden.remote.ssh import PYTHON_CANDIDATES

pytestmark = pytest.mark.slow

BANNER = "Welcome to Ubuntu 22.04.4 LTS (GNU/Linux x86_64)"
# What the probe needs beyond the job tools, for the case whose PATH is bare.
PROBE_TOOLS = ("touch", "wc", "who", "tty", "awk", "tr", "sed", "grep", "sort")
CASES = (
    "root-bash",
    "user-bash",
    "user-dash",
    "banner-no-python-on-path",
    "busybox-sh",
    "conda-python",
    "pidns-no-reaper",
)
# Where the login shell enters a PID namespace, sshd's own processes are out of its sight.
SSHD_VISIBLE = tuple(c for c in CASES if c != "pidns-no-reaper")


@dataclass
class Host:
    case: str
    sshd: Sshd
    login: Login
    pid1: int | None = None  # the PID namespace's PID 1 (as seen from here), where there is one


def _login_shell(case: str, base: Path, stack: contextlib.ExitStack, pid1: int | None) -> str:
    if case in ("root-bash", "user-bash"):
        return "/bin/bash"
    if pid1 is not None:
        login = base / "login-shell"
        login.write_text(
            f'#!/bin/bash\nexec nsenter --target {pid1} --pid --mount -- /bin/bash "$@"\n'
        )
        login.chmod(0o755)
        return str(login)
    if case == "conda-python":
        stack.enter_context(conda_python())
    fixed = [p for p in PYTHON_CANDIDATES if "/" in p]
    if not any(Path(p).is_file() for p in fixed):
        pytest.skip(f"no Python at any of {', '.join(fixed)} on this machine")
    if case == "busybox-sh":
        return _busybox_login(base)
    dash = shutil.which("dash")
    if dash is None:
        pytest.skip("dash is not installed here (apt-get install dash)")
    if case == "user-dash":
        return dash
    # A login shell whose PATH has `sh` and the tools, but no Python (and that greets first).
    bin_dir = base / "bin"
    bin_dir.mkdir()
    (bin_dir / "sh").symlink_to(dash)
    banner = BANNER if case == "banner-no-python-on-path" else ""
    return _wrapper(base, dash, bare_path(bin_dir, *PROBE_TOOLS), banner=banner)


def _busybox_login(base: Path) -> str:
    """busybox ash as the login shell and as `sh`, and busybox's applets for every tool it
    has (Debian's busybox has no nohup: that one comes from coreutils), no Python on PATH."""
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("busybox is not installed here (apt-get install busybox)")
    listed = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True)
    applets = set(listed.stdout.split())
    bin_dir = base / "bin"
    bin_dir.mkdir()
    for tool in ("sh", *JOB_TOOLS, *PROBE_TOOLS):
        if tool in applets:
            (bin_dir / tool).symlink_to(busybox)
    return _wrapper(base, f"{busybox} sh", bare_path(bin_dir, *PROBE_TOOLS))


def _wrapper(base: Path, shell: str, path: str, banner: str = "") -> str:
    """A login shell: `shell` with PATH=`path`, printing `banner` first if given."""
    greet = f"echo '{banner}'\n" if banner else ""
    login = base / "login-shell"
    login.write_text(f'#!{shell}\n{greet}PATH={path}; export PATH\nexec {shell} "$@"\n')
    login.chmod(0o755)
    return str(login)


@pytest.fixture(params=CASES)
def host(request: pytest.FixtureRequest, short_dir: Path) -> Iterator[Host]:
    require_root_sshd()
    case: str = request.param
    with contextlib.ExitStack() as stack:
        pid1 = None
        if case == "pidns-no-reaper":
            pid1 = stack.enter_context(pid_namespace_without_reaper(short_dir))
        shell = _login_shell(case, short_dir, stack, pid1)
        root = case in ("root-bash", "pidns-no-reaper")  # nsenter needs root
        login = stack.enter_context(login_user(short_dir, shell, root=root))
        sshd = stack.enter_context(running_sshd(short_dir))
        yield Host(case, sshd, login, pid1)


async def _rig(
    tmp_path: Path, make_app: MakeApp, host: Host, delay: str
) -> tuple[App, FakeClock, Instance, Runner]:
    clock = FakeClock()
    conf = settings(tmp_path, preview_step_delay=delay, width=64, height=64)
    app = await make_app(conf, clock)
    inst = await add_instance(
        app, ssh_host="127.0.0.1", ssh_port=host.sshd.port, ssh_user=host.login.name
    )
    runner = Runner(app, SshConnector(host.sshd.key, 10.0), poll=1.0, reattach=60.0)
    return app, clock, inst, runner


async def test_a_job_runs_to_its_checked_image(
    tmp_path: Path, make_app: MakeApp, host: Host
) -> None:
    app, clock, inst, runner = await _rig(tmp_path, make_app, host, "0s")
    job = await add_job(app, state=JobState.PROVISIONING, instance_id=inst.id)
    outcome = await drive(clock, runner.execute(job, inst))
    done = await app.store.get_job(job.id)
    assert outcome is Outcome.SUCCEEDED, done.error
    [image] = done.outputs
    assert Path(image).read_bytes().startswith(b"\x89PNG")
    # It ran in the login's own home, as that user, and what arrived is what was made there.
    job_dir = host.login.home / ".gpuwarden" / "jobs" / job.id
    made = sorted(job_dir.rglob("*.png"))
    assert [sha256_of(p) for p in made] == [sha256_of(Path(image))]
    if not host.login.root:
        assert made[0].stat().st_uid == host.login.home.stat().st_uid != 0
    result = json.loads((app.settings.output_dir / job.id / "result.json").read_text())
    if host.case == "conda-python":
        assert result["python"] == str(CONDA_PYTHON)  # found off the PATH, where conda keeps it


async def test_a_cancel_midway_leaves_nothing_of_the_job_alive(
    tmp_path: Path, make_app: MakeApp, host: Host
) -> None:
    # Each step takes 30 s: the job is surely running when the cancel comes.
    app, clock, inst, runner = await _rig(tmp_path, make_app, host, "30s")
    job_id = f"j{uuid.uuid4().hex[:10]}"
    marker = f".gpuwarden/jobs/{job_id}/"
    try:
        job = await add_job(app, job_id, state=JobState.PROVISIONING, instance_id=inst.id)
        outcome = await cancel_midway(clock, runner, job, inst, host.login.home)
        assert outcome is Outcome.CANCELLED
        await wait_all_gone(marker)  # the process tree, not the wrapper's pid
        if host.pid1 is not None:  # the namespace's PID 1 never reaped what the cancel ended
            assert any(state == "Z" for _, state in children_of(host.pid1))
    finally:
        kill_leftovers(marker)


async def test_the_probe_answers_and_refreshes_the_heartbeat(
    tmp_path: Path, make_app: MakeApp, host: Host
) -> None:
    _, _, inst, _ = await _rig(tmp_path, make_app, host, "0s")
    result = await SshProber(lambda: host.sshd.key).probe(inst, 20.0)
    assert result.heartbeat
    assert (host.login.home / ".gpuwarden" / "heartbeat").is_file()
    assert result.runners == 0
    assert result.sessions == 0  # our exec channel has no terminal; nobody else is logged in
    assert result.deadman is False


@pytest.mark.parametrize("host", ["root-bash", "user-dash"], indirect=True)
async def test_the_probe_reports_the_host_key_and_puts_the_operators_key_in_the_home(
    tmp_path: Path, make_app: MakeApp, host: Host
) -> None:
    """What `gpuwarden ssh` relies on, on a real sshd: the host key the probe reports is the
    server's own, and an operator's key (ssh.authorized_keys) logs in after the probe."""
    _, _, inst, _ = await _rig(tmp_path, make_app, host, "0s")
    operator = asyncssh.generate_private_key("ssh-ed25519")
    pub = operator.export_public_key().decode().strip()
    with pytest.raises(asyncssh.PermissionDenied):  # not before the probe put it there
        await asyncssh.connect(
            "127.0.0.1",
            host.sshd.port,
            username=host.login.name,
            client_keys=[operator],
            known_hosts=None,
        )
    prober = SshProber(lambda: host.sshd.key, authorized_keys=lambda: [pub])
    result = await prober.probe(inst, 20.0)
    server_key = asyncssh.read_private_key(str(host.sshd.log.parent / "host_ed25519"))
    assert result.host_key == hostkeys.key_material(server_key.export_public_key().decode())
    assert result.keys == hostkeys.keys_digest([pub])
    assert result.host_key is not None
    pinned: Any = ([asyncssh.import_public_key(result.host_key)], [], [])
    async with asyncssh.connect(
        "127.0.0.1",
        host.sshd.port,
        username=host.login.name,
        client_keys=[operator],
        known_hosts=pinned,
    ) as conn:
        assert str((await conn.run("echo in", check=True)).stdout).strip() == "in"
    keys_file = host.login.home / ".ssh" / "authorized_keys"
    assert keys_file.read_text().count(hostkeys.key_material(pub)) == 1
    assert keys_file.stat().st_mode & 0o777 == 0o600  # written over real SFTP, owner only
    await prober.probe(replace(inst, extra={"keys": result.keys}), 20.0)
    assert keys_file.read_text().count(hostkeys.key_material(pub)) == 1  # not added twice


@pytest.mark.parametrize("host", SSHD_VISIBLE, indirect=True)
async def test_without_utmp_records_the_probe_counts_exactly_the_ssh_session(
    tmp_path: Path, make_app: MakeApp, host: Host
) -> None:
    """With no login records here (no utmp, as in containers), a terminal that no login holds
    is no session, and an interactive SSH session with a terminal is one."""
    _, _, inst, _ = await _rig(tmp_path, make_app, host, "0s")
    prober = SshProber(lambda: host.sshd.key)
    if Path("/run/utmp").exists() or Path("/var/run/utmp").exists():
        pytest.skip("this host keeps login records: the probe reads them, not the terminals")
    leader, follower = os.openpty()  # a terminal on this machine that is nobody's login
    try:
        assert (await prober.probe(inst, 20.0)).sessions == 0
        async with await remote.connect(
            remote.SshTarget("127.0.0.1", host.sshd.port, host.login.name),
            host.sshd.key,
            timeout=10.0,
        ) as conn:
            process = await conn.create_process("sleep 60", term_type="xterm")
            try:
                assert (await prober.probe(inst, 20.0)).sessions == 1
            finally:
                process.terminate()
                process.close()
    finally:
        os.close(leader)
        os.close(follower)


@pytest.mark.parametrize("host", ["user-bash"], indirect=True)
async def test_the_probe_sees_the_dead_man_switch_root_started_for_a_non_root_user(
    tmp_path: Path, make_app: MakeApp, host: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lambda: the start-up script runs as root, hands ~/.gpuwarden to the SSH user and starts
    the switch as root. The probe, logged in as that user, must still see the switch."""
    monkeypatch.setitem(deadman.SSH_USER, "lambda", host.login.name)
    script = deadman.onstart_script(Settings(), "lambda", "https://cloud.example/api/v1", "i1")
    env = {"PATH": os.environ["PATH"], "HOME": "/root"}
    marker = str(host.login.home)
    pid_file = host.login.home / ".gpuwarden" / "deadman.pid"
    try:
        started = subprocess.run(
            ["sh", "-c", script], env=env, capture_output=True, text=True, timeout=30, check=False
        )
        assert started.returncode == 0, started.stderr
        await eventually(lambda: pid_file.is_file() and pid_file.read_text().strip())
        _, _, inst, _ = await _rig(tmp_path, make_app, host, "0s")
        result = await SshProber(lambda: host.sshd.key).probe(inst, 20.0)
        assert result.deadman is True
        assert result.switch() == "unable"  # Lambda without the opt-in key: it cannot end it
    finally:
        if pid_file.is_file() and pid_file.read_text().strip():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)  # the switch's session
        kill_leftovers(marker)
