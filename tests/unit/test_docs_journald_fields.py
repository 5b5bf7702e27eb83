"""The README's journalctl recipes name only fields the daemon really writes to journald, and
only event names and reasons that exist.

Each `journalctl` command in the operations docs (and README.md once merged) is parsed; every
FIELD=value match in it must be one of logging.JOURNAL_FIELDS, and JournalRenderer, sent
through systemd.JournalWriter to a fake journal socket, must really write that field. EVENT
values must be event names that daemon code logs; REASON values must be TerminationReasons.
"""

from __future__ import annotations

import re
import shlex
import socket
from pathlib import Path

import pytest

from gpuwarden.core.model import TerminationReason
from gpuwarden.system import logs as glog
from gpuwarden.system import systemd

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md"]
DAEMON = ROOT / "daemon" / "gpuwarden"
MATCH = re.compile(r"^([A-Z][A-Z0-9_]*)=(.*)$")


INLINE = re.compile(r"`(?:sudo )?(journalctl [^`]+)`")


def journalctl_commands() -> list[tuple[Path, list[str]]]:
    """Every journalctl command in the docs, split into words: lines of code blocks that
    start with it (continuations joined) and inline `journalctl ...` spans."""
    found = []
    for doc in DOCS:
        if not doc.exists():
            continue
        text = doc.read_text().replace("\\\n", " ")
        lines = [raw.strip().removeprefix("sudo ") for raw in text.splitlines()]
        commands = [line for line in lines if line.startswith("journalctl ")]
        commands += INLINE.findall(text)
        for command in commands:
            found.append((doc, shlex.split(command.split("|")[0], comments=True)))
    return found


def field_matches() -> list[tuple[str, str, str]]:
    """(command, FIELD, value) for every match in every recipe."""
    out = []
    for _doc, words in journalctl_commands():
        for word in words[1:]:
            m = MATCH.match(word)
            if m:
                out.append((" ".join(words), m.group(1), m.group(2)))
    return out


def written_fields(tmp_path: Path) -> dict[str, bytes]:
    """What the daemon's journal renderer and writer put on the wire for an event that
    carries every key the recipes rely on."""
    path = tmp_path / "journal.sock"
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind(str(path))
    writer = systemd.JournalWriter(str(path))
    try:
        event = {
            "event": "instance_terminated",
            "instance_id": "3f9a2c1b",
            "job_id": "j5d41402abc",
            "provider": "vast",
            "reason": "idle",
            "level": "info",
        }
        (fields,), _ = glog.JournalRenderer()(None, "info", event)
        writer.send(fields)
        journal.settimeout(5)
        return systemd.decode_entry(journal.recv(65536))
    finally:
        writer.close()
        journal.close()


def logged_event_names() -> set[str]:
    """Event names logged anywhere in the daemon: the first argument of log.<level>(...)."""
    call = re.compile(r"\blog\.(?:debug|info|warning|error|exception|critical)\(\s*\"([a-z_]+)\"")
    names: set[str] = set()
    for py in DAEMON.rglob("*.py"):
        names.update(call.findall(py.read_text()))
    return names


def test_the_docs_have_journalctl_recipes() -> None:
    commands = [" ".join(words) for _doc, words in journalctl_commands()]
    assert any("INSTANCE_ID=" in c for c in commands)
    assert any("EVENT=" in c for c in commands)
    assert any("-p err" in c for c in commands)
    assert any("-o json" in c for c in commands)


def test_recipe_fields_are_ones_the_writer_emits(tmp_path: Path) -> None:
    wire = written_fields(tmp_path)
    assert set(wire) >= glog.JOURNAL_FIELDS, "the renderer no longer writes a promised field"
    assert wire["SYSLOG_IDENTIFIER"] == b"gpuwarden"
    assert wire["INSTANCE_ID"] == b"3f9a2c1b"
    assert wire["EVENT"] == b"instance_terminated"
    for command, field, _value in field_matches():
        assert field in glog.JOURNAL_FIELDS, f"{command}: {field} is not a field we write"


def test_recipe_event_names_are_logged_by_the_daemon() -> None:
    events = logged_event_names()
    assert "instance_terminated" in events  # the scan itself works
    for command, field, value in field_matches():
        if field == "EVENT":
            assert value in events, f"{command}: no daemon code logs the event {value!r}"


def test_recipe_reasons_are_termination_reasons() -> None:
    for command, field, value in field_matches():
        if field == "REASON":
            assert value in {r.value for r in TerminationReason}, command


@pytest.mark.parametrize("reason", [r.value for r in TerminationReason])
def test_every_termination_reason_is_explained(reason: str) -> None:
    text = (ROOT / "README.md").read_text()
    assert f"| `{reason}` |" in text
