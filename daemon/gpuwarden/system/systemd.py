"""The systemd contract without a C dependency: sd_notify and the journald native protocol.

Both protocols are a few lines of datagrams on a Unix socket, so they are written here rather
than pulled in: python-systemd (the maintained binding) needs libsystemd and a C toolchain,
and the pure-Python alternatives on PyPI are unmaintained or cover only one of the two.

sd_notify (man sd_notify): newline-separated KEY=VALUE assignments in one datagram to
$NOTIFY_SOCKET, a filesystem path or an abstract socket written with a leading '@'.
Without $NOTIFY_SOCKET (not run by systemd) every call is a cheap no-op that returns False.

journald native protocol (systemd.io/JOURNAL_NATIVE_PROTOCOL): one datagram per entry to
/run/systemd/journal/socket, each field either `KEY=value\\n` or, when the value holds a
newline, `KEY\\n` + the value's length as 64-bit little endian + the value + `\\n`. Entries too
big for a datagram travel in a sealed memfd passed with SCM_RIGHTS, as libsystemd does.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import os
import re
import socket
import struct
from collections.abc import Mapping

JOURNAL_SOCKET = "/run/systemd/journal/socket"
JOURNAL_SOCKET_ENV = "GPUWARDEN_JOURNAL_SOCKET"  # tests point the writer at a fake journal

# --- sd_notify -------------------------------------------------------------------------------


def _address(raw: str) -> str | None:
    """The socket address of $NOTIFY_SOCKET; '@name' is the abstract socket '\\0name'."""
    if raw.startswith("@"):
        return "\0" + raw[1:]
    if raw.startswith("/"):
        return raw
    return None  # vsock: and other families are not used for services on a host


class Notifier:
    """Sends sd_notify messages to one socket. `Notifier.from_env()` reads $NOTIFY_SOCKET."""

    def __init__(self, address: str | None) -> None:
        self.address = address

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Notifier:
        raw = (os.environ if env is None else env).get("NOTIFY_SOCKET", "")
        return cls(_address(raw) if raw else None)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, **fields: object) -> bool:
        """Send `KEY=value` lines in one datagram; True if it was sent.

        Never raises: a daemon must not die because the notification socket went away.
        """
        if self.address is None or not fields:
            return False
        lines = []
        for key, value in fields.items():
            text = str(value).replace("\n", " ")  # a newline would start a new assignment
            lines.append(f"{key}={text}")
        data = ("\n".join(lines) + "\n").encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(data, self.address)
        except OSError:
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify(READY=1, **({"STATUS": status} if status else {}))

    def status(self, text: str) -> bool:
        return self.notify(STATUS=text)

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG=1)

    def stopping(self, status: str | None = None) -> bool:
        return self.notify(STOPPING=1, **({"STATUS": status} if status else {}))

    def reloading(self, monotonic_usec: int) -> bool:
        # Type=notify-reload needs MONOTONIC_USEC with RELOADING=1; older systemd ignores both.
        return self.notify(RELOADING=1, MONOTONIC_USEC=monotonic_usec)


def notify(**fields: object) -> bool:
    """sd_notify with $NOTIFY_SOCKET: `notify(READY=1, STATUS="serving")`."""
    return Notifier.from_env().notify(**fields)


def ready(status: str | None = None) -> bool:
    return Notifier.from_env().ready(status)


def status(text: str) -> bool:
    return Notifier.from_env().status(text)


def watchdog() -> bool:
    return Notifier.from_env().watchdog()


def stopping(status: str | None = None) -> bool:
    return Notifier.from_env().stopping(status)


def watchdog_usec(env: Mapping[str, str] | None = None, pid: int | None = None) -> int | None:
    """WatchdogSec in microseconds when systemd expects pings from this process, else None.

    Like sd_watchdog_enabled(): $WATCHDOG_PID, when set, must name this process (a child that
    inherited the environment must not ping for its parent).
    """
    env = os.environ if env is None else env
    raw = env.get("WATCHDOG_USEC", "")
    if not raw.isdigit() or int(raw) == 0:
        return None
    owner = env.get("WATCHDOG_PID", "")
    if owner and (not owner.isdigit() or int(owner) != (os.getpid() if pid is None else pid)):
        return None
    return int(raw)


def watchdog_interval(env: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings: half of WatchdogSec, as sd_watchdog_enabled advises."""
    usec = watchdog_usec(env, pid)
    return None if usec is None else usec / 2_000_000


# --- journald --------------------------------------------------------------------------------

_BAD_KEY_CHARS = re.compile(r"[^A-Z0-9_]")
_MAX_KEY = 64


def journal_key(name: str) -> str:
    """A journald field name: upper-case letters, digits and '_', not starting with '_' or a
    digit (leading '_' marks trusted fields journald sets itself), at most 64 characters."""
    key = _BAD_KEY_CHARS.sub("_", name.upper()).lstrip("_")
    if not key or key[0].isdigit():
        key = "F_" + key
    return key[:_MAX_KEY]


def encode_entry(fields: Mapping[str, object]) -> bytes:
    """One journal entry in the native format. Values with a newline use the binary form."""
    out = bytearray()
    for name, value in fields.items():
        key = journal_key(name).encode()
        data = value if isinstance(value, bytes) else str(value).encode("utf-8", "replace")
        if b"\n" in data:
            out += key + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key + b"=" + data + b"\n"
    return bytes(out)


def decode_entry(data: bytes) -> dict[str, bytes]:
    """Parse a native-protocol datagram (the inverse of encode_entry; used by tests and tools).
    A field that repeats keeps its last value."""
    fields: dict[str, bytes] = {}
    pos = 0
    while pos < len(data):
        nl = data.index(b"\n", pos)
        line = data[pos:nl]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            pos = nl + 1
        else:
            key = line
            (size,) = struct.unpack("<Q", data[nl + 1 : nl + 9])
            value = data[nl + 9 : nl + 9 + size]
            if data[nl + 9 + size : nl + 10 + size] != b"\n":
                raise ValueError(f"field {key!r}: binary value not followed by a newline")
            pos = nl + 10 + size
        fields[key.decode()] = value
    return fields


def stream_is_journal(fd: int, env: Mapping[str, str] | None = None) -> bool:
    """True when `fd` is the journal stream systemd connected ($JOURNAL_STREAM = "dev:inode")."""
    raw = (os.environ if env is None else env).get("JOURNAL_STREAM", "")
    dev, sep, ino = raw.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return st.st_dev == int(dev) and st.st_ino == int(ino)


class JournalWriter:
    """Sends entries to journald over its native socket. Thread-safe (one sendto per entry)."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path or os.environ.get(JOURNAL_SOCKET_ENV) or JOURNAL_SOCKET
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def send(self, fields: Mapping[str, object]) -> None:
        """Write one entry. Raises OSError if journald cannot be reached."""
        data = encode_entry(fields)
        try:
            self._sock.sendto(data, self.path)
        except OSError as exc:
            if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
            self._send_large(data)

    def _send_large(self, data: bytes) -> None:
        # Too big for one datagram: hand journald a sealed memfd holding the entry.
        fd = os.memfd_create("gpuwarden-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.write(fd, data)
            with contextlib.suppress(OSError):  # sealing is advisory for journald
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _ALL_SEALS)
            rights = array.array("i", [fd]).tobytes()
            self._sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)], 0, self.path)
        finally:
            os.close(fd)

    def close(self) -> None:
        self._sock.close()


_ALL_SEALS = (
    getattr(fcntl, "F_SEAL_SEAL", 1)
    | getattr(fcntl, "F_SEAL_SHRINK", 2)
    | getattr(fcntl, "F_SEAL_GROW", 4)
    | getattr(fcntl, "F_SEAL_WRITE", 8)
)
