"""The job commands: submit (and follow), jobs, job, cancel, pause, resume.

`submit` prints the job id; with --wait it follows the job (queued, provisioning, step k of N,
download) from the daemon's event stream, with a jobs.get each second as the source of truth,
then prints the image path(s). Every command takes --json, --socket and --config.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import Callable, Mapping
from typing import Any

from gpuwarden.cli.client import DOMAIN_ERROR, ControlClient, RemoteError, Unreachable
from gpuwarden.cli.output import (
    EX_DOMAIN,
    EX_OK,
    Out,
    Styled,
    command,
    local_time,
    money,
    positive,
    remote_error,
    run_command,
)
from gpuwarden.jobs.limits import MAX_COUNT, MAX_PROMPT_CHARS, MAX_STEPS, prompt_problems

TERMINAL = ("succeeded", "failed", "cancelled")
STATES = ("queued", "provisioning", "running", "fetching", *TERMINAL)
STATE_STYLE = {
    "queued": "yellow",
    "provisioning": "yellow",
    "running": "green",
    "fetching": "cyan",
    "succeeded": "bold green",
    "failed": "red",
    "cancelled": "dim",
}
PHASE = {
    "queued": "queued",
    "provisioning": "renting a GPU",
    "running": "generating",
    "fetching": "downloading",
    "succeeded": "done",
    "failed": "failed",
    "cancelled": "cancelled",
}


def _int_range(lo: int, hi: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be between {lo} and {hi}")
        return value

    return parse


JOB_ID_HELP = "job id, or a unique start of it (4+ characters; see 'gpuwarden jobs')"


def register(sub: Any) -> None:
    p = command(
        sub,
        "submit",
        "queue a text-to-image job; prints its id",
        _submit,
        epilog="With --wait, exit code 1 also means that the job failed or was cancelled.",
    )
    p.add_argument(
        "--prompt",
        required=True,
        metavar="TEXT",
        help=f"what to draw (with --negative, at most {MAX_PROMPT_CHARS} characters)",
    )
    p.add_argument("--negative", metavar="TEXT", default="", help="what to keep out")
    p.add_argument("--steps", type=_int_range(1, MAX_STEPS), metavar="N", help="inference steps")
    p.add_argument("--seed", type=_int_range(0, 2**63 - 1), metavar="N", help="default: random")
    p.add_argument("--width", type=_int_range(64, 2048), metavar="W", help="multiple of 8")
    p.add_argument("--height", type=_int_range(64, 2048), metavar="H", help="multiple of 8")
    p.add_argument("--model", metavar="ID", help="diffusers model id (default: jobs.model)")
    p.add_argument(
        "--count", type=_int_range(1, MAX_COUNT), default=1, metavar="N", help="images (default 1)"
    )
    p.add_argument("--guidance", type=float, metavar="X", help="guidance scale (default 0)")
    p.add_argument(
        "--engine", choices=("auto", "diffusers", "preview"), help="runner engine (default: auto)"
    )
    p.add_argument("--max-price", type=positive(float), metavar="X", help="at most $X per hour")
    p.add_argument("--gpu-ram", type=positive(float), metavar="GB", help="at least GB of GPU RAM")
    p.add_argument(
        "--spot",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="rent an interruptible (bid) GPU where the provider has them; --no-spot: on-demand"
        " only (default: jobs.interruptible)",
    )
    p.add_argument("--priority", type=int, default=0, metavar="N", help="higher runs first")
    p.add_argument("--wait", action="store_true", help="follow the job and print the image paths")

    p = command(sub, "jobs", "list jobs, in queue order", _jobs)
    p.add_argument(
        "--state",
        action="append",
        choices=STATES,
        metavar="STATE",
        help=f"only jobs in STATE (repeatable): {', '.join(STATES)}",
    )
    p.add_argument(
        "--limit",
        type=_int_range(1, 10_000),
        default=50,
        metavar="N",
        help="the newest N, newest first (default 50)",
    )

    p = command(sub, "job", "show one job", _job)
    p.add_argument("id", metavar="ID", help=JOB_ID_HELP)

    p = command(sub, "cancel", "cancel a job (a running one has its process killed)", _cancel)
    p.add_argument("id", metavar="ID", help=JOB_ID_HELP)

    p = command(sub, "pause", "stop dispatching queued jobs (running ones go on)", _pause)
    p.add_argument("--reason", metavar="TEXT", help="why, for the event log (default: user)")
    command(sub, "resume", "dispatch queued jobs again", _resume)


# --- submit ----------------------------------------------------------------------------------


def _submit_params(args: argparse.Namespace) -> dict[str, Any]:
    params: dict[str, Any] = {"prompt": args.prompt, "count": args.count}
    optional = {
        "negative_prompt": args.negative or None,
        "steps": args.steps,
        "seed": args.seed,
        "width": args.width,
        "height": args.height,
        "model": args.model,
        "guidance": args.guidance,
        "engine": args.engine,
        "max_price": args.max_price,
        "gpu_ram_gb": args.gpu_ram,
        "spot": args.spot,
    }
    params.update({k: v for k, v in optional.items() if v is not None})
    if args.priority:
        params["priority"] = args.priority
    return params


def _submit(args: argparse.Namespace) -> int:
    problems = prompt_problems(args.prompt, args.negative)
    if problems:  # checked here too, as the daemon would: a request too large to send would
        # be refused for its size, without saying that the prompt is the cause
        data = {"code": "invalid_spec", "problems": problems}
        return remote_error(Out(args.json), RemoteError(DOMAIN_ERROR, "; ".join(problems), data))

    async def body(client: ControlClient, out: Out) -> int:
        job = await client.call("jobs.submit", _submit_params(args))
        if not args.wait:
            if out.json_mode:
                out.json(job)
            else:
                out.print(job["id"])
                if job.get("queue_paused"):
                    out.hint("the queue is paused: the job waits for 'gpuwarden resume'")
            return EX_OK
        if not out.json_mode:
            out.err.print(Styled(f"job {job['id']} queued", style="dim"))
        final = await follow(client, out, str(job["id"]))
        return _finished(out, final)

    return run_command(args, body)


async def follow(client: ControlClient, out: Out, job_id: str) -> dict[str, Any]:
    """Follow a job to its end: events for quick updates, jobs.get as the truth each second."""
    nudges: asyncio.Queue[None] = asyncio.Queue()

    async def pump() -> None:
        with contextlib.suppress(Unreachable, RemoteError, OSError):
            async for ev in client.subscribe():
                if ev.get("entity_id") == job_id:
                    nudges.put_nowait(None)

    listener = asyncio.create_task(pump())
    try:
        with _Display(out) as display:
            while True:
                job: dict[str, Any] = await client.call("jobs.get", {"id": job_id})
                display.show(job)
                if job["state"] in TERMINAL:
                    return job
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(nudges.get(), 1.0)
    finally:
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener


class _Display:
    """A rich progress bar on a terminal; one line per phase change elsewhere (and in JSON
    mode, nothing until the end)."""

    def __init__(self, out: Out) -> None:
        from rich.progress import (  # rich: only for a command that shows progress
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.out = out
        self.live = out.is_terminal and not out.json_mode
        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=out.err,
            transient=False,
        )
        self.task = self.bar.add_task("queued", total=None)
        self.last: tuple[str, int] | None = None

    def __enter__(self) -> _Display:
        if self.live:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live:
            self.bar.stop()

    def show(self, job: Mapping[str, Any]) -> None:
        state = str(job["state"])
        step = int(job["progress"]["step"])
        total = int(job["progress"]["total"]) or None
        phase = PHASE.get(state, state)
        if state == "running" and total:
            phase = f"step {step} of {total}"
        if self.live:
            self.bar.update(self.task, description=phase, completed=step, total=total)
            return
        if self.out.json_mode or self.last == (state, step):
            return
        if self.last is None or self.last[0] != state or state != "running":
            self.out.err.print(Styled(f"{job['id']}: {phase}", style=STATE_STYLE.get(state, "")))
        self.last = (state, step)


def _finished(out: Out, job: Mapping[str, Any]) -> int:
    if out.json_mode:
        out.json(job)
    elif job["state"] == "succeeded":
        for path in job["outputs"]:
            out.print(path)
    if job["state"] == "succeeded":
        return EX_OK
    out.error(f"job {job['id']} {job['state']}" + (f": {job['error']}" if job["error"] else ""))
    if job["state"] == "failed":
        out.hint(f"'gpuwarden events --id {job['id']}' shows what happened, attempt by attempt")
    return EX_DOMAIN


# --- jobs, job, cancel, pause, resume --------------------------------------------------------


def _short(text: str, n: int = 40) -> str:
    one = " ".join(text.split())
    return one if len(one) <= n else one[: n - 1] + "…"


def _progress(job: Mapping[str, Any]) -> str:
    total = job["progress"]["total"]
    return f"{job['progress']['step']}/{total}" if total else "-"


def _jobs(args: argparse.Namespace) -> int:
    async def body(client: ControlClient, out: Out) -> int:
        params: dict[str, Any] = {"limit": args.limit}
        if args.state:
            params["states"] = args.state
        rows = await client.call("jobs.list", params)
        if out.json_mode:
            out.json(rows)
            return EX_OK
        if not rows:
            out.print("no jobs")
            return EX_OK
        out.table(
            ["id", "state", "prio", "progress", "try", "instance", "submitted", "cost", "prompt"],
            [
                [
                    r["id"],
                    Styled(r["state"], style=STATE_STYLE.get(r["state"], "")),
                    r["priority"],
                    _progress(r),
                    r["attempt"] + 1,
                    r["instance_id"] or "-",
                    local_time(r["created_at"]),
                    money(r["cost"]) if r["cost"] else "-",
                    _short(r["spec"]["prompt"]),
                ]
                for r in rows
            ],
            right=["prio", "progress", "try", "cost"],
        )
        return EX_OK

    return run_command(args, body)


def _job(args: argparse.Namespace) -> int:
    async def body(client: ControlClient, out: Out) -> int:
        job = await client.call("jobs.get", {"id": args.id})
        if out.json_mode:
            out.json(job)
            return EX_OK
        spec = job["spec"]
        rows: list[list[Any]] = [
            ["state", Styled(job["state"], style=STATE_STYLE.get(job["state"], ""))],
            ["prompt", _short(spec["prompt"], 200)],
            ["size", f"{spec['width']}x{spec['height']}, {spec['count']} image(s)"],
            ["steps / seed", f"{spec['steps']} / {spec['seed']}"],
            [
                "engine / model",
                f"{job.get('engine') or spec.get('engine') or 'auto'} / {spec['model']}",
            ],
            ["progress", _progress(job)],
            ["attempt", str(job["attempt"] + 1)],
            ["instance", job["instance_id"] or "-"],
            ["submitted", local_time(job["created_at"])],
            ["started", local_time(job["started_at"])],
            ["finished", local_time(job["finished_at"])],
            ["GPU time", f"{job['gpu_seconds']:.1f} s"],
            ["cost", money(job["cost"])],
        ]
        if job["error"]:
            rows.append(["error", Styled(job["error"], style="red")])
        rows += [["output", path] for path in job["outputs"]]
        out.table(["job", job["id"]], rows)
        return EX_OK

    return run_command(args, body)


def _cancel(args: argparse.Namespace) -> int:
    async def body(client: ControlClient, out: Out) -> int:
        job = await client.call("jobs.cancel", {"id": args.id})
        if out.json_mode:
            out.json(job)
        elif job["state"] == "cancelled":
            out.print(f"{job['id']} cancelled")
        else:
            out.print(f"{job['id']}: cancel requested; its runner is being stopped")
        return EX_OK

    return run_command(args, body)


def _pause(args: argparse.Namespace) -> int:
    async def body(client: ControlClient, out: Out) -> int:
        res = await client.call("queue.pause", {"reason": args.reason} if args.reason else {})
        out.json(res) if out.json_mode else out.print("queue paused")
        return EX_OK

    return run_command(args, body)


def _resume(args: argparse.Namespace) -> int:
    async def body(client: ControlClient, out: Out) -> int:
        res = await client.call("queue.resume", {})
        out.json(res) if out.json_mode else out.print("queue resumed")
        return EX_OK

    return run_command(args, body)
