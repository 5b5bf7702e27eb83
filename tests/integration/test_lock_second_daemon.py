"""A second daemon on the same state directory exits non-zero with a message naming the
holder, touches nothing, and the first one keeps running and answering."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import daemon_env

from gpuwarden.system.childproc import DaemonProcess
from gpuwarden.system.lock import EX_TEMPFAIL

pytestmark = pytest.mark.slow


async def rpc(sock: Path, method: str) -> dict[str, Any]:
    reader, writer = await asyncio.open_unix_connection(str(sock))
    try:
        request = {"jsonrpc": "2.0", "id": 1, "method": method, "params": {}}
        writer.write(json.dumps(request).encode() + b"\n")
        await writer.drain()
        answer: dict[str, Any] = json.loads(await asyncio.wait_for(reader.readline(), 10))
        return answer
    finally:
        writer.close()
        await writer.wait_closed()


async def test_second_daemon_refuses_and_the_first_still_answers(short_dir: Path) -> None:
    config = short_dir / "config.toml"
    config.write_text(
        f'[daemon]\nstate_dir = "{short_dir / "state"}"\nsocket = "{short_dir / "c.sock"}"\n'
        "[providers.sim]\nenabled = false\n"
    )
    first = await DaemonProcess.start(config, daemon_env())
    try:
        await first.wait_for("daemon_ready", 30)
        sock = short_dir / "c.sock"
        inode_before = sock.stat().st_ino
        db_files = {p.name: p.stat().st_mtime_ns for p in (short_dir / "state").iterdir()}

        second = subprocess.run(
            [sys.executable, "-m", "gpuwarden", "run", "--config", str(config)],
            env=daemon_env(),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert second.returncode == EX_TEMPFAIL
        assert f"pid {first.pid}" in second.stderr
        assert "already running" in second.stderr
        events = [json.loads(line) for line in second.stdout.splitlines()]
        assert [e["event"] for e in events][:1] == ["daemon_already_running"]

        # The second touched nothing: same socket inode, same files, same lock contents.
        assert sock.stat().st_ino == inode_before
        assert (short_dir / "state" / "gpuwarden.lock").read_text() == f"{first.pid}\n"
        lock_mtime = (short_dir / "state" / "gpuwarden.lock").stat().st_mtime_ns
        assert lock_mtime == db_files["gpuwarden.lock"]

        # The first still runs and answers on its socket.
        assert first.running
        answer = await rpc(sock, "daemon.info")
        assert answer["result"]["pid"] == first.pid
        conn = sqlite3.connect(short_dir / "state" / "gpuwarden.db")
        try:
            assert conn.execute("PRAGMA quick_check").fetchone()[0] == "ok"
        finally:
            conn.close()

        assert await first.stop(timeout=5) == 0
    finally:
        first.kill()
