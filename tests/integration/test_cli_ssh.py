"""The everyday CLI against a real daemon on the sim: `launch --wait` returns once SSH
answers, `gpuwarden ssh` runs the system ssh with the pinned host key, `ssh-config` prints
Host blocks ssh accepts, `status` shows the SSH column and `--watch` ends cleanly on Ctrl-C,
and `events --follow` carries on across a daemon restart without a gap or a duplicate."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_support import (
    Daemon,
    daemon,
    gw,
    gw_json,
    launch_one,
    own_terminal,
    running_daemon,
    until,
)

pytestmark = pytest.mark.slow
__all__ = ["daemon"]  # the fixture, imported for pytest to find

needs_ssh = pytest.mark.skipif(
    shutil.which("ssh") is None and os.environ.get("CI") != "true",
    reason="no OpenSSH client here (CI installs openssh-client)",
)


def cli(d: Daemon, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The command in a process of its own (ssh replaces that process); --socket goes right
    after the command's name, before a `--` and the remote command."""
    return subprocess.run(
        [sys.executable, "-m", "gpuwarden", argv[0], "--socket", str(d.socket), *argv[1:]],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def ready(daemon: Daemon) -> dict[str, object]:
    """One instance launched with --wait: running, and its SSH has answered."""
    started = time.monotonic()
    code, out, err = gw(daemon, "launch", "--gpu", "4090", "--hours", "1", "--yes", "--wait")
    assert code == 0, err
    assert "answers SSH" in out, out
    assert time.monotonic() - started < 30
    iid = out.split("Launched ", 1)[1].split()[0]
    row: dict[str, object] = next(r for r in gw_json(daemon, "status") if r["id"] == iid)
    return row


def test_launch_wait_returns_once_ssh_answers(daemon: Daemon, ready: dict[str, object]) -> None:
    assert ready["ssh_ready"] is True and ready["state"] == "running"
    code, out, _ = gw(daemon, "status")
    assert code == 0
    line = next(ln for ln in out.splitlines() if ln.startswith(str(ready["id"])))
    assert " running " in line and "booting" not in line
    port = str(ready["ssh"]).rpartition(":")[2]
    assert f"root@127.0.0.1 -p {port}" in line  # the SSH column, as ssh's own arguments


def test_launch_wait_json_prints_the_ready_instance(daemon: Daemon) -> None:
    inst = gw_json(daemon, "launch", "--gpu", "4090", "--hours", "1", "--yes", "--wait")
    assert inst["state"] == "running" and inst["ssh_ready"] is True
    gw(daemon, "destroy", inst["id"])


def test_launch_wait_times_out_with_75(daemon: Daemon) -> None:
    code, _, err = gw(
        daemon,
        "launch",
        "--gpu",
        "4090",
        "--hours",
        "1",
        "--yes",
        "--wait",
        "--wait-timeout",
        "0.01s",
    )
    assert code == 75
    assert "bills until it ends" in err and "gpuwarden destroy" in err
    iid = err.split("instance ", 1)[1].split()[0]
    gw(daemon, "destroy", iid)


@needs_ssh
def test_ssh_runs_a_command_with_strict_host_key_checking(
    daemon: Daemon, ready: dict[str, object]
) -> None:
    iid = str(ready["id"])
    proc = cli(daemon, "ssh", iid[:6], "--", "echo", "hello from", "the instance")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "hello from the instance"
    printed = cli(daemon, "ssh", "--print", iid, "--", "uname", "-a")
    line = printed.stdout.strip()
    assert "StrictHostKeyChecking=yes" in line and "UserKnownHostsFile=" in line
    assert line.endswith("-- uname -a")


@needs_ssh
def test_ssh_config_blocks_work_with_ssh(
    daemon: Daemon, ready: dict[str, object], tmp_path: Path
) -> None:
    code, out, _ = gw(daemon, "ssh-config")
    assert code == 0
    label = str(ready["label"])
    assert f"Host {label}" in out and "StrictHostKeyChecking yes" in out
    config = tmp_path / "ssh_config"
    config.write_text(out)
    proc = subprocess.run(
        ["ssh", "-F", str(config), "-o", "BatchMode=yes", label, "echo", "via-config"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "via-config"


def test_ssh_to_an_unknown_instance_is_refused(daemon: Daemon) -> None:
    code, _, err = gw(daemon, "ssh", "ffffffff")
    assert code == 1 and "no instance" in err


def test_status_watch_ends_cleanly_on_ctrl_c(daemon: Daemon) -> None:
    import pty
    import select

    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gpuwarden",
            "status",
            "--watch",
            "0.3",
            "--socket",
            str(daemon.socket),
        ],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200"},
        preexec_fn=own_terminal,  # noqa: PLW1509 - no lock is taken between fork and exec
    )
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline and seen.count(b"Ctrl-C ends") < 2:
            ready_fds, _, _ = select.select([master], [], [], 0.2)
            if ready_fds:
                try:
                    seen += os.read(master, 65536)
                except OSError:
                    break
        assert seen.count(b"Ctrl-C ends") >= 2, seen  # it refreshed at least once
        os.write(master, b"\x03")
        code = proc.wait(15)
        with_tail = seen
        while True:
            ready_fds, _, _ = select.select([master], [], [], 0.2)
            if not ready_fds:
                break
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            with_tail += chunk
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(master)
    assert code == 0
    assert b"Traceback" not in with_tail and b"KeyboardInterrupt" not in with_tail


# --- events --follow across a restart ----------------------------------------------------


@pytest.fixture
def own_daemon() -> Iterator[Daemon]:
    """A daemon of this test's own: it is stopped and started again."""
    with running_daemon() as d:
        yield d


def test_events_follow_resumes_after_a_daemon_restart(own_daemon: Daemon, tmp_path: Path) -> None:
    d = own_daemon
    first = launch_one(d)  # a backlog to print (a new daemon's log may be empty)
    out_path, err_path = tmp_path / "out", tmp_path / "err"
    with out_path.open("w") as out, err_path.open("w") as err:
        follower = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gpuwarden",
                "events",
                "--follow",
                "--json",
                "--socket",
                str(d.socket),
            ],
            stdout=out,
            stderr=err,
        )
    try:
        until(lambda: out_path.read_text().count("\n") >= 1, "the backlog to be printed")
        before = gw_json(d, "events", "--limit", "1")[-1]["id"]
        d.stop()
        until(lambda: "reconnecting" in err_path.read_text(), "the follower to notice")
        d.start()
        inst = launch_one(d)  # events committed after the restart
        until(
            lambda: "reconnected" in err_path.read_text() and inst["id"] in out_path.read_text(),
            "the follower to resume",
        )
        gw(d, "destroy", inst["id"])
        last = gw_json(d, "events", "--limit", "1")[-1]["id"]
        until(
            lambda: f'"id": {last},' in out_path.read_text(), "the follower to catch up", timeout=30
        )
    finally:
        follower.send_signal(signal.SIGINT)
        code = follower.wait(15)
    assert code == 0
    ids = [json.loads(line)["id"] for line in out_path.read_text().splitlines()]
    assert before in ids
    assert first["id"] in out_path.read_text()
    assert ids == sorted(set(ids)), "a duplicate or out of order"
    assert ids == list(range(ids[0], ids[-1] + 1)), "a gap"
    assert ids[-1] >= last


# --- the socket of a daemon started from a checkout -----------------------------------------


def test_the_cli_finds_the_socket_of_a_daemon_run_from_a_checkout() -> None:
    """`make run` in a checkout, `gpuwarden status` in another shell inside it: the example
    config's relative socket is beside the config (not in the daemon's current directory),
    and the command finds it without --socket or any variable."""
    from cli_support import EXAMPLE
    from tests.conftest import LoopThread, daemon_env, short_tmp

    from gpuwarden.config.paths import DEFAULT_CONFIG_PATH, DEFAULT_SOCKET
    from gpuwarden.system.childproc import DaemonProcess

    if DEFAULT_CONFIG_PATH.exists() or DEFAULT_SOCKET.exists():
        pytest.skip("a system gpuwarden is installed here: the command rightly looks there")
    with short_tmp() as checkout, LoopThread() as loop:
        config = checkout / "config.example.toml"
        config.write_text(EXAMPLE.read_text())
        elsewhere = checkout / "elsewhere"
        elsewhere.mkdir()
        env = daemon_env(GPUWARDEN_PROVIDERS__SIM__BOOT_DELAY="0.2s")
        proc = loop.run(DaemonProcess.start(config, env, cwd=elsewhere))
        try:
            loop.run(proc.wait_for("daemon_ready", 30))
            assert (checkout / ".gpuwarden" / "control.sock").exists()
            assert not (elsewhere / ".gpuwarden").exists()
            inside = checkout / "daemon" / "gpuwarden"
            inside.mkdir(parents=True)
            status = subprocess.run(
                [sys.executable, "-m", "gpuwarden", "status", "--json"],
                cwd=inside,
                env=daemon_env(),
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert status.returncode == 0, status.stderr
            assert json.loads(status.stdout) == []
        finally:
            loop.run(proc.stop(20))
