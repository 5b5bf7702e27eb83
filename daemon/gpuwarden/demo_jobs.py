"""The job steps of `make demo` (engineer F's part of demo.py's STEPS): submit three jobs,
watch them run (cancelling the third midway), show the images, then `status`, `history`
and `costs` once every instance has been given back."""

from __future__ import annotations

import asyncio
import json
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpuwarden.cli.client import ControlClient

if TYPE_CHECKING:
    from gpuwarden.demo import Demo

TERMINAL = ("succeeded", "failed", "cancelled")
JOBS = [
    # (prompt, steps, seed): the third runs long enough to be cancelled midway
    ("a lighthouse on a cliff at dusk, oil painting", 8, 1),
    ("a red fox in fresh snow, '; touch pwned; ' $(touch pwned)", 8, 2),
    ("a very slow watercolour of a harbour", 60, 3),
]
WATCH_TIMEOUT = 40.0


def _failed(message: str) -> Exception:
    from gpuwarden.demo import DemoFailed

    return DemoFailed(message)


async def submit_jobs(demo: Demo) -> str:
    ids = []
    for prompt, steps, seed in JOBS:
        _, out, _ = await demo.gpuwarden(
            "submit", "--prompt", prompt, "--steps", str(steps), "--seed", str(seed), "--json"
        )
        job = json.loads(out)
        ids.append(job["id"])
        demo.say(f"gpuwarden submit --prompt {prompt[:30]!r}... -> {job['id']} ({job['state']})")
    demo.notes["jobs"] = ids
    return f"three jobs queued: {', '.join(ids)}"


async def watch_jobs(demo: Demo) -> str:
    """Follow the jobs through their states; cancel the third once it is a few steps in."""
    ids: list[str] = demo.notes["jobs"]
    victim = ids[2]
    cancelled = False
    seen: dict[str, tuple[str, int]] = {}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WATCH_TIMEOUT
    async with ControlClient(demo.socket) as client:
        while True:
            jobs = {j["id"]: j for j in await client.call("jobs.list", {"limit": 100})}
            for jid in ids:
                job = jobs[jid]
                now = (job["state"], job["progress"]["step"])
                if seen.get(jid) != now:
                    seen[jid] = now
                    total = job["progress"]["total"]
                    where = f" step {now[1]} of {total}" if job["state"] == "running" else ""
                    inst = f" on {job['instance_id']}" if job["instance_id"] else ""
                    demo.say(f"job {jid}: {job['state']}{where}{inst}")
            if not cancelled and jobs[victim]["progress"]["step"] >= 5:
                _, out, _ = await demo.gpuwarden("cancel", victim)
                demo.say(f"gpuwarden cancel {victim} -> {out.strip()}")
                cancelled = True
            if all(jobs[j]["state"] in TERMINAL for j in ids):
                break
            if loop.time() > deadline:
                raise _failed(f"the jobs did not finish within {WATCH_TIMEOUT:.0f} s")
            await asyncio.sleep(0.25)
    states = [seen[j][0] for j in ids]
    if states != ["succeeded", "succeeded", "cancelled"]:
        raise _failed(f"expected succeeded, succeeded, cancelled; got {', '.join(states)}")
    return "two succeeded, the third was cancelled midway (its remote process killed)"


def _describe(path: Path) -> str:
    data = path.read_bytes()
    width, height = struct.unpack(">II", data[16:24])
    return f"{path}  {len(data)} bytes, {width}x{height} PNG"


async def show_images(demo: Demo) -> str:
    lines = []
    for jid in demo.notes["jobs"][:2]:
        _, out, _ = await demo.gpuwarden("job", jid, "--json")
        job: dict[str, Any] = json.loads(out)
        for name in job["outputs"]:
            path = Path(name)
            lines.append(path)
            demo.say(_describe(path))
            result = job["result"]
            demo.say(
                f"  sha256 {result['files'][0]['sha256'][:16]}..., engine {result['engine']},"
                f" GPU {job['gpu_seconds']:.1f} s, cost ${job['cost']:.6f}"
            )
    pwned = list(demo.workdir.rglob("pwned"))
    if pwned:
        raise _failed(f"a prompt ran as a command: {pwned}")
    return f"{len(lines)} images on disk, checksums verified; no prompt ran as a command"


async def wait_instances_ended(demo: Demo) -> str:
    """Instances are kept warm for the measured cold start (keep_warm auto), then ended."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    async with ControlClient(demo.socket) as client:
        while True:
            live = await client.call("status")
            rows = live if isinstance(live, list) else live.get("instances", [])
            if not rows:
                break
            if loop.time() > deadline:
                raise _failed("instances are still live 20 s after the last job")
            await asyncio.sleep(0.25)
    _, out, _ = await demo.gpuwarden("status")
    for line in out.rstrip().splitlines():
        demo.say(line)
    return "no instance left running: each was kept warm briefly, then ended"


async def show_history(demo: Demo) -> str:
    _, out, _ = await demo.gpuwarden("history")
    for line in out.rstrip().splitlines():
        demo.say(line)
    _, js, _ = await demo.gpuwarden("history", "--json")
    rows = json.loads(js)
    rows = rows if isinstance(rows, list) else rows.get("terminations", [])
    reasons = sorted({str(r.get("reason")) for r in rows})
    return f"{len(rows)} instance(s) ended, reasons: {', '.join(reasons) or 'none'}"


async def show_costs(demo: Demo) -> str:
    _, out, _ = await demo.gpuwarden("costs")
    for line in out.rstrip().splitlines():
        demo.say(line)
    return "costs shown"
