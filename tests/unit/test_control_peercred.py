"""Who may use the control socket: the pure credential check, and a real peer of another uid
that is refused before it is read (when the test runs as root and can become nobody)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from peer_support import NOBODY, as_nobody
from tests.conftest import MakeApp

from gpuwarden.config.settings import DaemonSettings, Settings
from gpuwarden.control.server import AccessRules, ControlServer, peer_groups

DAEMON_UID = 990
GROUP_GID = 4242


def _rules(**daemon: object) -> AccessRules:
    settings = DaemonSettings(**daemon)
    return AccessRules.from_settings(
        settings, daemon_uid=DAEMON_UID, lookup_group=lambda name: {"gpuwarden": GROUP_GID}[name]
    )


@pytest.mark.parametrize(
    ("uid", "gid", "groups", "allowed"),
    [
        (0, 0, frozenset(), True),  # root
        (DAEMON_UID, 1, frozenset(), True),  # the daemon's own uid
        (1500, 1500, frozenset(), True),  # in allowed_uids
        (1000, GROUP_GID, frozenset(), True),  # primary group is socket_group
        (1000, 1000, frozenset({27, GROUP_GID}), True),  # supplementary member
        (1000, 1000, frozenset({27, 100}), False),  # a stranger
        (65534, 65534, frozenset(), False),  # nobody
        (1501, GROUP_GID + 1, frozenset({GROUP_GID - 1}), False),  # near misses
    ],
)
def test_access_rules(uid: int, gid: int, groups: frozenset[int], allowed: bool) -> None:
    rules = _rules(socket_group="gpuwarden", allowed_uids=[1500])
    assert rules.allows(uid, gid, groups) is allowed


def test_without_a_socket_group_only_root_self_and_listed_uids_pass() -> None:
    rules = _rules(allowed_uids=[7])
    assert rules.group_gid is None
    assert rules.allows(7, 7, frozenset())
    assert rules.allows(0, 0, frozenset())
    assert not rules.allows(8, GROUP_GID, frozenset({GROUP_GID}))


def test_an_unknown_group_admits_no_one_by_group() -> None:
    rules = _rules(socket_group="no-such-group")
    assert rules.group_gid is None
    assert not rules.allows(1000, 1000, frozenset({GROUP_GID}))


def test_peer_groups_of_this_process_match_the_kernel() -> None:
    assert peer_groups(os.getpid(), os.getuid()) == frozenset(os.getgroups())


# --- a real refused peer ------------------------------------------------------------------

REQUEST = b'{"jsonrpc":"2.0","id":1,"method":"daemon.info"}\n'


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as uid 65534")
@pytest.mark.parametrize("allowed", [False, True])
async def test_a_peer_of_another_uid_is_refused_before_it_is_read(
    allowed: bool, short_dir: Path, make_app: MakeApp
) -> None:
    base = short_dir  # AF_UNIX paths are short
    settings = Settings(
        daemon=DaemonSettings(
            state_dir=base, socket=base / "control.sock", allowed_uids=[NOBODY] if allowed else []
        )
    )
    app = await make_app(settings)
    server = ControlServer(app)
    await server.start()
    task = asyncio.create_task(server.run())
    try:
        # Let the kernel admit the connection (the file mode would stop nobody before our
        # check does), so that what refuses it here is the credential check itself.
        os.chmod(base, 0o755)
        os.chmod(server.path, 0o666)
        got = await as_nobody(server.path, REQUEST)
    finally:
        app.stopping.set()
        await asyncio.wait_for(task, 5)
    if allowed:
        assert got.startswith('uid=65534 got=b\'{"jsonrpc":"2.0"'), got
    else:
        assert got == "uid=65534 got=b''", got  # nothing read, nothing answered: closed
