"""The three log outputs: JSON lines, console lines, and native journald entries (checked
by parsing the datagrams a fake journal socket receives)."""

from __future__ import annotations

import io
import json
import os
import socket
import struct
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import structlog

from gpuwarden.core.clock import FakeClock
from gpuwarden.system import logs as glog
from gpuwarden.system import systemd


@pytest.fixture(autouse=True)
def reset() -> Iterator[None]:
    yield
    structlog.reset_defaults()
    glog.close()
    glog.clear_secrets()


@pytest.fixture
def journal(short_dir: Path) -> Iterator[tuple[socket.socket, str]]:
    """A fake journald: a datagram socket in a short temporary directory."""
    path = str(short_dir / "journal.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    yield sock, path
    sock.close()


def parse_native(data: bytes) -> dict[str, bytes]:
    """An independent parser of the journald native format (not the code under test)."""
    fields: dict[str, bytes] = {}
    rest = data
    while rest:
        head, _, after = rest.partition(b"\n")
        if b"=" in head:
            key, _, value = head.partition(b"=")
            rest = after
        else:
            key = head
            (size,) = struct.unpack("<Q", after[:8])
            value = after[8 : 8 + size]
            assert after[8 + size : 9 + size] == b"\n"
            rest = after[9 + size :]
        assert key.decode().isupper() or key.decode().replace("_", "").isalnum()
        fields[key.decode()] = value
    return fields


def test_json_lines_have_event_level_time_and_keys() -> None:
    stream = io.StringIO()
    clock = FakeClock(datetime(2026, 3, 1, 12, 0, tzinfo=UTC))
    assert glog.configure(mode="json", stream=stream, clock=clock) == "json"
    log = structlog.get_logger("gpuwarden.test")
    log.info("instance_terminated", instance_id="i-1", provider="sim-vast", reason="idle")
    log.debug("hidden")  # below the default level
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    rec = json.loads(lines[0])
    assert rec["event"] == "instance_terminated"
    assert rec["level"] == "info"
    assert rec["timestamp"] == "2026-03-01T12:00:00.000+00:00"  # from the injected clock
    assert rec["logger"] == "gpuwarden.test"
    assert (rec["instance_id"], rec["provider"], rec["reason"]) == ("i-1", "sim-vast", "idle")
    assert list(rec)[:3] == ["timestamp", "level", "event"]


def test_level_can_change_keeping_the_output() -> None:
    stream = io.StringIO()
    glog.configure(mode="json", stream=stream, clock=FakeClock(), level="warning")
    log = structlog.get_logger()
    log.info("quiet")
    glog.set_level("debug")
    log.debug("loud")
    assert [json.loads(x)["event"] for x in stream.getvalue().splitlines()] == ["loud"]


def test_console_lines_are_readable() -> None:
    stream = io.StringIO()
    glog.configure(mode="console", stream=stream, clock=FakeClock())
    structlog.get_logger().warning("lease_extended", instance_id="i-9", hours=2)
    out = stream.getvalue()
    assert "lease_extended" in out and "instance_id=i-9" in out and "warn" in out
    assert not out.lstrip().startswith("{")


def test_journal_entry_fields(journal: tuple[socket.socket, str]) -> None:
    sock, path = journal
    glog.configure(mode="journal", stream=io.StringIO(), journal_socket=path)
    structlog.get_logger("gpuwarden.guard").info(
        "instance_terminated",
        instance_id="i-42",
        job_id="j-7",
        provider="sim-lambda",
        reason="lease_expired",
        cost=1.25,
        details={"gpu": "A100"},
    )
    fields = parse_native(sock.recv(65536))
    assert fields["SYSLOG_IDENTIFIER"] == b"gpuwarden"
    assert fields["PRIORITY"] == b"6"
    assert fields["EVENT"] == b"instance_terminated"
    assert fields["INSTANCE_ID"] == b"i-42"
    assert fields["JOB_ID"] == b"j-7"
    assert fields["PROVIDER"] == b"sim-lambda"
    assert fields["REASON"] == b"lease_expired"
    assert fields["COST"] == b"1.25"
    assert json.loads(fields["DETAILS"]) == {"gpu": "A100"}
    assert fields["LOGGER"] == b"gpuwarden.guard"
    assert fields["MESSAGE"].startswith(b"instance_terminated instance_id=i-42")
    assert "TIMESTAMP" not in fields  # journald stamps entries itself


def test_journal_multiline_values_use_the_binary_form(journal: tuple[socket.socket, str]) -> None:
    sock, path = journal
    glog.configure(mode="journal", stream=io.StringIO(), journal_socket=path)
    log = structlog.get_logger()
    try:
        raise ValueError("first line\nsecond line")
    except ValueError:
        log.exception("loop_failed", service="guard", note="a\nb")
    data = sock.recv(65536)
    assert b"NOTE\n" + struct.pack("<Q", 3) + b"a\nb\n" in data  # the binary form, verbatim
    fields = parse_native(data)
    assert fields["PRIORITY"] == b"3"
    assert fields["SERVICE"] == b"guard"
    assert b"Traceback" in fields["EXCEPTION"] and b"second line" in fields["EXCEPTION"]
    assert fields["MESSAGE"].startswith(b"loop_failed") and b"Traceback" in fields["MESSAGE"]


def test_journal_keys_cannot_overwrite_entry_fields(journal: tuple[socket.socket, str]) -> None:
    sock, path = journal
    glog.configure(mode="journal", stream=io.StringIO(), journal_socket=path)
    structlog.get_logger().error("odd", message="mine", priority=0, syslog_identifier="x")
    fields = parse_native(sock.recv(65536))
    assert fields["SYSLOG_IDENTIFIER"] == b"gpuwarden"
    assert fields["PRIORITY"] == b"3"
    assert fields["F_MESSAGE"] == b"mine" and fields["F_PRIORITY"] == b"0"


def test_journal_redacts_too(journal: tuple[socket.socket, str]) -> None:
    sock, path = journal
    glog.configure(mode="journal", stream=io.StringIO(), journal_socket=path)
    glog.register_secret("journal-secret-value-123")
    structlog.get_logger().info("x", api_key="abc123456", note="has journal-secret-value-123")
    data = sock.recv(65536)
    assert b"abc123456" not in data and b"journal-secret-value-123" not in data


def test_large_entry_travels_in_a_memfd(journal: tuple[socket.socket, str]) -> None:
    sock, path = journal
    writer = systemd.JournalWriter(path)
    big = "x" * 400_000  # larger than a datagram may be
    writer.send({"MESSAGE": big, "SYSLOG_IDENTIFIER": "gpuwarden"})
    msg, fds, _, _ = socket.recv_fds(sock, 1024, 1)
    assert msg == b"" and len(fds) == 1
    with os.fdopen(fds[0], "rb") as f:
        f.seek(0)  # journald maps the memfd from its start
        fields = parse_native(f.read())
    assert fields["MESSAGE"] == big.encode()
    writer.close()


def test_unreachable_journal_falls_back_to_the_stream(tmp_path: Path) -> None:
    stream = io.StringIO()
    glog.configure(mode="journal", stream=stream, journal_socket=str(tmp_path / "none.sock"))
    structlog.get_logger().info("still_seen", k=1)
    assert "still_seen k=1" in stream.getvalue()


def test_auto_mode_detects_the_journal_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open(tmp_path / "out", "w") as f:
        st = os.fstat(f.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert glog.choose_mode(f) == "journal"
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")
        assert glog.choose_mode(f) == "json"  # stdout was redirected away from the journal
        monkeypatch.setenv("JOURNAL_STREAM", "garbage")
        assert glog.choose_mode(f) == "json"
    assert glog.choose_mode(io.StringIO()) == "json"  # no file descriptor at all


def test_journal_key_names() -> None:
    assert systemd.journal_key("instance_id") == "INSTANCE_ID"
    assert systemd.journal_key("_private") == "PRIVATE"
    assert systemd.journal_key("http.status") == "HTTP_STATUS"
    assert systemd.journal_key("2fa") == "F_2FA"
    assert len(systemd.journal_key("k" * 100)) == 64


def test_encode_decode_round_trip() -> None:
    fields = {"MESSAGE": "a\nb", "EVENT": "x=y", "EMPTY": ""}
    decoded = systemd.decode_entry(systemd.encode_entry(fields))
    assert decoded == {"MESSAGE": b"a\nb", "EVENT": b"x=y", "EMPTY": b""}
