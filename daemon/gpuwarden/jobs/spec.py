"""What a user may submit, checked once at the door, and jobs shaped as JSON for the socket.

Everything the runner will use is resolved and recorded here (steps, size, model, seed), so
the job row says exactly what was generated; a seed left out is drawn at random and kept.
"""

from __future__ import annotations

import dataclasses
import secrets
from typing import Any

from gpuwarden.config.settings import JobsSettings
from gpuwarden.core.errors import DomainError
from gpuwarden.core.model import Job, JobSpec
from gpuwarden.jobs.limits import ENGINES, MAX_COUNT, MAX_STEPS, prompt_problems

JOB_DIR = ".gpuwarden/jobs"  # on the instance, relative to the login home


class InvalidSpec(DomainError):
    code = "invalid_spec"


def remote_dir(job_id: str) -> str:
    return f"{JOB_DIR}/{job_id}"


def build_spec(
    settings: JobsSettings,
    *,
    prompt: str,
    negative_prompt: str = "",
    steps: int | None = None,
    seed: int | None = None,
    width: int | None = None,
    height: int | None = None,
    model: str | None = None,
    count: int = 1,
    guidance: float | None = None,
    engine: str | None = None,
    max_price: float | None = None,
    gpu_ram_gb: float | None = None,
    spot: bool | None = None,
) -> JobSpec:
    """A validated JobSpec with defaults filled in from the settings. Raises InvalidSpec."""
    problems = prompt_problems(prompt, negative_prompt)
    steps = settings.steps if steps is None else steps
    width = settings.width if width is None else width
    height = settings.height if height is None else height
    problems += _check_numbers(
        steps=steps, width=width, height=height, count=count, seed=seed, guidance=guidance
    )
    if (engine or "") not in ENGINES:
        problems.append("engine must be one of auto, diffusers, preview")
    for name, value in (("max_price", max_price), ("gpu_ram_gb", gpu_ram_gb)):
        if value is not None and value < 0:
            problems.append(f"{name} must not be negative")
    if problems:
        raise InvalidSpec("; ".join(problems), problems=problems)
    return JobSpec(
        prompt=prompt,
        negative_prompt=negative_prompt,
        steps=steps,
        seed=secrets.randbelow(2**31) if seed is None else seed,
        width=width,
        height=height,
        model=model or settings.model,
        count=count,
        guidance=0.0 if guidance is None else float(guidance),
        engine="" if engine in (None, "auto") else str(engine),
        max_price=max_price,
        gpu_ram_gb=gpu_ram_gb,
        # Decided at submit, so that a config reload does not change a queued job's market.
        spot=settings.interruptible if spot is None else spot,
    )


def _check_numbers(
    *, steps: int, width: int, height: int, count: int, seed: int | None, guidance: float | None
) -> list[str]:
    problems = []
    if not 1 <= steps <= MAX_STEPS:
        problems.append(f"steps must be between 1 and {MAX_STEPS}")
    for name, size in (("width", width), ("height", height)):
        if not 64 <= size <= 2048 or size % 8:
            problems.append(f"{name} must be a multiple of 8 between 64 and 2048")
    if not 1 <= count <= MAX_COUNT:
        problems.append(f"count must be between 1 and {MAX_COUNT}")
    if seed is not None and not 0 <= seed < 2**63:
        problems.append("seed must be between 0 and 2**63 - 1")
    if guidance is not None and not 0 <= guidance <= 50:
        problems.append("guidance must be between 0 and 50")
    return problems


def runner_spec(job: Job, engine: str, preview_step_delay: float) -> dict[str, Any]:
    """The JSON the runner reads on the instance: the only way user text leaves the daemon."""
    s = job.spec
    return {
        "job_id": job.id,
        "prompt": s.prompt,
        "negative_prompt": s.negative_prompt,
        "steps": s.steps,
        "seed": s.seed,
        "width": s.width,
        "height": s.height,
        "model": s.model,
        "count": s.count,
        "guidance": s.guidance,
        "engine": engine,
        "preview_step_delay": preview_step_delay,
    }


def _ts(value: Any) -> str | None:
    return None if value is None else value.isoformat()


def job_dict(job: Job) -> dict[str, Any]:
    """A job as the control socket sends it (times as ISO 8601 UTC)."""
    return {
        "id": job.id,
        "state": job.state.value,
        "priority": job.priority,
        "attempt": job.attempt,
        "instance_id": job.instance_id,
        "created_at": _ts(job.created_at),
        "updated_at": _ts(job.updated_at),
        "started_at": _ts(job.started_at),
        "finished_at": _ts(job.finished_at),
        "progress": {"step": job.progress_step, "total": job.progress_total},
        "error": job.error,
        "outputs": list(job.outputs),
        "gpu_seconds": round(job.gpu_seconds, 3),
        "cost": job.cost,
        "spec": dataclasses.asdict(job.spec),
        "engine": job.extra.get("engine"),
        "result": job.extra.get("result"),
        "preemptions": job.extra.get("preemptions", 0),
    }
