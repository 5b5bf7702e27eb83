"""sd_notify without libsystemd: datagrams to $NOTIFY_SOCKET (paths and abstract sockets),
and the watchdog interval from $WATCHDOG_USEC / $WATCHDOG_PID."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpuwarden.system import systemd


@pytest.fixture
def notify_socket(short_dir: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(short_dir / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    yield sock, path
    sock.close()


def test_messages_reach_the_socket(
    notify_socket: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert systemd.ready("serving")
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving\n"
    assert systemd.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1\n"
    assert systemd.status("two\nlines")
    assert sock.recv(4096) == b"STATUS=two lines\n"  # a newline would start a new assignment
    assert systemd.stopping()
    assert sock.recv(4096) == b"STOPPING=1\n"
    assert systemd.notify(RELOADING=1, MONOTONIC_USEC=5)
    assert sock.recv(4096) == b"RELOADING=1\nMONOTONIC_USEC=5\n"


def test_abstract_socket() -> None:
    name = f"gpuwarden-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    try:
        notifier = systemd.Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
        assert notifier.address == "\0" + name
        assert notifier.ready()
        assert sock.recv(4096) == b"READY=1\n"
    finally:
        sock.close()


def test_without_notify_socket_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify(READY=1) is False
    assert not systemd.Notifier.from_env().enabled
    assert systemd.Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"}).address is None


def test_a_vanished_socket_is_not_an_error(tmp_path: object) -> None:
    notifier = systemd.Notifier("/nonexistent/dir/notify.sock")
    assert notifier.watchdog() is False  # never raises into the daemon


@pytest.mark.parametrize(
    ("env", "usec", "interval"),
    [
        ({}, None, None),
        ({"WATCHDOG_USEC": "30000000"}, 30_000_000, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 30_000_000, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4243"}, None, None),  # a child's env
        ({"WATCHDOG_USEC": "0"}, None, None),
        ({"WATCHDOG_USEC": "soon"}, None, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], usec: int | None, interval: float | None) -> None:
    assert systemd.watchdog_usec(env, pid=4242) == usec
    assert systemd.watchdog_interval(env, pid=4242) == interval
