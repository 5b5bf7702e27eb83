"""Every control command against a real daemon (`gpuwarden run` with the example config, the
in-process sim cloud, a temporary state dir and socket), in its human and --json forms, with
the documented exit codes: 0 ok, 1 domain error, 2 usage, 69 no daemon.

Commands run in-process through `gpuwarden.cli.main` (fast); the exit codes of the real entry
point are checked once more through subprocesses.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from control_support import running_server
from tests.conftest import LoopThread, daemon_env, eventually, short_tmp

from gpuwarden.cli import main
from gpuwarden.control.methods import LaunchParams, Method, NoParams, OffersParams
from gpuwarden.system.childproc import ChildFailed, DaemonProcess

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config.example.toml"
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


class Daemon:
    """`gpuwarden run` with the example config, state and socket in `base`, its output read on
    a loop of its own (the tests are synchronous: the CLI runs its own event loop)."""

    def __init__(self, base: Path, loop: LoopThread) -> None:
        self.base = base
        self.socket = base / "control.sock"
        self.loop = loop
        self.env = daemon_env(
            GPUWARDEN_DAEMON__STATE_DIR=str(base / "state"),
            GPUWARDEN_DAEMON__SOCKET=str(self.socket),
            GPUWARDEN_PROVIDERS__SIM__BOOT_DELAY="0.2s",
            GPUWARDEN_POLICY__POLL_INTERVAL="1s",
        )
        self.proc: DaemonProcess | None = None

    def start(self) -> None:
        self.proc = self.loop.run(DaemonProcess.start(EXAMPLE, self.env, cwd=self.base))
        self.loop.run(self.proc.wait_for("daemon_ready", 30))

    def stop(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ChildFailed):  # killed if SIGTERM did not end it
                self.loop.run(self.proc.stop(20))


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    with short_tmp() as base, LoopThread() as loop:
        d = Daemon(base, loop)
        try:
            d.start()
            yield d
        finally:
            d.stop()


def gw(d: Daemon | None, *argv: str) -> tuple[int, str, str]:
    """Run one command in-process; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    full = list(argv)
    if d is not None:
        full += ["--socket", str(d.socket)]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(full)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        else:
            code = 0
    return code, out.getvalue(), err.getvalue()


def gw_json(d: Daemon, *argv: str) -> Any:
    code, out, err = gw(d, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def _until(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """`eventually` for these synchronous tests: `check` runs the CLI, which runs its own
    event loop, so it is called in a worker thread."""
    asyncio.run(
        eventually(lambda: asyncio.to_thread(check), timeout=timeout, interval=0.2, what=what)
    )


def _until_no_live(d: Daemon) -> None:
    _until(lambda: not gw_json(d, "status"), "no live instances")


def _row(d: Daemon, iid: str) -> dict[str, Any]:
    row: dict[str, Any] = next(r for r in gw_json(d, "status") if r["id"] == iid)
    return row


def _launch(d: Daemon, *extra: str) -> dict[str, Any]:
    inst: dict[str, Any] = gw_json(d, "launch", "--gpu", "4090", "--hours", "1", "--yes", *extra)
    return inst


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


def test_launch_refuses_without_a_terminal_and_without_yes(daemon: Daemon) -> None:
    before = {r["id"] for r in gw_json(daemon, "status")}
    code, out, err = gw(daemon, "launch", "--gpu", "4090", "--hours", "1")
    assert code == 1
    assert "--yes" in err
    assert "Estimate" in out and "RTX 4090" in out  # the dry run was shown
    assert {r["id"] for r in gw_json(daemon, "status")} == before  # nothing was rented


def test_launch_status_extend_activity_destroy_history(daemon: Daemon) -> None:
    inst = _launch(daemon)
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
    _until(lambda: _row(daemon, iid)["last_probe_ok"] is True, "never probed")
    assert _row(daemon, iid)["strikes"] == 0
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
    inst = _launch(daemon)
    iid, label = inst["id"], inst["label"]
    assert gw_json(daemon, "extend", iid[:5], "0.5")["id"] == iid
    code, out, _ = gw(daemon, "activity", iid[:4])
    assert code == 0 and f"Marked {iid} active" in out
    code, out, err = gw(daemon, "destroy", iid[:3], "--json")
    assert code == 1
    assert json.loads(out)["error"]["data"]["code"] == "not_found"
    assert "at least 4 characters" in err
    assert gw_json(daemon, "destroy", label)["id"] == iid
    _until_no_live(daemon)


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
    _until_no_live(daemon)
    code, out, _ = gw(daemon, "status")
    assert code == 0 and "No live instances" in out
    code, out, _ = gw(daemon, "destroy-all", "--yes")
    assert code == 0


def test_costs(daemon: Daemon) -> None:
    _launch(daemon)
    costs = gw_json(daemon, "costs", "--days", "2")
    assert {"days", "by_provider", "by_reason", "total", "idle"} <= costs.keys()
    code, out, _ = gw(daemon, "costs")
    assert code == 0 and "TOTAL" in out and "BY PROVIDER" in out
    gw_json(daemon, "destroy-all", "--yes")


def test_events_and_reload(daemon: Daemon) -> None:
    inst = _launch(daemon)
    events = gw_json(daemon, "events", "--id", inst["id"])
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
    inst = _launch(daemon)
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


def _own_terminal() -> None:
    """In the child: a session of its own, the pseudo-terminal on stdin as its controlling
    terminal, so that a typed Ctrl-C (0x03) reaches it as SIGINT, as in a real shell."""
    import fcntl
    import termios

    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _on_a_terminal(d: Daemon, answer: bytes, *argv: str) -> tuple[int, str]:
    """Run a command with a pseudo-terminal as stdin/stdout/stderr (and its controlling
    terminal) and type `answer` at the prompt: b"\x03" is Ctrl-C, b"\x04" Ctrl-D (EOF).
    Reads with bounded waits under an overall deadline (a real process): a command still
    waiting for more input when it passes is killed and reported as -9."""
    import pty
    import select

    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpuwarden", *argv, "--socket", str(d.socket)],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env={**os.environ, "NO_COLOR": "1"},
        preexec_fn=_own_terminal,  # noqa: PLW1509 - no lock is taken between fork and exec
    )
    os.close(slave)
    seen = b""
    answered = False
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            if not answered and b"[y/N]" in seen:
                os.write(master, answer)
                answered = True
            ready, _, _ = select.select([master], [], [], 0.2)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        try:  # the terminal closes a moment before the process has exited
            code = proc.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(master)
    assert answered, seen
    return code, seen.decode(errors="replace")


REFUSED = "$9.00/h is over budget.max_hourly_price ($2.50/h)"


async def test_a_launch_the_dry_run_refuses_is_not_attempted() -> None:
    """The dry run says a launch would be refused (price, budget): the confirmation shows
    why, and the CLI stops there with exit 1, without asking and without launching."""
    asked: list[bool] = []

    async def launch(app: Any, p: LaunchParams) -> dict[str, Any]:
        asked.append(p.dry_run)
        assert p.dry_run, "a refused launch was attempted"
        return {
            "dry_run": True,
            "provider": "sim-vast",
            "offer_id": "o1",
            "gpu": "H100 80GB",
            "num_gpus": 1,
            "gpu_ram_gb": 80.0,
            "price_per_hour": 9.0,
            "region": "EU",
            "hours": 4.0,
            "estimated_cost": 36.0,
            "refused": REFUSED,
            "refused_code": "price_too_high",
        }

    async with running_server(methods={"launch": Method(LaunchParams, launch)}) as (_, app):
        sock = str(app.settings.daemon.socket)

        def run(*argv: str) -> tuple[int, str, str]:
            return gw(None, "launch", "--gpu", "h100", *argv, "--socket", sock)

        code, out, err = await asyncio.to_thread(run)
        assert code == 1
        assert f"Refused:   {REFUSED}" in out and "Estimate" in out  # in the confirmation
        assert REFUSED in err and "budget.max_hourly_price in the config" in err  # and a hint
        assert "--yes" not in err  # it did not get as far as asking
        code, out, err = await asyncio.to_thread(run, "--yes")
        assert code == 1 and REFUSED in err and out == ""
        code, out, err = await asyncio.to_thread(run, "--yes", "--json")
        assert code == 1
        error = json.loads(out)["error"]
        assert error["message"] == REFUSED and error["data"]["code"] == "price_too_high"
        assert asked == [True, True, True]


WARNING = "no offers from sim-lambda: 429 rate-limited (its search failed)"


async def test_a_provider_that_failed_is_a_warning_and_yes_still_shows_the_estimate() -> None:
    """A provider whose search failed is named on stderr (and in --json) by offers and
    launch; with --yes the estimate, with what ends the instance and the budget left
    today, still goes to stderr, stdout keeping the launch's own answer."""
    estimate = {
        "dry_run": True,
        "provider": "sim-vast",
        "offer_id": "o1",
        "gpu": "A10",
        "num_gpus": 1,
        "gpu_ram_gb": 24.0,
        "price_per_hour": 0.5,
        "region": "US",
        "hours": 2.0,
        "estimated_cost": 1.0,
        "idle_timeout_s": 1800.0,
        "hard_cap_h": 8.0,
        "daily_limit": 10.0,
        "daily_spent": 1.25,
        "daily_committed": 2.0,
        "daily_left": 8.0,
        "refused": None,
        "refused_code": None,
        "warnings": [WARNING],
    }

    async def offers(app: Any, p: OffersParams) -> dict[str, Any]:
        return {"offers": [], "warnings": [WARNING]}

    async def launch(app: Any, p: LaunchParams) -> dict[str, Any]:
        if p.dry_run:
            return estimate
        return {"id": "abcd1234", "provider": "sim-vast", "gpu": "A10", "state": "requested"}

    methods: dict[str, Method[Any]] = {
        "offers": Method(OffersParams, offers),
        "launch": Method(LaunchParams, launch),
    }
    async with running_server(methods=methods) as (_, app):
        sock = str(app.settings.daemon.socket)

        def run(*argv: str) -> tuple[int, str, str]:
            return gw(None, *argv, "--socket", sock)

        code, out, err = await asyncio.to_thread(run, "offers", "--gpu", "A10")
        assert code == 0 and "No offers match" in out
        assert f"warning: {WARNING}" in err
        code, out, err = await asyncio.to_thread(run, "offers", "--gpu", "A10", "--json")
        assert code == 0 and json.loads(out)["warnings"] == [WARNING]
        code, out, err = await asyncio.to_thread(run, "launch", "--gpu", "A10", "--yes")
        assert code == 0 and "Launched abcd1234" in out and "Estimate" not in out
        assert "Estimate:  $1.00" in err and f"warning: {WARNING}" in err
        assert "after 30m 00s idle" in err and "8 h after launch (hard cap)" in err
        assert "$8.00 left today of $10.00 (spent $1.25, committed $2.00)" in err


async def test_a_refused_reload_says_so_and_exits_1() -> None:
    problem = "policy.idle_timeout: not a duration (from /etc/gpuwarden/config.toml)"

    async def reload(app: Any, p: NoParams) -> dict[str, Any]:
        return {"reloaded": False, "problems": [problem]}

    methods: dict[str, Method[Any]] = {"config.reload": Method(NoParams, reload)}
    async with running_server(methods=methods) as (_, app):
        sock = str(app.settings.daemon.socket)
        code, out, err = await asyncio.to_thread(gw, None, "reload", "--socket", sock)
        assert code == 1 and "reloaded" not in out.lower()
        assert "configuration refused; the running configuration stays" in err
        assert problem in err
        code, out, err = await asyncio.to_thread(gw, None, "reload", "--socket", sock, "--json")
        assert code == 1 and json.loads(out)["problems"] == [problem]


def test_launch_and_destroy_all_ask_on_a_terminal(daemon: Daemon) -> None:
    before = {r["id"] for r in gw_json(daemon, "status")}
    code, text = _on_a_terminal(daemon, b"n\n", "launch", "--gpu", "4090", "--hours", "1")
    assert code == 1
    assert "Estimate" in text and "not launched" in text
    assert {r["id"] for r in gw_json(daemon, "status")} == before
    code, text = _on_a_terminal(daemon, b"y\n", "launch", "--gpu", "4090", "--hours", "1")
    assert code == 0, text
    assert "Launched" in text
    iid = next(ln.split()[1] for ln in text.splitlines() if ln.startswith("Launched"))
    code, text = _on_a_terminal(daemon, b"y\n", "destroy-all")
    assert code == 0, text
    asked = text[: text.index("[y/N]")]  # shown before the question: what, at what rate
    assert "This destroys 1 instance(s), together $0." in asked
    assert iid in asked and "RTX 4090" in asked and "/h" in asked and "so far" in asked
    assert "Destroyed 1/1." in text  # sim-vast confirms at once
    _until_no_live(daemon)


@pytest.mark.parametrize(("key", "code"), [(b"\x03", 130), (b"\x04", 1)], ids=["ctrl-c", "eof"])
def test_ctrl_c_or_eof_at_a_prompt_never_acts_and_returns_at_once(
    daemon: Daemon, key: bytes, code: int
) -> None:
    """Ctrl-C or EOF typed at the prompt, and nothing after it (no Enter): the command ends
    by itself, before the deadline of the terminal helper, and nothing was launched or
    destroyed. Ctrl-C exits 130, EOF is a "no" (exit 1)."""
    before = {r["id"] for r in gw_json(daemon, "status")}
    got, text = _on_a_terminal(daemon, key, "launch", "--gpu", "4090", "--hours", "1")
    assert got == code, text
    assert "Launched" not in text
    assert {r["id"] for r in gw_json(daemon, "status")} == before

    inst = _launch(daemon)
    got, text = _on_a_terminal(daemon, key, "destroy-all")
    assert got == code, text
    assert _row(daemon, inst["id"])["state"] in ("provisioning", "running")  # not terminating
    gw_json(daemon, "destroy-all", "--yes")
    _until_no_live(daemon)
