"""A control-socket client of another uid: a forked child that drops to uid/gid 65534
(nobody) and no groups, sends one request and reports what it read. Needs root."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

NOBODY = 65534


def _fork_as_nobody(path: Path, request: bytes, keep: int) -> tuple[int, int]:
    """Fork the child; it writes "uid=<its uid> got=<the first `keep` bytes of the reply>"
    (or "error ...") into a pipe. Returns (pid, read end of the pipe)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: plain syscalls only, then _exit
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(5)
            s.connect(str(path))
            try:
                s.sendall(request)
                data = s.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                data = b""
            os.write(w, f"uid={os.getuid()} got={data[:keep]!r}".encode())
        except BaseException as exc:
            os.write(w, f"error {exc!r}".encode())
        finally:
            os._exit(0)
    os.close(w)
    return pid, r


def _read_all(fd: int) -> str:
    chunks = []
    while chunk := os.read(fd, 4096):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks).decode()


async def as_nobody(path: Path, request: bytes, keep: int = 20) -> str:
    """Send `request` to the socket at `path` as uid 65534; what the child reported."""
    pid, r = _fork_as_nobody(path, request, keep)
    loop = asyncio.get_running_loop()
    out = await asyncio.wait_for(loop.run_in_executor(None, _read_all, r), 20)
    await loop.run_in_executor(None, os.waitpid, pid, 0)
    return out
