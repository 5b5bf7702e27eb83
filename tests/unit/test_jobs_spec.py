"""What a submit may hold: defaults from the settings, a recorded seed, and refusals."""

from __future__ import annotations

from typing import Any

import pytest

from gpuwarden.cli import main
from gpuwarden.cli.client import MAX_REQUEST, encode_request
from gpuwarden.config.settings import JobsSettings
from gpuwarden.control import rpc
from gpuwarden.control.methods import SubmitParams
from gpuwarden.core.model import Job, JobState
from gpuwarden.jobs.limits import MAX_PROMPT_CHARS, prompt_problems
from gpuwarden.jobs.spec import InvalidSpec, build_spec, job_dict, runner_spec


def test_defaults_come_from_the_settings_and_the_seed_is_recorded() -> None:
    s = JobsSettings(steps=6, width=640, height=384, model="org/model")
    spec = build_spec(s, prompt="a cat")
    assert (spec.steps, spec.width, spec.height, spec.model) == (6, 640, 384, "org/model")
    assert spec.seed is not None and 0 <= spec.seed < 2**31
    assert spec.engine == "" and spec.guidance == 0.0
    assert build_spec(s, prompt="x", seed=0).seed == 0
    assert build_spec(s, prompt="x", engine="auto").engine == ""
    assert build_spec(s, prompt="x", engine="diffusers").engine == "diffusers"


def test_a_long_unicode_prompt_is_fine() -> None:
    prompt = "猫" * 10_000 + "'; touch pwned; '"
    assert build_spec(JobsSettings(), prompt=prompt).prompt == prompt
    multiline = "a cat\n\tin a hat\r\n"
    assert build_spec(JobsSettings(), prompt=multiline).prompt == multiline


@pytest.mark.parametrize("split", [MAX_PROMPT_CHARS, MAX_PROMPT_CHARS // 2])
def test_the_longest_submit_fits_in_one_control_request(split: int) -> None:
    """The worst case: prompts of 4-byte UTF-8 characters at the limit, and every other
    field as long as the socket's params model allows."""
    fox = "\U0001f98a"  # 4 bytes of UTF-8
    params: dict[str, Any] = {
        "prompt": fox * split,
        "negative_prompt": fox * (MAX_PROMPT_CHARS - split),
        "steps": 500,
        "seed": 2**63 - 1,
        "width": 2048,
        "height": 2048,
        "model": fox * 200,
        "count": 8,
        "guidance": 49.99999999999999,
        "engine": fox * 32,
        "max_price": 9999.999999999998,
        "gpu_ram_gb": 9999.999999999998,
        "priority": -1000,
    }
    SubmitParams.model_validate(params)  # the daemon takes it
    assert prompt_problems(params["prompt"], params["negative_prompt"]) == []
    line = encode_request(2**63, "jobs.submit", params)
    assert len(line) <= MAX_REQUEST == rpc.MAX_REQUEST


def test_the_cli_refuses_an_overlong_prompt_before_sending_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as done:  # a socket where nothing listens: never reached
        main(["submit", "--prompt", "x" * 20_000, "--socket", "/tmp/gw-nobody-here.sock"])
    assert done.value.code == 1  # as the daemon's invalid_spec would give, not 69
    assert "at most 12000 characters" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ({"prompt": "  "}, "prompt must not be empty"),
        ({"prompt": "x" * 12_001}, "at most 12000 characters together (these hold 12001)"),
        ({"prompt": "x" * 6_001, "negative_prompt": "y" * 6_000}, "at most 12000 characters"),
        ({"prompt": "a\x1b[2Jcat"}, "may not hold control characters"),
        ({"prompt": "cat", "negative_prompt": "\x00"}, "may not hold control characters"),
        ({"prompt": "x", "width": 100}, "width must be a multiple of 8"),
        ({"prompt": "x", "height": 4096}, "height must be a multiple of 8"),
        ({"prompt": "x", "count": 9}, "count must be between 1 and 8"),
        ({"prompt": "x", "count": 0}, "count must be between 1 and 8"),
        ({"prompt": "x", "steps": 0}, "steps must be between"),
        ({"prompt": "x", "engine": "dall-e"}, "engine must be one of"),
        ({"prompt": "x", "guidance": 99}, "guidance must be between"),
        ({"prompt": "x", "max_price": -1}, "max_price must not be negative"),
    ],
)
def test_bad_values_are_refused_with_a_reason(fields: dict[str, Any], why: str) -> None:
    with pytest.raises(InvalidSpec) as err:
        build_spec(JobsSettings(), **fields)
    assert why in err.value.message
    assert err.value.code == "invalid_spec"


def test_the_runner_spec_and_the_job_json_carry_the_values() -> None:
    from datetime import UTC, datetime

    spec = build_spec(JobsSettings(), prompt="$(touch pwned)", seed=5, count=2)
    now = datetime(2026, 1, 1, tzinfo=UTC)
    job = Job(id="j1", state=JobState.QUEUED, spec=spec, created_at=now, updated_at=now)
    rs = runner_spec(job, "preview", 0.01)
    assert rs["prompt"] == "$(touch pwned)" and rs["count"] == 2 and rs["seed"] == 5
    assert rs["engine"] == "preview" and rs["preview_step_delay"] == 0.01
    out = job_dict(job)
    assert out["state"] == "queued" and out["spec"]["prompt"] == "$(touch pwned)"
    assert out["created_at"] == "2026-01-01T00:00:00+00:00"
