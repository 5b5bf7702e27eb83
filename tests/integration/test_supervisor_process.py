"""`gpuwarden run` as a real process: the systemd notify contract against a fake
NOTIFY_SOCKET, a clean exit on SIGTERM and SIGINT, config reload on SIGHUP (a broken file
keeps the old config), and exit 78 with nothing started on a bad config."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from tests.conftest import daemon_env

from gpuwarden.system.childproc import DaemonProcess

pytestmark = pytest.mark.slow

READY = 30.0  # generous for a loaded CI machine; the daemon is usually ready in < 1 s


def write_config(d: Path, extra: str = "") -> Path:
    """No providers: these tests are about the process, not the clouds."""
    path = d / "config.toml"
    path.write_text(
        f'[daemon]\nstate_dir = "{d / "state"}"\nsocket = "{d / "control.sock"}"\n'
        'shutdown_timeout = "4s"\n'
        f"[providers.sim]\nenabled = false\n{extra}"
    )
    return path


class NotifyListener:
    """A fake systemd: collects sd_notify datagrams."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[dict[str, str]] = []

    async def next(self, timeout: float = READY) -> dict[str, str]:
        loop = asyncio.get_running_loop()
        data = await asyncio.wait_for(loop.sock_recv(self.sock, 4096), timeout)
        msg = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
        self.messages.append(msg)
        return msg

    async def until(self, key: str, timeout: float = READY) -> dict[str, str]:
        async with asyncio.timeout(timeout):
            while True:
                msg = await self.next()
                if key in msg:
                    return msg

    def close(self) -> None:
        self.sock.close()


async def test_notify_ready_watchdog_stopping(short_dir: Path) -> None:
    listener = NotifyListener(short_dir / "notify.sock")
    env = daemon_env(NOTIFY_SOCKET=str(listener.path), WATCHDOG_USEC="400000")  # ping 0.2 s
    daemon = await DaemonProcess.start(write_config(short_dir), env)
    try:
        ready = await listener.until("READY")
        assert ready["READY"] == "1"
        assert ready["STATUS"].startswith("running:")
        before = listener.messages[:-1]
        assert before and all(set(m) == {"STATUS"} for m in before)  # no ping while starting
        assert before[0]["STATUS"].startswith("starting:")
        # READY came after the lock, the database and the control socket
        assert (short_dir / "state" / "gpuwarden.lock").read_text() == f"{daemon.pid}\n"
        assert (short_dir / "state" / "gpuwarden.db").exists()
        assert (short_dir / "control.sock").exists()
        await daemon.wait_for("daemon_ready", 10)
        pings = 0
        while pings < 3:
            msg = await listener.next(timeout=10)
            pings += msg.get("WATCHDOG") == "1"
        assert daemon.running
        daemon.send(signal.SIGTERM)
        stopping = await listener.until("STOPPING")
        assert stopping["STOPPING"] == "1"
        assert await daemon.wait(timeout=5) == 0  # exit 0 within 5 s
        assert daemon.named("daemon_stopped")[-1]["code"] == 0
    finally:
        daemon.kill()
        listener.close()


async def test_sighup_with_a_broken_file_keeps_the_old_config_and_sigint_stops(
    short_dir: Path,
) -> None:
    config = write_config(short_dir)
    daemon = await DaemonProcess.start(config, daemon_env())
    try:
        await daemon.wait_for("daemon_ready", READY)
        good = config.read_text()

        config.write_text(good + '[policy]\nidle_timeout = "whenever"\n')
        mark = len(daemon.events)
        daemon.send(signal.SIGHUP)
        refused = await daemon.wait_for("config_reload_refused", 10, after=mark)
        assert refused["level"] == "error"
        assert any("policy.idle_timeout" in p for p in refused["problems"])
        assert daemon.running

        # The broken file changed nothing: against the running config only this differs.
        config.write_text(good + '[policy]\nidle_timeout = "10m"\n')
        mark = len(daemon.events)
        daemon.send(signal.SIGHUP)
        reloaded = await daemon.wait_for("config_reloaded", 10, after=mark)
        assert reloaded["changed"] == ["policy.idle_timeout"]
        assert reloaded["needs_restart"] == []

        daemon.send(signal.SIGINT)  # one Ctrl-C: a graceful stop
        assert await daemon.wait(timeout=5) == 0
    finally:
        daemon.kill()


async def test_sighup_with_a_file_that_once_killed_the_daemon_is_refused(short_dir: Path) -> None:
    """One non-UTF-8 byte, a duration that overflows, inf, an empty file: each used to end the
    daemon (and every restart after it) or silently reset every limit."""
    config = write_config(short_dir)
    daemon = await DaemonProcess.start(config, daemon_env())
    try:
        await daemon.wait_for("daemon_ready", READY)
        good = config.read_bytes()
        for bad in (
            good + b"# caf\xe9\n",
            good + b'[policy]\nidle_timeout = "99999999999d"\n',
            good + b"[policy]\nhard_cap = inf\n",
            b"",
        ):
            config.write_bytes(bad)
            mark = len(daemon.events)
            daemon.send(signal.SIGHUP)
            await daemon.wait_for("config_reload_refused", 10, after=mark)
            assert daemon.running
        config.write_bytes(good)
        daemon.send(signal.SIGTERM)
        assert await daemon.wait(timeout=5) == 0
    finally:
        daemon.kill()


async def test_sigterm_during_a_busy_start_still_exits_cleanly(short_dir: Path) -> None:
    daemon = await DaemonProcess.start(write_config(short_dir), daemon_env())
    try:
        await daemon.wait_for("daemon_starting", READY)
        daemon.send(signal.SIGTERM)
        assert await daemon.wait(timeout=5) == 0
        assert daemon.named("daemon_stopped")
    finally:
        daemon.kill()


def test_bad_config_exits_78_and_starts_nothing(short_dir: Path) -> None:
    config = write_config(short_dir, extra="[budget]\ndaily_limit = -3\n")
    proc = subprocess.run(
        [sys.executable, "-m", "gpuwarden", "run", "--config", str(config)],
        env=daemon_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 78
    assert "budget.daily_limit" in proc.stderr
    assert not (short_dir / "state").exists()  # nothing was created
    assert not (short_dir / "control.sock").exists()
