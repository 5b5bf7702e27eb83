"""Issue 15's everyday pieces without a daemon: relative paths in a config, finding a
checkout's socket, ssh.authorized_keys, the host-key and authorized_keys helpers, the ssh
command line and Host blocks, how status shows booting and stale probes, the reconciler's
quicker listing while a launch boots, and the manual page and completion scripts."""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import socket
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from tests.conftest import T0, MakeApp, eventually

from gpuwarden.cli import client as client_mod
from gpuwarden.cli import commands_views as views
from gpuwarden.cli.commands_docs import man_page
from gpuwarden.cli.commands_ssh import host_block, ssh_argv
from gpuwarden.cli.output import Out
from gpuwarden.config import paths
from gpuwarden.config import settings as config
from gpuwarden.core.clock import FakeClock
from gpuwarden.core.model import InstanceState
from gpuwarden.core.policy import probe_stale
from gpuwarden.fleet import launcher
from gpuwarden.loops.reconciler import BOOT_POLL, Reconciler
from gpuwarden.providers.fake import FakeProvider
from gpuwarden.remote import hostkeys

PUB = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()


# --- config: relative paths, authorized_keys ----------------------------------------------


def test_relative_paths_in_a_file_are_relative_to_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "etc" / "gw.toml"
    conf.parent.mkdir()
    conf.write_text(
        '[daemon]\nstate_dir = "state"\nsocket = "run/c.sock"\n[jobs]\noutput_dir = "/abs/out"\n'
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    s = config.load(conf)
    assert s.daemon.socket == conf.parent / "run" / "c.sock"
    assert s.daemon.state_dir == conf.parent / "state"
    assert s.jobs.output_dir == Path("/abs/out")  # absolute stays as written
    # A path from the environment is the shell's: relative to the current directory.
    monkeypatch.setenv("GPUWARDEN_DAEMON__SOCKET", "env.sock")
    assert config.load(conf).daemon.socket == Path("env.sock")


def test_authorized_keys_must_be_public_key_lines(tmp_path: Path) -> None:
    conf = tmp_path / "gw.toml"
    conf.write_text(f'[ssh]\nauthorized_keys = ["{PUB} alice@laptop"]\n')
    assert config.load(conf).ssh.authorized_keys == [f"{PUB} alice@laptop"]
    conf.write_text('[ssh]\nauthorized_keys = ["-----BEGIN OPENSSH PRIVATE KEY-----"]\n')
    with pytest.raises(config.ConfigError) as err:
        config.load(conf)
    assert err.value.problems[0][0] == "ssh.authorized_keys.0"
    assert "not an OpenSSH public key line" in err.value.problems[0][1]


# --- the CLI finds the socket ---------------------------------------------------------------


@pytest.fixture
def no_system_daemon(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("GPUWARDEN_SOCKET", "GPUWARDEN_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(paths, "DEFAULT_CONFIG_PATH", tmp_path / "no-etc.toml")
    monkeypatch.setattr(paths, "DEFAULT_SOCKET", tmp_path / "no-run.sock")


def test_a_checkouts_socket_is_found_from_inside_it(
    no_system_daemon: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkout = tmp_path / "co"
    (checkout / "daemon" / "gpuwarden").mkdir(parents=True)
    (checkout / client_mod.CHECKOUT_CONFIG).write_text('[daemon]\nsocket = ".gw/c.sock"\n')
    monkeypatch.chdir(checkout / "daemon" / "gpuwarden")
    # No daemon started from it: the default, so the error names the usual place.
    assert client_mod.resolve_socket() == tmp_path / "no-run.sock"
    (checkout / ".gw").mkdir()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(checkout / ".gw" / "c.sock"))  # as `make run` leaves it
        assert client_mod.resolve_socket() == checkout / ".gw" / "c.sock"
        # What is named explicitly still wins.
        assert client_mod.resolve_socket("/x.sock") == Path("/x.sock")
        monkeypatch.setenv("GPUWARDEN_SOCKET", "/y.sock")
        assert client_mod.resolve_socket() == Path("/y.sock")


def test_the_system_config_comes_before_a_checkout(
    no_system_daemon: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    etc = tmp_path / "etc.toml"
    etc.write_text('[daemon]\nsocket = "/srv/gw.sock"\n')
    monkeypatch.setattr(paths, "DEFAULT_CONFIG_PATH", etc)
    assert client_mod.resolve_socket() == Path("/srv/gw.sock")


# --- host keys and authorized_keys ----------------------------------------------------------


def test_known_hosts_lines_and_file(tmp_path: Path) -> None:
    key = "ssh-ed25519 AAAAkey"
    assert hostkeys.known_hosts_line("10.0.0.1", 22, key + " comment") == f"10.0.0.1 {key}"
    assert hostkeys.known_hosts_line("10.0.0.1", 2222, key) == f"[10.0.0.1]:2222 {key}"
    path = tmp_path / "state" / "known_hosts"
    hostkeys.write_known_hosts(path, [("h", 2, key), ("a", 1, key), ("h", 2, key)])
    assert path.read_text() == f"[a]:1 {key}\n[h]:2 {key}\n"
    assert path.stat().st_mode & 0o777 == 0o644
    assert hostkeys.fingerprint(PUB).startswith("SHA256:")


def test_authorized_keys_are_appended_once() -> None:
    other = "ssh-ed25519 AAAAother bob"
    assert hostkeys.merged_authorized_keys("", [PUB]) == PUB + "\n"
    current = "# mine\nssh-rsa AAAAold me"  # no final newline
    merged = hostkeys.merged_authorized_keys(current, [PUB, other, PUB])
    assert merged == f"{current}\n{PUB}\n{other}\n"
    # Present already (a different comment is the same key): nothing to write.
    same = " ".join(PUB.split()[:2]) + " another-comment"
    assert hostkeys.merged_authorized_keys(merged or "", [same, other]) is None
    assert hostkeys.keys_digest([PUB, other]) == hostkeys.keys_digest([other, PUB + " x"])
    assert hostkeys.keys_digest([PUB]) != hostkeys.keys_digest([PUB, other])


# --- the ssh command line and Host blocks ----------------------------------------------------


def info(identity: str | None) -> dict[str, Any]:
    return {
        "id": "ab12cd34",
        "label": "gpuwarden-main-ab12cd34",
        "state": "running",
        "user": "root",
        "host": "10.1.2.3",
        "port": 41022,
        "known_hosts": "/var/lib/gpuwarden/known_hosts",
        "identity_file": identity,
        "ssh_ready": True,
    }


def test_ssh_argv_pins_the_host_key_and_passes_the_command_as_arguments(tmp_path: Path) -> None:
    key = tmp_path / "id"
    key.write_text("k")
    argv = ssh_argv(info(str(key)), ["sh", "-c", "echo $HOME; rm -rf /"])
    assert argv == [
        "ssh",
        "-p",
        "41022",
        "-o",
        "UserKnownHostsFile=/var/lib/gpuwarden/known_hosts",
        "-o",
        "StrictHostKeyChecking=yes",
        "-i",
        str(key),
        "root@10.1.2.3",
        "--",
        "sh",
        "-c",
        "echo $HOME; rm -rf /",
    ]
    # A key this user may not read is left to ssh's own keys (ssh.authorized_keys).
    assert "-i" not in ssh_argv(info(str(tmp_path / "unreadable")))


def test_host_block() -> None:
    block = host_block(info(None), "/kh", None)
    assert block.splitlines() == [
        "# ab12cd34 (running)",
        "Host gpuwarden-main-ab12cd34",
        "    HostName 10.1.2.3",
        "    Port 41022",
        "    User root",
        "    UserKnownHostsFile /kh",
        "    StrictHostKeyChecking yes",
    ]


# --- status: booting, stale probes, the SSH cell ------------------------------------------


def test_running_is_shown_only_once_ssh_answered() -> None:
    assert views.shown_state({"state": "running", "ssh_ready": False}) == "booting"
    assert views.shown_state({"state": "running", "ssh_ready": True}) == "running"
    assert views.shown_state({"state": "provisioning", "ssh_ready": False}) == "provisioning"
    assert views.shown_state({"state": "running"}) == "running"  # an older daemon


def test_a_stale_probe_is_marked() -> None:
    now = "2026-11-25T08:10:00+00:00"
    row = {"last_probe_at": "2026-11-25T08:00:00+00:00", "last_probe_ok": True}
    assert views.probe_cell(row, now).plain == "ok 10m ago"
    stale = views.probe_cell({**row, "probe_stale": True}, now)
    assert stale.plain == "ok 10m ago (stale)" and "yellow" in str(stale.style)
    assert views.ssh_cell({"ssh": "root@10.0.0.1:2200"}) == "root@10.0.0.1 -p 2200"
    assert views.ssh_cell({"ssh": None}) == "-"


def test_probe_stale_after_three_intervals() -> None:
    from gpuwarden.core.model import Instance

    now = datetime(2026, 11, 25, 8, 0, tzinfo=UTC)
    base = Instance(
        id="i1",
        provider="fake",
        label="gpuwarden-main-i1",
        state=InstanceState.RUNNING,
        created_at=now,
        lease_until=now,
        last_activity=now,
        price_per_hour=0.5,
    )
    interval = timedelta(seconds=30)
    assert not probe_stale(base, interval, now)  # never probed: '-', not stale
    probed = replace(base, last_probe_at=now - timedelta(seconds=90))
    assert not probe_stale(probed, interval, now)
    old = replace(base, last_probe_at=now - timedelta(seconds=91))
    assert probe_stale(old, interval, now)
    assert not probe_stale(replace(old, state=InstanceState.TERMINATING), interval, now)


def test_the_status_table_shows_booting_and_the_ssh_column() -> None:
    buf = io.StringIO()
    out = Out(stdout=buf, width=200)
    row = {
        "id": "ab12cd34",
        "provider": "sim-vast",
        "gpu": "RTX 4090",
        "state": "running",
        "ssh_ready": False,
        "ssh": "root@127.0.0.1:40001",
        "price_per_hour": 0.3,
    }
    views.status_table(out, [row], None)
    text = buf.getvalue()
    assert "SSH" in text.splitlines()[0]
    assert "booting" in text and "root@127.0.0.1 -p 40001" in text


# --- the reconciler lists sooner while a launch boots ---------------------------------------


async def test_the_reconciler_lists_within_boot_poll_after_a_launch(
    make_app: MakeApp, clock: FakeClock
) -> None:
    fake = FakeProvider(clock, "fake", boot_delay=timedelta(seconds=1))
    app = await make_app(clock=clock, providers=[fake])
    assert app.settings.policy.poll_interval > BOOT_POLL * 5
    rec = Reconciler(app)
    task = asyncio.create_task(rec.run())
    try:
        await asyncio.wait_for(rec.asleep.wait(), 5)
        inst = await launcher.launch(app, fake.offers[0])
        short_wake = clock.now() + BOOT_POLL

        def on_the_short_wait() -> bool:  # the woken loop went back to sleep for BOOT_POLL
            wake = clock.next_wake()
            return rec.asleep.is_set() and wake is not None and wake <= short_wake

        await eventually(on_the_short_wait, what="the reconciler asleep for BOOT_POLL")
        await clock.advance(BOOT_POLL.total_seconds() + 0.001)
        await asyncio.wait_for(rec.asleep.wait(), 5)
        got = await app.store.get_instance(inst.id)
        assert got.state is InstanceState.RUNNING  # not a whole poll_interval later
        assert rec.passes == 1
        # Nothing booting any more: back to poll_interval.
        await clock.advance(BOOT_POLL.total_seconds() * 2)
        assert rec.passes == 1
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await app.store.close()
    assert clock.now() > T0


# --- the manual page and completion -----------------------------------------------------------


def test_the_man_page_lists_every_command() -> None:
    from gpuwarden.cli import build_parser

    page = man_page()
    assert page.startswith(".TH GPUWARDEN")
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    names = list(sub.choices)
    for name in names:
        assert f"gpuwarden {name.replace('-', chr(92) + '-')}" in page, name


def test_completion_scripts(capsys: pytest.CaptureFixture[str]) -> None:
    from gpuwarden.cli import main

    for shell, marker in (("bash", "complete"), ("zsh", "#compdef gpuwarden")):
        with pytest.raises(SystemExit) as done:
            main(["completion", shell])
        assert done.value.code == 0
        text = capsys.readouterr().out
        assert marker in text and "ssh-config" in text
    assert os.environ.get("GPUWARDEN_NEVER_SET") is None


async def test_keys_that_cannot_be_copied_are_tried_again_not_a_failed_probe() -> None:
    class NoSftp:
        def start_sftp_client(self) -> Any:
            raise OSError("subsystem request failed")

    conn: Any = NoSftp()
    assert await hostkeys.ensure_authorized_keys(conn, [PUB], None) is None  # try again later
    assert await hostkeys.ensure_authorized_keys(conn, [], None) is None  # nothing to put
    have = hostkeys.keys_digest([PUB])
    assert await hostkeys.ensure_authorized_keys(conn, [PUB], have) == have  # not touched
