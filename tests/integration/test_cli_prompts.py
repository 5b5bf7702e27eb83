"""The prompts and what is shown around them: Ctrl-C and EOF at a prompt never act, a
refused launch is not attempted, a provider that failed is a warning, a refused reload
says so. The terminal cases run a real process on a pseudo-terminal against a daemon on
the sim; the others an in-process control server with stand-in methods."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from cli_support import (
    Daemon,
    daemon,
    gw,
    gw_json,
    launch_one,
    on_a_terminal,
    status_row,
    until_no_live,
)
from control_support import running_server

from gpuwarden.control.methods import LaunchParams, Method, NoParams, OffersParams

pytestmark = pytest.mark.slow
__all__ = ["daemon"]  # the fixture, imported for pytest to find


def test_launch_refuses_without_a_terminal_and_without_yes(daemon: Daemon) -> None:
    before = {r["id"] for r in gw_json(daemon, "status")}
    code, out, err = gw(daemon, "launch", "--gpu", "4090", "--hours", "1")
    assert code == 1
    assert "--yes" in err
    assert "Estimate" in out and "RTX 4090" in out  # the dry run was shown
    assert {r["id"] for r in gw_json(daemon, "status")} == before  # nothing was rented


REFUSED = "$9.00/h is over budget.max_hourly_price ($2.50/h)"


async def test_a_launch_the_dry_run_refuses_is_not_attempted() -> None:
    """The dry run says a launch would be refused (price, budget): the confirmation shows
    why, and the CLI stops there with exit 1, without asking and without launching."""
    asked: list[bool] = []

    async def launch(app: Any, caller: Any, p: LaunchParams) -> dict[str, Any]:
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

    async def offers(app: Any, caller: Any, p: OffersParams) -> dict[str, Any]:
        return {"offers": [], "warnings": [WARNING]}

    async def launch(app: Any, caller: Any, p: LaunchParams) -> dict[str, Any]:
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

    async def reload(app: Any, caller: Any, p: NoParams) -> dict[str, Any]:
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
    code, text = on_a_terminal(daemon, b"n\n", "launch", "--gpu", "4090", "--hours", "1")
    assert code == 1
    assert "Estimate" in text and "not launched" in text
    assert {r["id"] for r in gw_json(daemon, "status")} == before
    code, text = on_a_terminal(daemon, b"y\n", "launch", "--gpu", "4090", "--hours", "1")
    assert code == 0, text
    assert "Launched" in text
    iid = next(ln.split()[1] for ln in text.splitlines() if ln.startswith("Launched"))
    code, text = on_a_terminal(daemon, b"y\n", "destroy-all")
    assert code == 0, text
    asked = text[: text.index("[y/N]")]  # shown before the question: what, at what rate
    assert "This destroys 1 instance(s), together $0." in asked
    assert iid in asked and "RTX 4090" in asked and "/h" in asked and "so far" in asked
    assert "Destroyed 1/1." in text  # sim-vast confirms at once
    until_no_live(daemon)


@pytest.mark.parametrize(("key", "code"), [(b"\x03", 130), (b"\x04", 1)], ids=["ctrl-c", "eof"])
def test_ctrl_c_or_eof_at_a_prompt_never_acts_and_returns_at_once(
    daemon: Daemon, key: bytes, code: int
) -> None:
    """Ctrl-C or EOF typed at the prompt, and nothing after it (no Enter): the command ends
    by itself, before the deadline of the terminal helper, and nothing was launched or
    destroyed. Ctrl-C exits 130, EOF is a "no" (exit 1)."""
    before = {r["id"] for r in gw_json(daemon, "status")}
    got, text = on_a_terminal(daemon, key, "launch", "--gpu", "4090", "--hours", "1")
    assert got == code, text
    assert "Launched" not in text
    assert {r["id"] for r in gw_json(daemon, "status")} == before

    inst = launch_one(daemon)
    got, text = on_a_terminal(daemon, key, "destroy-all")
    assert got == code, text
    assert status_row(daemon, inst["id"])["state"] in ("provisioning", "running")  # not terminating
    gw_json(daemon, "destroy-all", "--yes")
    until_no_live(daemon)
