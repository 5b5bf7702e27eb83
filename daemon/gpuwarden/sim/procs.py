"""Find and kill a sim instance's processes by their environment.

Detached runners leave the SSH session (setsid, nohup), so the sim cannot kill them through a
process group. Every process of an instance carries `GPUWARDEN_SIM_INSTANCE=<id>` and
`GPUWARDEN_SIM_CLOUD=<token of this sim>` in its environment; both must match, so two sims on
one host (parallel tests) never kill each other's processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

PROC = Path("/proc")


def instance_pids(instance_id: str, cloud_token: str) -> list[int]:
    want = (
        f"GPUWARDEN_SIM_INSTANCE={instance_id}".encode(),
        f"GPUWARDEN_SIM_CLOUD={cloud_token}".encode(),
    )
    me = os.getpid()
    pids = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            env = set((entry / "environ").read_bytes().split(b"\0"))
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if all(w in env for w in want):
            pids.append(int(entry.name))
    return pids


def _kill_round(instance_id: str, cloud_token: str) -> int:
    pids = instance_pids(instance_id, cloud_token)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return len(pids)


async def kill_instance_processes(instance_id: str, cloud_token: str, rounds: int = 5) -> int:
    """SIGKILL every process of the instance; repeat while a scan still finds some (a process
    may have forked between the scan and the kill). Returns how many kills were sent."""
    total = 0
    for _ in range(rounds):
        n = await asyncio.to_thread(_kill_round, instance_id, cloud_token)
        total += n
        if n == 0:
            break
        await asyncio.sleep(0.02)  # let the kernel deliver before the next scan
    return total
