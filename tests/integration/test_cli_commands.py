"""Every control command against a real daemon (`gpuwarden run` with the example config, the
in-process sim cloud, a temporary state dir and socket), in its human and --json forms, with
the documented exit codes: 0 ok, 1 domain error, 2 usage, 69 no daemon.

Commands run in-process through `gpuwarden.cli.main` (fast); the exit codes of the real entry
point are checked once more through subprocesses.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import asyncssh
import pytest
from cli_support import (
    Daemon,
    daemon,
    gw,
    gw_json,
    launch_one,
    status_row,
    until,
    until_no_live,
)

STATUS_KEYS = {
    "id",
    "provider",
    "provider_id",
    "label",
    "gpu",
    "region",
    "state",
    "created_at",
    "uptime_s",
    "lease_until",
    "time_left_s",
    "price_per_hour",
    "cost_now",
    "est_total",
    "job",
}
HISTORY_KEYS = {
    "at",
    "instance_id",
    "provider",
    "provider_id",
    "reason",
    "uptime_s",
    "gpu",
    "region",
    "price_per_hour",
    "cost",
}

pytestmark = pytest.mark.slow
__all__ = ["daemon"]  # the fixture, imported for pytest to find


# --- exit codes without a daemon and for usage ----------------------------------------------


def test_no_daemon_exits_69_with_a_hint(tmp_path: Path) -> None:
    sock = "/tmp/gw-no-such-daemon.sock"
    proc = subprocess.run(
        [sys.executable, "-m", "gpuwarden", "status", "--socket", sock],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 69
    assert sock in proc.stderr
    assert "systemctl status gpuwarden" in proc.stderr
    env = {**os.environ, "GPUWARDEN_SOCKET": sock}
    code = subprocess.run(
        [sys.executable, "-m", "gpuwarden", "info", "--json"], env=env, timeout=30, check=False
    ).returncode
    assert code == 69


@pytest.mark.parametrize(
    "argv",
    [
        ["extend"],
        ["extend", "abc", "-1"],
        ["extend", "abc", "lots"],
        ["extend", "abc", "1h-30m"],
        ["launch", "--hours", "1"],  # neither --offer nor --gpu
        ["launch", "--offer", "1", "--gpu", "x"],
        ["status", "--bogus"],
        ["history", "--hours", "0"],
    ],
)
def test_usage_errors_exit_2(argv: list[str]) -> None:
    code, _, err = gw(None, *argv)
    assert code == 2
    assert "usage:" in err


@pytest.mark.parametrize(
    "argv", [["status", "--bogus"], ["extend", "abc", "1", "--hours", "2"], ["jobs", "-x"]]
)
def test_a_bad_flag_prints_the_subcommands_usage(argv: list[str]) -> None:
    code, _, err = gw(None, *argv)
    assert code == 2
    assert err.startswith(f"usage: gpuwarden {argv[0]} ")  # its flags, not the command list
    assert f"gpuwarden {argv[0]}: error: unrecognized arguments" in err


def test_usage_exit_code_of_the_real_entry_point() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gpuwarden", "costs", "--days", "x"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 2


# --- against the daemon -------------------------------------------------------------------


def test_info(daemon: Daemon) -> None:
    info = gw_json(daemon, "info")
    assert info["version"]
    assert info["providers"] == ["sim-lambda", "sim-vast"]
    assert "control" in info["heartbeats"]
    code, out, _ = gw(daemon, "info")
    assert code == 0
    assert "sim-vast" in out and "control" in out


def test_offers(daemon: Daemon) -> None:
    found = gw_json(daemon, "offers", "--gpu", "4090", "--max-price", "5", "--limit", "3")
    assert found["warnings"] == []
    offers = found["offers"]
    assert 0 < len(offers) <= 3
    assert all(o["gpu"] == "RTX 4090" and o["price_per_hour"] <= 5 for o in offers)
    # A model, not a substring: the sim sells A10s (Lambda) and A100s (both).
    a10 = gw_json(daemon, "offers", "--gpu", "A10")["offers"]
    assert a10 and all(o["gpu"].split()[0] == "A10" for o in a10)
    code, out, _ = gw(daemon, "offers", "--provider", "sim-lambda", "--limit", "2")
    assert code == 0
    assert "sim-lambda" in out and "PRICE" in out


def test_launch_status_extend_activity_destroy_history(daemon: Daemon) -> None:
    inst = launch_one(daemon)
    iid = inst["id"]
    assert inst["state"] in ("provisioning", "running")

    rows = gw_json(daemon, "status")
    row = next(r for r in rows if r["id"] == iid)
    assert row.keys() >= STATUS_KEYS
    assert row["created_at"].endswith(("Z", "+00:00"))
    code, out, _ = gw(daemon, "status")
    assert code == 0
    assert iid in out and "TOTAL" in out and "TIME LEFT" in out and "PROBE" in out
    assert "LEASE END" in out and "JOB" in out and "RATE" in out
    # The watchdog probes a new instance as soon as it runs; the PROBE cell then says so.
    until(lambda: status_row(daemon, iid)["last_probe_ok"] is True, "never probed")
    assert status_row(daemon, iid)["strikes"] == 0
    code, out, _ = gw(daemon, "status")
    line = next(ln for ln in out.splitlines() if iid in ln)
    assert "ok " in line and " ago" in line, out

    ext = gw_json(daemon, "extend", iid, "1")
    assert ext["id"] == iid
    code, out, _ = gw(daemon, "extend", iid, "0.5")
    assert code == 0 and "Extended" in out
    code, out, _ = gw(daemon, "extend", iid, "15m")  # a duration, as config writes them
    assert code == 0 and "by 15m 00s" in out
    code, out, err = gw(daemon, "extend", iid, "100", "--json")
    assert code == 1
    assert json.loads(out)["error"]["data"]["code"] == "lease_max_exceeded"
    assert "maximum" in err

    act = gw_json(daemon, "activity", iid)
    assert act["id"] == iid and act["deadline_reason"]
    code, out, _ = gw(daemon, "activity", iid)
    assert code == 0 and "active" in out

    ended = gw_json(daemon, "destroy", iid)
    assert ended["id"] == iid and ended["reason"] == "manual"
    code, _, err = gw(daemon, "destroy", iid)
    assert code == 1 and "already" in err

    history = gw_json(daemon, "history", "--hours", "1")
    rec = next(h for h in history if h["instance_id"] == iid)
    assert rec.keys() >= HISTORY_KEYS
    assert rec["reason"] == "manual"
    code, out, _ = gw(daemon, "history")
    assert code == 0 and iid in out and "manual" in out


def test_domain_errors_exit_1(daemon: Daemon) -> None:
    for argv in (["extend", "no-such-id", "1"], ["activity", "nope"], ["destroy", "nope"]):
        code, out, err = gw(daemon, *argv)
        assert code == 1, argv
        assert "no instance" in err
        assert out == ""
    code, out, _ = gw(daemon, "extend", "no-such-id", "1", "--json")
    assert code == 1
    assert json.loads(out)["error"]["data"]["code"] == "not_found"
    code, _, err = gw(daemon, "launch", "--offer", "no-such-offer", "--yes")
    assert code == 1 and "no offer" in err


def test_an_instance_is_named_by_a_unique_id_prefix_or_its_label(daemon: Daemon) -> None:
    inst = launch_one(daemon)
    iid, label = inst["id"], inst["label"]
    assert gw_json(daemon, "extend", iid[:5], "0.5")["id"] == iid
    code, out, _ = gw(daemon, "activity", iid[:4])
    assert code == 0 and f"Marked {iid} active" in out
    code, out, err = gw(daemon, "destroy", iid[:3], "--json")
    assert code == 1
    assert json.loads(out)["error"]["data"]["code"] == "not_found"
    assert "at least 4 characters" in err
    assert gw_json(daemon, "destroy", label)["id"] == iid
    until_no_live(daemon)


def test_launch_by_offer_id_and_destroy_all(daemon: Daemon) -> None:
    offer = gw_json(daemon, "offers", "--provider", "sim-lambda", "--limit", "1")["offers"][0]
    inst = gw_json(
        daemon, "launch", "--offer", offer["offer_id"], "--provider", "sim-lambda", "--yes"
    )
    assert inst["provider"] == "sim-lambda"
    code, _, err = gw(daemon, "destroy-all")
    assert code == 1 and "--yes" in err  # no terminal, no --yes: nothing destroyed
    assert any(r["id"] == inst["id"] for r in gw_json(daemon, "status"))
    result = gw_json(daemon, "destroy-all", "--yes")
    assert inst["id"] in [i["id"] for i in result["instances"]]
    # Lambda ends instances asynchronously: they stay "terminating" until it stops listing them.
    assert all(r["state"] == "terminating" for r in gw_json(daemon, "status"))
    until_no_live(daemon)
    code, out, _ = gw(daemon, "status")
    assert code == 0 and "No live instances" in out
    code, out, _ = gw(daemon, "destroy-all", "--yes")
    assert code == 0


def test_costs(daemon: Daemon) -> None:
    launch_one(daemon)
    costs = gw_json(daemon, "costs", "--days", "2")
    assert {"days", "by_provider", "by_reason", "total", "idle"} <= costs.keys()
    code, out, _ = gw(daemon, "costs")
    assert code == 0 and "TOTAL" in out and "BY PROVIDER" in out
    gw_json(daemon, "destroy-all", "--yes")


def test_events_and_reload(daemon: Daemon) -> None:
    inst = launch_one(daemon)
    events = gw_json(daemon, "events", "--id", inst["id"])
    # A prefix names it too. Read second, so it may hold more: the reconciler can record
    # what the provider reports about the new instance in between.
    assert gw_json(daemon, "events", "--id", inst["id"][:5])[: len(events)] == events
    assert [e["to_state"] for e in events if e["name"] == "state"][:2] == [
        "requested",
        "provisioning",
    ]
    code, out, _ = gw(daemon, "events", "--limit", "5")
    assert code == 0 and "->" in out
    reload = gw_json(daemon, "reload")
    assert reload["reloaded"] is True
    code, out, _ = gw(daemon, "reload")
    assert code == 0 and "Configuration reloaded: nothing changed." in out
    gw_json(daemon, "destroy", inst["id"])


def test_events_follow_streams_new_events(daemon: Daemon) -> None:
    inst = launch_one(daemon)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gpuwarden",
            "events",
            "--follow",
            "--json",
            "--limit",
            "1",
            "--socket",
            str(daemon.socket),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        first = json.loads(proc.stdout.readline())  # the backlog (one event) comes first
        assert first["name"]
        gw_json(daemon, "activity", inst["id"])
        for _ in range(50):
            line = proc.stdout.readline()
            assert line, proc.stderr.read() if proc.stderr else ""
            ev = json.loads(line)
            if ev["name"] == "activity" and ev["entity_id"] == inst["id"]:
                break
        else:
            pytest.fail("the activity event never arrived")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0  # Ctrl-C is how a follower stops: not an error
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        gw_json(daemon, "destroy", inst["id"])


# --- reap: no daemon, straight through the provider APIs -----------------------------------


async def test_reap_destroys_labelled_instances_while_the_daemon_is_stopped(
    short_dir: Path,
) -> None:
    from gpuwarden.config.settings import SimSettings, load
    from gpuwarden.core.clock import SystemClock
    from gpuwarden.core.model import Instance, InstanceState, TerminationReason
    from gpuwarden.providers import build_providers
    from gpuwarden.providers.base import LaunchSpec, Requirements
    from gpuwarden.sim.server import SimCloud
    from gpuwarden.store import Store

    base = short_dir
    clock = SystemClock()
    sim = SimCloud(SimSettings(boot_delay=0.1), clock, sandbox_root=base / "sim")
    urls = await sim.start()
    try:
        cfg = base / "config.toml"
        cfg.write_text(
            f'[daemon]\nstate_dir = "{base / "state"}"\nsocket = "{base / "c.sock"}"\n'
            f'[providers.sim]\nenabled = true\nbase_url = "{urls.admin}"\n'
        )
        settings = load(cfg)
        providers = build_providers(settings, clock, sim_urls=urls)
        launched: dict[str, str] = {}
        key = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
        for name, label in (
            ("sim-vast", "gpuwarden-main-aaaa0001"),
            ("sim-lambda", "gpuwarden-main-aaaa0002"),
            ("sim-vast", "someone-else-1"),  # not ours: reap must leave it alone
        ):
            p = providers[name]
            offer = (await p.search_offers(Requirements(min_reliability=0, limit=5)))[0]
            got = await p.launch(offer, LaunchSpec(label=label, image="img", ssh_public_key=key))
            launched[label] = got.provider_id

        # The database knows the Vast one (as a crashed daemon would have left it).
        (base / "state").mkdir()
        store = await Store.open(settings.db_path, clock)
        now = clock.now()
        await store.insert_instance(
            Instance(
                id="aaaa0001",
                provider="sim-vast",
                label="gpuwarden-main-aaaa0001",
                state=InstanceState.PROVISIONING,
                created_at=now,
                lease_until=now,
                last_activity=now,
                price_per_hour=0.5,
                provider_id=launched["gpuwarden-main-aaaa0001"],
                provider_started_at=now,
            )
        )
        await store.close()

        async def reap(*extra: str) -> tuple[int, str, str]:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "gpuwarden",
                "reap",
                "--config",
                str(cfg),
                *extra,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode is not None
            return proc.returncode, out.decode(), err.decode()

        # Without a terminal and without --yes: shows them, destroys nothing.
        code, out, err = await reap()
        assert code == 1, err
        assert "gpuwarden-main-aaaa0001" in out and "gpuwarden-main-aaaa0002" in out
        assert "someone-else" not in out
        assert "--yes" in err
        assert all(e.ended_at is None for e in sim.core.ledger.entries())

        code, out, err = await reap("--yes", "--json")
        assert code == 0, err
        report = json.loads(out)
        assert {d["label"] for d in report["destroyed"]} == {
            "gpuwarden-main-aaaa0001",
            "gpuwarden-main-aaaa0002",
        }
        assert "recorded 1 known and 1 unknown" in report["recorded"]
        ended = {e.label: e.ended_at is not None for e in sim.core.ledger.entries()}
        assert ended == {
            "gpuwarden-main-aaaa0001": True,
            "gpuwarden-main-aaaa0002": True,
            "someone-else-1": False,
        }

        store = await Store.open(settings.db_path, clock)
        try:
            inst = await store.get_instance("aaaa0001")
            assert inst.state is InstanceState.TERMINATED
            assert inst.reason is TerminationReason.MANUAL
            assert [t.instance_id for t in await store.terminations(now - timedelta(hours=1))] == [
                "aaaa0001"
            ]
            reaped = [e for e in await store.events() if e.name == "reaped"]
            assert [e.details["label"] for e in reaped] == ["gpuwarden-main-aaaa0002"]
        finally:
            await store.close()

        code, out, _ = await reap("--yes")  # nothing left of ours
        assert code == 0
        assert "No instance with our label" in out
        for p in providers.values():
            await p.aclose()
    finally:
        await sim.stop()
