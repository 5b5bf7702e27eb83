"""The detached-job scripts of remote/ssh.py, run for real in a temporary HOME (standing in
for an SSH exec, which runs `<login shell> -c <command>` in the login home): start, status,
kill, the interpreter search, and the quoting of argument lists. The scripts run `sh`; where
it matters they are run with `sh` and the login shell being each of dash (Debian, Ubuntu),
bash and busybox ash present here."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from remote_support import LocalConn, LocalShell, bare_path, kill_leftovers, wait_all_gone
from tests.conftest import processes_with, unavailable

from gpuwarden.remote import ssh as remote


async def wait_status(shell: Any, job_dir: str, want: str) -> remote.RemoteStatus:
    async with asyncio.timeout(10):
        while True:
            st = await remote.job_status(shell, job_dir, timeout=5)
            if st.state == want:
                return st
            await asyncio.sleep(0.05)


def test_parse_status() -> None:
    def framed(text: str) -> str:
        return f"{remote.ANSWER_MARK}\n{text}"

    assert remote.parse_status(framed("running\n")) == remote.RemoteStatus("running")
    assert remote.parse_status(framed("exited 3\n")) == remote.RemoteStatus("exited", 3)
    assert remote.parse_status(framed("exited x")) == remote.RemoteStatus("dead")
    assert remote.parse_status(framed("absent")) == remote.RemoteStatus("absent")
    # Only what follows the last marker counts: a banner before it, even one that prints the
    # marker itself or status words, is ignored.
    noisy = f"Welcome\nrunning\n{remote.ANSWER_MARK}\nexited 0\n"
    assert remote.parse_status(f"{noisy}{framed('absent')}") == remote.RemoteStatus("absent")
    for bad in ("", "banner text", "absent", framed(""), framed("banner text")):
        with pytest.raises(remote.RemoteCommandError):
            remote.parse_status(bad)


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


SHELLS = {"dash": "dash", "bash": "bash", "busybox ash": "busybox"}


@pytest.fixture(params=sorted(SHELLS))
def sh_shell(request: pytest.FixtureRequest, tmp_path: Path) -> LocalShell:
    """A LocalShell whose login shell and `sh` on PATH are the parametrised shell."""
    found = shutil.which(SHELLS[request.param])
    if found is None:
        unavailable(
            f"{request.param} is not installed here (apt-get install {SHELLS[request.param]})"
        )
    bin_dir = tmp_path / "shell-bin"
    bin_dir.mkdir()
    (bin_dir / "sh").symlink_to(found)  # busybox picks its applet from the name: sh
    home = tmp_path / "home"
    home.mkdir()
    return LocalShell(home, [], shell=str(bin_dir / "sh"), path=f"{bin_dir}:{os.environ['PATH']}")


@pytest.mark.parametrize(
    "trap",
    [
        pytest.param("", id="plain"),
        # KILL comes after the 2 s that TERM is given: slow.
        pytest.param("trap '' TERM; ", id="ignores-term", marks=pytest.mark.slow),
    ],
)
async def test_cancel_ends_every_process_of_the_job(sh_shell: LocalShell, trap: str) -> None:
    """The job's own children die too, whatever `sh` is: dash refuses `kill -TERM -- -PID`,
    and killing only the wrapper left the job running. Children that ignore TERM get KILL."""
    shell: Any = sh_shell
    job_dir = ".gpuwarden/jobs/tree"
    marker = f"{300 + uuid.uuid4().int % 10**6 / 10**7:.7f}"  # a sleep nobody else runs
    job = ["sh", "-c", f"{trap}sleep {marker} & sleep {marker} & wait", "sh"]
    try:
        await remote.start_detached(shell, job_dir, job, timeout=10)
        await wait_status(shell, job_dir, "running")
        async with asyncio.timeout(10):
            while len(processes_with(f"sleep {marker}")) < 3:  # the job's sh and two sleeps
                await asyncio.sleep(0.02)
        await remote.kill(shell, f"{job_dir}/pid", timeout=10)
        await wait_all_gone(marker)
    finally:
        kill_leftovers(marker)
    assert (await wait_status(shell, job_dir, "dead")).exit_code is None


async def test_a_status_read_right_after_start_never_says_absent(sh_shell: LocalShell) -> None:
    """start_detached returns once the wrapper's pid file is there: a status read at once
    must not find the job absent (the runner would take it for dead and run it again)."""
    shell: Any = sh_shell
    for i in range(20):
        job_dir = f".gpuwarden/jobs/quick-{i}"
        await remote.start_detached(shell, job_dir, ["true"], timeout=10)
        st = await remote.job_status(shell, job_dir, timeout=5)
        assert st.state in ("running", "exited"), (i, st)


async def test_a_stale_pid_file_is_not_read_as_the_new_job_dead(tmp_path: Path) -> None:
    """An earlier attempt's pid file (its process long gone) is replaced before start returns."""
    shell: Any = LocalShell(tmp_path, [])
    job_dir = ".gpuwarden/jobs/again"
    box = tmp_path / job_dir
    box.mkdir(parents=True)
    # A pid no process can have (above pid_max): a kill that read it would reach nobody.
    gone = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
    box.joinpath("pid").write_text(f"{gone}\n")
    assert (await remote.job_status(shell, job_dir, timeout=5)).state == "dead"
    try:
        await remote.start_detached(shell, job_dir, ["sleep", "30"], timeout=10)
        assert (await remote.job_status(shell, job_dir, timeout=5)).state == "running"
    finally:
        await remote.kill(shell, f"{job_dir}/pid", timeout=10)


BANNER = "Welcome to Ubuntu 22.04.4 LTS\n * Documentation: https://help.ubuntu.com\nabsent running"


async def test_a_login_banner_does_not_garble_the_status(tmp_path: Path) -> None:
    """Whatever the login shell prints before the answer (a welcome text, even one with
    status words in it) is not read as the answer."""
    shell: Any = LocalShell(tmp_path, [], banner=BANNER)
    job_dir = ".gpuwarden/jobs/banner"
    assert (await remote.job_status(shell, job_dir, timeout=5)).state == "absent"
    await remote.start_detached(shell, job_dir, ["sleep", "30"], timeout=10)
    assert (await remote.job_status(shell, job_dir, timeout=5)).state == "running"
    await remote.kill(shell, f"{job_dir}/pid", timeout=10)
    assert (await wait_status(shell, job_dir, "dead")).exit_code is None
    await remote.start_detached(shell, job_dir, ["sh", "-c", "exit 4"], timeout=10)
    assert await wait_status(shell, job_dir, "exited") == remote.RemoteStatus("exited", 4)


HELLO = ["-c", "import sys; print('python', sys.version_info[0], sys.argv[1:])", "x y"]


async def test_python_is_found_off_the_path(tmp_path: Path) -> None:
    """An image that keeps Python where SSH sessions do not look (/opt/conda/bin, set by a
    Docker ENV that sshd does not pass on): the runner's interpreter is found there."""
    conda = tmp_path / "opt-conda-bin"
    conda.mkdir()
    (conda / "python3").symlink_to(sys.executable)
    home = tmp_path / "home"
    home.mkdir()
    shell: Any = LocalShell(home, shell="sh", path=bare_path(tmp_path / "bin"))
    candidates = ("python3", str(conda / "python3"), "python")
    argv = remote.python_argv(HELLO, candidates=candidates)
    await remote.start_detached(shell, ".gpuwarden/jobs/py", argv, timeout=10)
    assert await wait_status(shell, ".gpuwarden/jobs/py", "exited") == remote.RemoteStatus(
        "exited", 0
    )
    assert (home / ".gpuwarden/jobs/py/log").read_text() == "python 3 ['x y']\n"


async def test_no_python_fails_with_a_plain_message(tmp_path: Path) -> None:
    """None of the places has a Python 3 (a `python` that is Python 2 does not count): the
    job exits 127 and its log says where we looked."""
    bin_dir = tmp_path / "bin"
    path = bare_path(bin_dir)
    (bin_dir / "python").write_text('#!/bin/sh\n[ "$1" = -c ] && exit 1\necho python 2 ran\n')
    (bin_dir / "python").chmod(0o755)
    home = tmp_path / "home"
    home.mkdir()
    shell: Any = LocalShell(home, shell="sh", path=path)
    missing = str(tmp_path / "opt-conda-bin" / "python3")
    argv = remote.python_argv(HELLO, candidates=("python3", missing, "python"))
    await remote.start_detached(shell, ".gpuwarden/jobs/nopy", argv, timeout=10)
    st = await wait_status(shell, ".gpuwarden/jobs/nopy", "exited")
    assert st == remote.RemoteStatus("exited", 127)
    log = (home / ".gpuwarden/jobs/nopy/log").read_text()
    assert log.startswith("no python3 on the instance: looked for python3, python on PATH")
    assert missing in log and "python 2 ran" not in log


def test_the_default_search_looks_where_images_keep_python() -> None:
    script = remote.python_argv(["a.py"])[2]
    for place in ("/opt/conda/bin/python3", "/usr/local/bin/python3", "/usr/bin/python3"):
        assert place in script
    assert remote.python_argv(["a.py", "$(touch pwned)"])[-2:] == ["a.py", "$(touch pwned)"]


async def test_waiting_on_the_instance_returns_when_the_job_ends(
    sh_shell: LocalShell,
) -> None:
    """Also under dash and busybox ash, the `sh` of most instances and of minimal images:
    `kill -0`, `$((...))` and a fractional `sleep` as each one has them."""
    conn = LocalConn(sh_shell)
    base = f".gpuwarden/jobs/w{uuid.uuid4().hex[:10]}"
    try:
        assert not await conn.wait_end(f"{base}-none", 0.3)  # never started: poll as before
        await conn.start(f"{base}-long", ["sleep", "30"])
        assert not await conn.wait_end(f"{base}-long", 0.3)  # still running after the wait
        await conn.start(f"{base}-short", ["sleep", "0.3"])
        # Ended (its exit file) well within the wait: True, whenever within it that was.
        assert await conn.wait_end(f"{base}-short", 20.0)
        assert (sh_shell.home / f"{base}-short" / "exit").is_file()
    finally:
        await conn.kill(f"{base}-long")  # the group: the wrapper and its sleep
        kill_leftovers(base)
