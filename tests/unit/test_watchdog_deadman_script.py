"""The dead-man switch's start-up script, as text: size, parameters, and where keys go."""

from __future__ import annotations

import shutil
import subprocess
from types import SimpleNamespace
from typing import cast

import pytest

from gpuwarden.config.settings import SIM_DEFAULT_KEY, Settings
from gpuwarden.fleet.app import App
from gpuwarden.fleet.launcher import app_onstart
from gpuwarden.remote.deadman import (
    ONSTART_LIMIT,
    check_interval,
    default_api_base,
    onstart_script,
    provider_kind,
    shipped_deadman,
    switch_api_key,
    switch_can_end,
)

SH = shutil.which("dash") or "sh"
LONG_KEY = "k" * 200


def parses(script: str) -> bool:
    return subprocess.run([SH, "-n", "-c", script], check=False).returncode == 0


@pytest.mark.parametrize("kind", ["vast", "lambda"])
def test_fits_vasts_onstart_limit_and_parses(kind: str) -> None:
    s = Settings(policy={"lambda_deadman_api_key": True})
    script = onstart_script(s, kind, "https://cloud.example.com/api/v1", "abcd1234", LONG_KEY)  # type: ignore[arg-type]
    assert len(script) <= ONSTART_LIMIT
    if kind == "vast":  # no key in it; room left for the launcher's own onstart
        assert len(script) < ONSTART_LIMIT - 500
    assert script.startswith("#!/bin/sh\n")
    assert parses(script)


def test_parameters_are_seconds_from_the_policy() -> None:
    s = Settings(policy={"deadman_timeout": "20m", "deadman_margin": "10m", "hard_cap": "8h"})
    script = onstart_script(s, "vast", "https://console.vast.ai/", "abcd1234")
    assert "DEADMAN_TIMEOUT=1200\n" in script
    assert "DEADMAN_MAX_AGE=29400\n" in script  # 8 h + 10 min
    assert "DEADMAN_CHECK=30\n" in script
    assert "DEADMAN_LABEL=gpuwarden-main-abcd1234\n" in script
    # The sim's URL, when the instance has one, wins over the configured base.
    assert "DEADMAN_API=${GPUWARDEN_SIM_API:-https://console.vast.ai}\n" in script


def test_the_account_key_goes_onto_lambda_only_with_the_opt_in() -> None:
    off = onstart_script(Settings(), "lambda", "https://cloud.lambda.ai/api/v1", "i1", "secret1")
    assert "secret1" not in off and "deadman.key" not in off
    on = onstart_script(
        Settings(policy={"lambda_deadman_api_key": True}),
        "lambda",
        "https://cloud.lambda.ai/api/v1",
        "i1",
        "secret1",
    )
    assert "printf '%s' secret1 > deadman.key" in on
    # Vast never gets a key from us: the container's own CONTAINER_API_KEY is used.
    vast = onstart_script(
        Settings(policy={"lambda_deadman_api_key": True}),
        "vast",
        "https://console.vast.ai",
        "i1",
        "secret1",
    )
    assert "secret1" not in vast


def test_a_key_with_shell_characters_is_quoted() -> None:
    s = Settings(policy={"lambda_deadman_api_key": True})
    script = onstart_script(s, "lambda", "https://x.example/api/v1", "i1", "a'b $(reboot)")
    assert "'a'\"'\"'b $(reboot)'" in script
    assert parses(script)


@pytest.mark.parametrize(
    "url", ["ftp://x", "https://x/$(reboot)", "https://x/a b", "https://x/`id`", ""]
)
def test_a_strange_api_url_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="not a plain"):
        onstart_script(Settings(), "vast", url, "i1")


def test_provider_kinds_and_bases() -> None:
    assert provider_kind("vast") == provider_kind("sim-vast") == "vast"
    assert provider_kind("lambda") == provider_kind("sim-lambda") == "lambda"
    assert provider_kind("fake") is None
    assert default_api_base("vast", Settings()) == "https://console.vast.ai"
    assert default_api_base("lambda", Settings()) == "https://cloud.lambda.ai/api/v1"
    custom = Settings(providers={"vast": {"base_url": "https://vast.example/"}})
    assert default_api_base("vast", custom) == "https://vast.example"


@pytest.mark.parametrize(("timeout", "check"), [(1, 1), (3, 1), (60, 10), (1200, 30)])
def test_check_interval(timeout: int, check: int) -> None:
    assert check_interval(timeout) == check


def test_shipped_switch_is_posix_sh_without_comments() -> None:
    text = shipped_deadman()
    assert text.startswith("#!/bin/sh\n")
    assert not [ln for ln in text.splitlines()[1:] if ln.lstrip().startswith("#")]
    assert parses(text)
    if shutil.which("checkbashisms"):  # pragma: no cover - not installed everywhere
        assert (
            subprocess.run(["checkbashisms", "-"], check=False, input=text.encode()).returncode == 0
        )


OPT_IN = {"lambda_deadman_api_key": True}


@pytest.mark.parametrize(
    ("policy", "providers", "name", "key"),
    [
        # sim-lambda without providers.sim.api_key: the key the sim accepts by default.
        (OPT_IN, {}, "sim-lambda", SIM_DEFAULT_KEY),
        (OPT_IN, {"sim": {"api_key": "own-sim"}}, "sim-lambda", "own-sim"),
        (OPT_IN, {"sim": {"api_key": ""}}, "sim-lambda", SIM_DEFAULT_KEY),
        (OPT_IN, {"lambda": {"api_key": "acct"}}, "lambda", "acct"),
        (OPT_IN, {}, "lambda", None),  # nothing to give
        ({}, {"lambda": {"api_key": "acct"}}, "lambda", None),  # no opt-in
        ({}, {}, "sim-lambda", None),
        (OPT_IN, {"vast": {"api_key": "acct"}}, "vast", None),  # Vast: the instance's own key
        (OPT_IN, {}, "fake", None),
    ],
)
def test_switch_api_key(
    policy: dict[str, bool], providers: dict[str, object], name: str, key: str | None
) -> None:
    s = Settings(policy=policy, providers=providers)
    assert switch_api_key(s, name) == key
    # Whether the switch can end the instance follows: Vast always, Lambda with a key.
    assert switch_can_end(s, name) is (name.endswith("vast") or key is not None)


def test_sim_lambda_gets_the_default_sim_key_in_its_start_up_script() -> None:
    """The launcher's script for sim-lambda with the opt-in and no providers.sim.api_key
    carries the key the sim accepts (before: none, so the switch could not end it)."""

    def app(s: Settings) -> App:
        return cast(App, SimpleNamespace(settings=s))  # app_onstart reads only the settings

    script = app_onstart(app(Settings(policy=OPT_IN)), "sim-lambda", "abcd1234")
    assert f"printf '%s' {SIM_DEFAULT_KEY} > deadman.key" in script
    assert parses(script)
    assert "deadman.key" not in app_onstart(app(Settings()), "sim-lambda", "abcd1234")
