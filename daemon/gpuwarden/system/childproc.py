"""`gpuwarden run` as a child process whose JSON log is followed event by event.

The demo uses it to show what the daemon does; the integration tests use it to wait for
events ("daemon_ready", "config_reloaded") instead of sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

Event = dict[str, Any]


class ChildFailed(Exception):
    """The daemon did not do what was waited for (ended early, timed out)."""


class DaemonProcess:
    """Start with `await DaemonProcess.start(config, env)`; the daemon's stdout must be JSON
    lines (it is, in a pipe). `on_event` / `on_stderr` see each line as it arrives."""

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        *,
        on_event: Callable[[Event], None] | None = None,
        on_stderr: Callable[[str], None] | None = None,
    ) -> None:
        self.proc = proc
        self.events: list[Event] = []
        self.stderr: list[str] = []
        self._on_event = on_event
        self._on_stderr = on_stderr
        self._changed = asyncio.Condition()
        assert proc.stdout is not None and proc.stderr is not None
        self._readers = [
            asyncio.create_task(self._read_log(proc.stdout), name="daemon-stdout"),
            asyncio.create_task(self._read_stderr(proc.stderr), name="daemon-stderr"),
        ]

    @classmethod
    async def start(
        cls,
        config: Path | None,
        env: Mapping[str, str],
        *,
        args: Sequence[str] = (),
        cwd: Path | None = None,
        on_event: Callable[[Event], None] | None = None,
        on_stderr: Callable[[str], None] | None = None,
    ) -> DaemonProcess:
        argv = [sys.executable, "-m", "gpuwarden", "run"]
        if config is not None:
            argv += ["--config", str(config)]
        proc = await asyncio.create_subprocess_exec(
            *argv,
            *args,
            env=dict(env),
            cwd=cwd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # a Ctrl-C in the terminal reaches only the parent
        )
        return cls(proc, on_event=on_event, on_stderr=on_stderr)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc.returncode is None

    async def _read_log(self, stream: asyncio.StreamReader) -> None:
        async for raw in stream:
            line = raw.decode(errors="replace").rstrip()
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                event = None
            if not isinstance(event, dict):
                event = {"event": "output", "text": line}
            if self._on_event:
                self._on_event(event)
            async with self._changed:
                self.events.append(event)
                self._changed.notify_all()
        async with self._changed:
            self._changed.notify_all()  # end of output: waiters see the daemon is gone

    async def _read_stderr(self, stream: asyncio.StreamReader) -> None:
        async for raw in stream:
            line = raw.decode(errors="replace").rstrip()
            self.stderr.append(line)
            if self._on_stderr:
                self._on_stderr(line)

    def named(self, name: str) -> list[Event]:
        return [e for e in self.events if e.get("event") == name]

    async def wait_for(self, name: str, timeout: float, *, after: int = 0) -> Event:
        """The first event called `name` among events[after:], waiting up to `timeout` s."""

        def found() -> Event | None:
            return next((e for e in self.events[after:] if e.get("event") == name), None)

        async def wait() -> Event:
            async with self._changed:
                while (event := found()) is None:
                    if self._readers[0].done():
                        raise ChildFailed(
                            f"the daemon's output ended before {name}{self._stderr_tail()}"
                        )
                    await self._changed.wait()
                return event

        try:
            return await asyncio.wait_for(wait(), timeout)
        except TimeoutError:
            raise ChildFailed(f"no {name} event within {timeout:g} s") from None

    def _stderr_tail(self, lines: int = 20) -> str:
        tail = self.stderr[-lines:]
        return "; its stderr ends:\n" + "\n".join(tail) if tail else ""

    def send(self, sig: signal.Signals) -> None:
        if self.running:
            self.proc.send_signal(sig)

    async def wait(self, timeout: float) -> int:
        """The exit code, once the process and its output have ended."""
        try:
            code = await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            raise ChildFailed(f"the daemon did not exit within {timeout:g} s") from None
        for reader in self._readers:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(reader, 5)
        return code

    async def stop(self, timeout: float) -> int:
        """SIGTERM and wait; SIGKILL (and ChildFailed) if it does not exit in time."""
        self.send(signal.SIGTERM)
        try:
            return await self.wait(timeout)
        except ChildFailed:
            self.kill()
            await self.proc.wait()
            raise

    def kill(self) -> None:
        if self.running:
            self.proc.kill()
