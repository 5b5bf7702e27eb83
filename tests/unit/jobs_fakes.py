"""Hand-written fakes for the job tests: a remote instance in memory (FakeRemote) that plays
the runner's protocol, the jobs' settings, and helpers to fill the store and drive a
coroutine on a FakeClock. The App comes from the `make_app` fixture (tests/conftest.py)."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import asyncssh

from gpuwarden.config.settings import Settings
from gpuwarden.core.clock import FakeClock
from gpuwarden.core.model import EntityKind, Instance, InstanceState, Job, JobSpec, JobState
from gpuwarden.fleet.app import App
from gpuwarden.jobs.runner import Outcome, Runner
from gpuwarden.remote.ssh import DownloadRefused, RemoteStatus

T = TypeVar("T")


@dataclass
class FakeRunnerJob:
    total: int
    step: int = 0
    state: str = "running"  # running | exited | dead
    exit_code: int | None = None


@dataclass
class FakeRemote:
    """One instance's home directory and its runner, in memory. Each `status()` call moves a
    running job one step on; at the last step the image and result.json appear."""

    files: dict[str, bytes] = field(default_factory=dict)
    jobs: dict[str, FakeRunnerJob] = field(default_factory=dict)
    starts: int = 0
    kills: int = 0
    connects: int = 0
    downloads: list[str] = field(default_factory=list)
    fail_with: str | None = None  # the runner fails with this error message
    corrupt: bool = False  # downloads come back damaged
    drop_next: int = 0  # the next N remote calls fail as if the network went away
    refuse: bool = False  # connections are refused
    absent_after_start: int = 0  # the next N status reads after a start say "absent"
    start_exits: tuple[int, str] | None = None  # the started command exits at once (code, log)
    argvs: list[list[str]] = field(default_factory=list)  # what each start ran
    setup_s: float = 0.0  # the next result's setup_s: the first job installs, later ones not
    download_s: float = 0.0  # the same for downloading the model
    result_json: bytes | None = None  # what the runner leaves as result.json instead of its own
    ends_in_wait: bool = False  # a wait_end() sees the running job through to its end
    waits: int = 0  # wait_end() calls

    def _maybe_drop(self) -> None:
        if self.drop_next > 0:
            self.drop_next -= 1
            raise ConnectionResetError("the network went away")

    def _append(self, rel: str, event: dict[str, Any]) -> None:
        line = (json.dumps(event) + "\n").encode()
        self.files[rel] = self.files.get(rel, b"") + line

    def advance(self, job_dir: str) -> None:
        job = self.jobs[job_dir]
        if job.state != "running":
            return
        job.step += 1
        self._append(
            f"{job_dir}/progress.jsonl", {"event": "progress", "step": job.step, "total": job.total}
        )
        if job.step < job.total:
            return
        if self.fail_with is not None:
            self._append(f"{job_dir}/progress.jsonl", {"event": "error", "message": self.fail_with})
            job.state, job.exit_code = "exited", 1
            return
        spec = json.loads(self.files[f"{job_dir}/spec.json"])
        entries = []
        for i in range(spec["count"]):
            data = f"png {spec['prompt']} {spec['seed']} {i}".encode()
            self.files[f"{job_dir}/image-{i}.png"] = data
            entries.append({"name": f"image-{i}.png", "sha256": hashlib.sha256(data).hexdigest()})
        result = {
            "engine": spec["engine"],
            "seed": spec["seed"],
            "files": entries,
            "setup_s": self.setup_s,
            "download_s": self.download_s,
        }
        # Installed and downloaded: the next job on this machine finds both.
        self.setup_s = self.download_s = 0.0
        self.files[f"{job_dir}/result.json"] = self.result_json or json.dumps(result).encode()
        self._append(f"{job_dir}/progress.jsonl", {"event": "done"})
        job.state, job.exit_code = "exited", 0


@dataclass
class FakeConn:
    remote: FakeRemote
    closed: bool = False

    async def write(self, rel: str, data: bytes) -> None:
        self.remote._maybe_drop()
        self.remote.files[rel] = data

    async def read(self, rel: str) -> bytes | None:
        self.remote._maybe_drop()
        return self.remote.files.get(rel)

    async def start(self, job_dir: str, argv: list[str]) -> None:
        self.remote._maybe_drop()
        spec = json.loads(self.remote.files[f"{job_dir}/spec.json"])
        self.remote.starts += 1
        self.remote.argvs.append(list(argv))
        self.remote.jobs[job_dir] = FakeRunnerJob(total=spec["steps"] * spec["count"])
        self.remote.files[f"{job_dir}/progress.jsonl"] = b""
        if self.remote.start_exits is not None:
            code, log = self.remote.start_exits
            self.remote.jobs[job_dir].state, self.remote.jobs[job_dir].exit_code = "exited", code
            self.remote.files[f"{job_dir}/log"] = log.encode()

    async def status(self, job_dir: str) -> RemoteStatus:
        self.remote._maybe_drop()
        job = self.remote.jobs.get(job_dir)
        if job is None:
            return RemoteStatus("absent")
        if self.remote.absent_after_start > 0:  # as a wrapper that has not written its pid yet
            self.remote.absent_after_start -= 1
            return RemoteStatus("absent")
        self.remote.advance(job_dir)
        return RemoteStatus(job.state, job.exit_code)

    async def wait_end(self, job_dir: str, seconds: float) -> bool:
        # (Not a call that drops: tests count their drops in the calls before this one.)
        self.remote.waits += 1
        job = self.remote.jobs.get(job_dir)
        if not self.remote.ends_in_wait or job is None or job.state != "running":
            return False
        while job.state == "running":
            self.remote.advance(job_dir)
        return True

    async def kill(self, job_dir: str) -> None:
        self.remote._maybe_drop()
        self.remote.kills += 1
        job = self.remote.jobs.get(job_dir)
        if job is not None and job.state == "running":
            job.state = "dead"

    async def tail(self, rel: str, offset: int) -> tuple[list[str], int]:
        self.remote._maybe_drop()
        data = self.remote.files.get(rel, b"")[offset:]
        end = data.rfind(b"\n")
        if end < 0:
            return [], offset
        return data[: end + 1].decode().splitlines(), offset + end + 1

    async def get(self, rel: str, local: Path, max_bytes: int) -> None:
        self.remote._maybe_drop()
        self.remote.downloads.append(rel)
        if rel not in self.remote.files:
            raise asyncssh.SFTPNoSuchFile("No such file")
        data = self.remote.files[rel]
        if len(data) > max_bytes:
            raise DownloadRefused(f"{rel} is {len(data)} bytes, over {max_bytes}")
        local.write_bytes(data + b"!" if self.remote.corrupt else data)

    async def close(self) -> None:
        self.closed = True


@dataclass
class FakeConnector:
    remotes: dict[str, FakeRemote] = field(default_factory=dict)  # by instance id
    setup_s: float = 0.0  # what a new machine's first job spends installing the engine
    download_s: float = 0.0  # ... and downloading the model

    def remote(self, instance_id: str) -> FakeRemote:
        fresh = FakeRemote(setup_s=self.setup_s, download_s=self.download_s)
        return self.remotes.setdefault(instance_id, fresh)

    async def connect(self, inst: Instance) -> FakeConn:
        remote = self.remote(inst.id)
        if remote.refuse:
            raise ConnectionRefusedError("refused")
        remote.connects += 1
        return FakeConn(remote)


def settings(tmp: Path, **jobs: Any) -> Settings:
    return Settings(
        daemon={"state_dir": str(tmp)},
        jobs={"output_dir": str(tmp / "out"), "progress_interval": "1s", **jobs},
    )


async def add_instance(app: App, iid: str = "i1", **fields: Any) -> Instance:
    now = app.clock.now()
    base: dict[str, Any] = {
        "id": iid,
        "provider": "fake",
        "label": f"gpuwarden-main-{iid}",
        "state": InstanceState.RUNNING,
        "created_at": now,
        "lease_until": now + timedelta(hours=4),
        "last_activity": now,
        "price_per_hour": 0.36,
        "provider_id": f"p-{iid}",
        "ssh_host": "127.0.0.1",
        "ssh_port": 2222,
    }
    base.update(fields)
    inst = Instance(**base)
    await app.store.insert_instance(inst)
    return inst


async def add_job(
    app: App, jid: str = "j1", state: JobState = JobState.QUEUED, **fields: Any
) -> Job:
    now = app.clock.now()
    spec = fields.pop("spec", None) or JobSpec(prompt="a fox", steps=3, seed=7, engine="preview")
    job = Job(id=jid, state=state, spec=spec, created_at=now, updated_at=now, **fields)
    await app.store.insert_job(job)
    return job


async def drive(clock: FakeClock, coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` to its end: whenever it sleeps on the fake clock, step the clock to its
    wake-up; otherwise (it waits on the database thread) wait briefly for it to move."""
    task = asyncio.ensure_future(coro)
    try:
        async with asyncio.timeout(30):
            while not task.done():
                wake = clock.next_wake()
                if wake is not None:
                    await clock.advance(max(0.0, (wake - clock.now()).total_seconds()))
                else:
                    await asyncio.wait([task], timeout=0.01)
    finally:
        if not task.done():
            task.cancel()
    return task.result()


async def cancel_midway(
    clock: FakeClock, runner: Runner, job: Job, inst: Instance, home: Path
) -> Outcome:
    """Run `job` and ask for its cancel once its runner has begun (its progress file in the
    instance's `home` has a line); the runner's outcome."""
    progress = home / ".gpuwarden" / "jobs" / job.id / "progress.jsonl"

    async def cancel_once_running() -> None:
        async with asyncio.timeout(30):  # a runner that never starts fails, not hangs
            while not (progress.is_file() and progress.read_bytes()):
                await asyncio.sleep(0.02)  # a real process writes it: polled, bounded
        await runner.app.store.record(EntityKind.JOB, job.id, "cancel_requested")

    async def run_and_cancel() -> Outcome:
        outcome, _ = await asyncio.gather(runner.execute(job, inst), cancel_once_running())
        return outcome

    return await drive(clock, run_and_cancel())
