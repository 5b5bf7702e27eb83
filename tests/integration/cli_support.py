"""The CLI against a real daemon, for the test_cli_* modules: `Daemon` (`gpuwarden run` with
the example config, the in-process sim cloud, a temporary state dir and socket), the
module-scoped `daemon` fixture, `gw` (one command in-process), and `on_a_terminal` (one
command in a real process on a pseudo-terminal, for the prompts)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import LoopThread, daemon_env, eventually, short_tmp

from gpuwarden.cli import main
from gpuwarden.system.childproc import ChildFailed, DaemonProcess

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config.example.toml"


class Daemon:
    """`gpuwarden run` with the example config, state and socket in `base`, its output read on
    a loop of its own (the tests are synchronous: the CLI runs its own event loop)."""

    def __init__(self, base: Path, loop: LoopThread) -> None:
        self.base = base
        self.socket = base / "control.sock"
        self.loop = loop
        self.env = daemon_env(
            GPUWARDEN_DAEMON__STATE_DIR=str(base / "state"),
            GPUWARDEN_DAEMON__SOCKET=str(self.socket),
            GPUWARDEN_PROVIDERS__SIM__BOOT_DELAY="0.2s",
            GPUWARDEN_POLICY__POLL_INTERVAL="1s",
        )
        self.proc: DaemonProcess | None = None

    def start(self) -> None:
        self.proc = self.loop.run(DaemonProcess.start(EXAMPLE, self.env, cwd=self.base))
        self.loop.run(self.proc.wait_for("daemon_ready", 30))

    def stop(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ChildFailed):  # killed if SIGTERM did not end it
                self.loop.run(self.proc.stop(20))


@contextlib.contextmanager
def running_daemon() -> Iterator[Daemon]:
    """A started Daemon in a short temporary directory, stopped and removed afterwards."""
    with short_tmp() as base, LoopThread() as loop:
        d = Daemon(base, loop)
        try:
            d.start()
            yield d
        finally:
            d.stop()


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    with running_daemon() as d:
        yield d


def gw(d: Daemon | None, *argv: str) -> tuple[int, str, str]:
    """Run one command in-process; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    full = list(argv)
    if d is not None:
        full += ["--socket", str(d.socket)]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(full)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        else:
            code = 0
    return code, out.getvalue(), err.getvalue()


def gw_json(d: Daemon, *argv: str) -> Any:
    code, out, err = gw(d, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def until(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """`eventually` for these synchronous tests: `check` runs the CLI, which runs its own
    event loop, so it is called in a worker thread."""
    asyncio.run(
        eventually(lambda: asyncio.to_thread(check), timeout=timeout, interval=0.2, what=what)
    )


def until_no_live(d: Daemon) -> None:
    until(lambda: not gw_json(d, "status"), "no live instances")


def status_row(d: Daemon, iid: str) -> dict[str, Any]:
    row: dict[str, Any] = next(r for r in gw_json(d, "status") if r["id"] == iid)
    return row


def launch_one(d: Daemon, *extra: str) -> dict[str, Any]:
    inst: dict[str, Any] = gw_json(d, "launch", "--gpu", "4090", "--hours", "1", "--yes", *extra)
    return inst


def own_terminal() -> None:
    """In the child: a session of its own, the pseudo-terminal on stdin as its controlling
    terminal, so that a typed Ctrl-C (0x03) reaches it as SIGINT, as in a real shell."""
    import fcntl
    import termios

    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def on_a_terminal(d: Daemon, answer: bytes, *argv: str) -> tuple[int, str]:
    """Run a command with a pseudo-terminal as stdin/stdout/stderr (and its controlling
    terminal) and type `answer` at the prompt: b"\x03" is Ctrl-C, b"\x04" Ctrl-D (EOF).
    Reads with bounded waits under an overall deadline (a real process): a command still
    waiting for more input when it passes is killed and reported as -9."""
    import pty
    import select

    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpuwarden", *argv, "--socket", str(d.socket)],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env={**os.environ, "NO_COLOR": "1"},
        preexec_fn=own_terminal,  # noqa: PLW1509 - no lock is taken between fork and exec
    )
    os.close(slave)
    seen = b""
    answered = False
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            if not answered and b"[y/N]" in seen:
                os.write(master, answer)
                answered = True
            ready, _, _ = select.select([master], [], [], 0.2)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        try:  # the terminal closes a moment before the process has exited
            code = proc.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(master)
    assert answered, seen
    return code, seen.decode(errors="replace")
