"""Driving one job on one instance over SSH: upload the runner and the spec, start it
detached, follow its progress, fetch the images and check them.

The remote side is a port (`Connector` -> `RemoteConn`, in remote_conn.py) so that unit tests
drive the runner with a hand-written fake; `SshConnector` is the real one (asyncssh).

Every step is safe to repeat, which is what makes restarts and SSH drops harmless:
- the remote status (running / exited / dead / absent) decides whether to start or attach;
- images are downloaded to a temporary name, checked against the sha256 the runner reported,
  and renamed; one already in place with the right checksum is not fetched again;
- a job reaches a terminal state through the store's state machine, which refuses a second.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncssh
import structlog

from gpuwarden.core.clock import parse_ts
from gpuwarden.core.model import EntityKind, Instance, InstanceState, Job, JobState
from gpuwarden.fleet.app import App
from gpuwarden.jobs import decisions as queue
from gpuwarden.jobs.remote_conn import Connector, RemoteConn, SshConn, SshConnector
from gpuwarden.jobs.results import (
    BadResult,
    ResultFile,
    drop_backoff,
    finite_only,
    first_use_seconds,
    max_image_bytes,
    parse_result,
    progress_count,
)
from gpuwarden.jobs.spec import remote_dir, runner_spec
from gpuwarden.remote import ssh as remote
from gpuwarden.remote.deploy import deploy_file
from gpuwarden.store import IllegalTransition

log = structlog.get_logger(__name__)

__all__ = ["Connector", "Outcome", "RemoteConn", "Runner", "SshConn", "SshConnector"]

HF_TOKEN_FILE = "hf_token"  # noqa: S105 - a file name; txt2img.py reads it, then removes it
RUNNER_NAME = "txt2img.py"  # in gpuwarden/remote/assets/, read through deploy_file
# Seconds after a start during which "absent" means "not started yet", never "died".
START_GRACE = 30.0
# What counts as the SSH connection going away (or never coming): reconnect and go on.
SSH_ERRORS = (OSError, asyncssh.Error, TimeoutError, asyncssh.misc.ChannelOpenError)
# SFTP answers that say the connection is gone (reconnect), unlike the instance refusing a
# file (no such file, permission denied: asking again gets the same answer).
SFTP_DROPS = (asyncssh.SFTPConnectionLost, asyncssh.SFTPNoConnection)
# A connection that lasted this long (seconds) before it dropped was a good one: the
# backoff and the give-up count start again.
GOOD_CONNECTION = 60.0


class Outcome(enum.StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    DIED = "died"  # the remote process vanished without an exit code; the instance lives
    LOST = "lost"  # the instance is gone or unreachable for longer than ssh_wait


class IntegrityError(Exception):
    """A downloaded file does not match the checksum the runner reported, or the instance
    refused it, or it is not one we take (see remote.download)."""


async def cancel_requested(app: App, job_id: str, after_id: int = 0) -> tuple[bool, int]:
    """Whether a cancel was asked for this job (a `cancel_requested` event; the api writes it
    so that nothing else has to share the job row), and the last event id seen."""
    events = await app.store.events(kind=EntityKind.JOB, entity_id=job_id, after_id=after_id)
    last = events[-1].id if events else after_id
    return any(e.name == "cancel_requested" for e in events), last


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Runner:
    """Runs one job on one instance whose SSH already answers. See `execute`."""

    def __init__(
        self,
        app: App,
        connector: Connector,
        *,
        poll: float,
        reattach: float,
        runner_source: str | None = None,
    ) -> None:
        self.app = app
        self.connector = connector
        self.poll = poll
        self.reattach = reattach  # seconds we keep trying to reach a live instance
        self.runner_source = runner_source or deploy_file(RUNNER_NAME)
        idle = app.settings.policy.idle_timeout.total_seconds()
        self.activity_every = max(0.5, min(30.0, idle / 4))

    @property
    def out_root(self) -> Path:
        return self.app.settings.output_dir

    # --- the whole job ------------------------------------------------------------------

    async def execute(self, job: Job, inst: Instance) -> Outcome:
        """Start or reattach, follow to the end, fetch. Returns how it ended; the job is in
        its terminal state for SUCCEEDED / FAILED / CANCELLED, untouched otherwise."""
        run = _Run(self, job, inst)
        return await run.go()


class _Run:
    """The state of one execution (connection, offsets, rate limits)."""

    def __init__(self, runner: Runner, job: Job, inst: Instance) -> None:
        self.r = runner
        self.app = runner.app
        self.job = job
        self.inst = inst
        self.dir = remote_dir(job.id)
        self.conn: RemoteConn | None = None
        self.offset = 0
        self.step = job.progress_step
        self.total = job.progress_total
        self.last_progress_at = -1e9
        self.last_activity_at = -1e9
        self.event_cursor = 0
        self.error_message: str | None = None
        self.started_at: float | None = None  # monotonic, when this run started the runner

    async def go(self) -> Outcome:
        try:
            return await self._go()
        finally:
            if self.conn is not None:
                await _quietly_close(self.conn)

    async def _go(self) -> Outcome:
        clock = self.app.clock
        drops = 0
        failing_since = 0.0
        while True:
            if not await self._ensure_conn():
                return Outcome.LOST
            assert self.conn is not None
            connected = clock.monotonic()
            try:
                return await self._follow(self.conn)
            except SSH_ERRORS as exc:
                await _quietly_close(self.conn)
                self.conn = None
                now = clock.monotonic()
                if drops == 0 or now - connected >= GOOD_CONNECTION:
                    drops, failing_since = 0, connected
                drops += 1
                log.warning(
                    "job_ssh_dropped",
                    job_id=self.job.id,
                    instance_id=self.inst.id,
                    error=str(exc),
                    drops=drops,
                )
                if drops > 1 and now - failing_since >= self.r.reattach:
                    log.warning("job_ssh_failing", job_id=self.job.id, instance_id=self.inst.id)
                    return Outcome.LOST  # every call fails: the job goes elsewhere
                await clock.sleep(drop_backoff(drops, self.r.poll))

    async def _ensure_conn(self) -> bool:
        """Connect, retrying for up to `reattach` seconds while the instance is live."""
        if self.conn is not None:
            return True
        clock = self.app.clock
        deadline = clock.monotonic() + self.r.reattach
        delay = self.r.poll
        while True:
            inst = await self.app.store.get_instance(self.inst.id)
            if not inst.state.live or inst.state is InstanceState.TERMINATING:
                return False
            self.inst = inst
            try:
                self.conn = await self.r.connector.connect(inst)
                return True
            except SSH_ERRORS as exc:
                if clock.monotonic() >= deadline:
                    log.warning(
                        "job_unreachable", job_id=self.job.id, instance_id=inst.id, error=str(exc)
                    )
                    return False
            await clock.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _follow(self, conn: RemoteConn) -> Outcome:
        job = await self.app.store.get_job(self.job.id)
        self.job = job
        if job.state is JobState.FETCHING:
            return await self._fetch(conn)
        status = await conn.status(self.dir)
        fresh = job.state is JobState.PROVISIONING
        if status.state == "absent" or (fresh and status.state == "dead"):
            await self._start(conn)  # (dead: a runner of an earlier attempt on this instance)
        elif status.state == "dead":
            return Outcome.DIED
        await self._mark_running()
        return await self._watch(conn)

    async def _watch(self, conn: RemoteConn) -> Outcome:
        """Follow a started runner until it ends, is cancelled, or dies."""
        while True:
            if await self._cancelled():
                await conn.kill(self.dir)
                return await self._finish_cancelled()
            await self._read_progress(conn)
            await self._touch_instance()
            status = await conn.status(self.dir)
            if status.state == "exited":
                await self._read_progress(conn)
                if status.exit_code == 0:
                    return await self._fetch(conn)
                return await self._fail(conn, f"the runner exited with {status.exit_code}")
            if status.state in ("dead", "absent"):
                if await self._cancelled():
                    return await self._finish_cancelled()
                if not (status.state == "absent" and self._starting()):
                    return Outcome.DIED
            await self._pause(conn)

    async def _pause(self, conn: RemoteConn) -> None:
        """Until the next look: one poll interval, cut short when the instance says the job
        ended (waiting there, so that its end is not noticed up to an interval late)."""
        clock = self.app.clock
        began = clock.monotonic()
        if await conn.wait_end(self.dir, self.r.poll):
            return
        rest = self.r.poll - (clock.monotonic() - began)
        if rest > 0:
            await clock.sleep(rest)

    def _starting(self) -> bool:
        """Whether this run started the runner less than START_GRACE seconds ago."""
        started = self.started_at
        return started is not None and self.app.clock.monotonic() - started < START_GRACE

    # --- steps --------------------------------------------------------------------------

    async def _start(self, conn: RemoteConn) -> None:
        engine = queue.engine_for(self.job.spec, self.inst.provider, self.app.settings.jobs.engine)
        delay = self.app.settings.jobs.preview_step_delay.total_seconds()
        spec = runner_spec(self.job, engine, delay)
        await conn.write(f"{self.dir}/{RUNNER_NAME}", self.r.runner_source.encode())
        await conn.write(f"{self.dir}/spec.json", json.dumps(spec, ensure_ascii=False).encode())
        token = self.app.settings.jobs.hf_token
        if engine == "diffusers" and token is not None and token.get_secret_value():
            # Beside the spec, not in it: the spec is kept and shown; the runner reads this
            # file into HF_TOKEN and removes it.
            await conn.write(f"{self.dir}/{HF_TOKEN_FILE}", token.get_secret_value().encode())
        runner_args = [f"{self.dir}/{RUNNER_NAME}", f"{self.dir}/spec.json"]
        await conn.start(self.dir, remote.python_argv(runner_args))
        self.started_at = self.app.clock.monotonic()
        self.offset = 0
        log.info("job_started", job_id=self.job.id, instance_id=self.inst.id, engine=engine)
        self.job = await self.app.store.update_job(
            self.job.id, extra={**self.job.extra, "engine": engine, "remote_dir": self.dir}
        )

    async def _mark_running(self) -> None:
        if self.job.state is JobState.PROVISIONING:
            self.job = await self.app.store.transition_job(
                self.job.id,
                JobState.RUNNING,
                details={"instance_id": self.inst.id},
                started_at=self.app.clock.now(),
                instance_id=self.inst.id,
            )
            if self.job.started_at is not None:
                waited = (self.job.started_at - self.job.created_at).total_seconds()
                self.app.metrics.job_wait.observe(max(0.0, waited))

    async def _cancelled(self) -> bool:
        asked, self.event_cursor = await cancel_requested(self.app, self.job.id, self.event_cursor)
        if asked:
            self.event_cursor = 0  # keep answering yes
        return asked

    async def _finish_cancelled(self) -> Outcome:
        with contextlib.suppress(IllegalTransition):  # already terminal: that one stands
            await self.app.store.transition_job(self.job.id, JobState.CANCELLED, reason="user")
        log.info("job_cancelled", job_id=self.job.id, instance_id=self.inst.id)
        return Outcome.CANCELLED

    async def _read_progress(self, conn: RemoteConn) -> None:
        lines, self.offset = await conn.tail(f"{self.dir}/progress.jsonl", self.offset)
        step, total = self.step, self.total
        for line in lines:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if not isinstance(ev, dict):
                continue
            if ev.get("event") in ("progress", "start"):
                new_step = progress_count(ev.get("step", step))
                new_total = progress_count(ev.get("total", total))
                if new_step is None or new_total is None:
                    continue  # not counts (null, text, NaN, huge): skipped, not taken
                step, total = new_step, new_total
            elif ev.get("event") == "error":
                self.error_message = str(ev.get("message", "error"))
        if (step, total) == (self.step, self.total):
            return
        now = self.app.clock.monotonic()
        if step < total and now - self.last_progress_at < 1.0:
            return  # at most about one progress event a second, but always the last step
        self.step, self.total, self.last_progress_at = step, total, now
        await self.app.store.record(
            EntityKind.JOB,
            self.job.id,
            "progress",
            {"step": step, "total": total},
            updates={"progress_step": step, "progress_total": total},
        )

    async def _touch_instance(self) -> None:
        """Keep the instance's idle timer from firing while a job runs on it."""
        now = self.app.clock.monotonic()
        if now - self.last_activity_at < self.r.activity_every:
            return
        self.last_activity_at = now
        await self.app.store.record(
            EntityKind.INSTANCE,
            self.inst.id,
            "activity",
            {"job_id": self.job.id},
            updates={"last_activity": self.app.clock.now()},
        )

    async def _fail(self, conn: RemoteConn, fallback: str, *, ours: bool = False) -> Outcome:
        """Fail the job with the runner's error, else its log's tail, else `fallback`; with
        `ours`, `fallback` is the reason (the daemon refused what the instance sent)."""
        message = fallback if ours else self.error_message
        if message is None:
            tail = await conn.read(f"{self.dir}/log")
            message = (tail or b"").decode("utf-8", "replace")[-500:].strip() or fallback
        with contextlib.suppress(IllegalTransition):
            await self.app.store.transition_job(
                self.job.id, JobState.FAILED, reason="runner_error", error=message
            )
        log.warning("job_failed", job_id=self.job.id, instance_id=self.inst.id, error=message)
        self._observe_run("failed", self.app.clock.now())
        return Outcome.FAILED

    def _observe_run(self, outcome: str, now: datetime) -> None:
        if self.job.started_at is not None:
            ran = (now - self.job.started_at).total_seconds()
            self.app.metrics.job_run.labels(outcome).observe(max(0.0, ran))

    # --- fetching -----------------------------------------------------------------------

    async def _fetch(self, conn: RemoteConn) -> Outcome:
        if self.job.state is JobState.RUNNING:
            self.job = await self.app.store.transition_job(self.job.id, JobState.FETCHING)
        raw = await conn.read(f"{self.dir}/result.json")
        if raw is None:
            return await self._fail(conn, "the runner left no result.json")
        max_bytes = max_image_bytes(self.app.settings.jobs.max_image_mb)
        try:
            result, files = parse_result(raw, max_files=self.job.spec.count, max_bytes=max_bytes)
        except BadResult as exc:
            return await self._fail(conn, str(exc), ours=True)
        out_dir = self.r.out_root / self.job.id
        out_dir.mkdir(parents=True, exist_ok=True)
        outputs = []
        for entry in files:
            try:
                outputs.append(str(await self._fetch_file(conn, entry, max_bytes)))
            except IntegrityError as exc:
                return await self._fail(conn, str(exc), ours=True)
        _write_atomic(out_dir / "result.json", json.dumps(result, indent=2).encode())
        return await self._succeed(result, outputs)

    async def _fetch_file(self, conn: RemoteConn, entry: ResultFile, max_bytes: int) -> Path:
        name, sha = entry.name, entry.sha256  # a checked plain name: never a path
        final = self.r.out_root / self.job.id / name
        if final.exists() and sha256_of(final) == sha:
            return final  # landed before a restart: not twice
        part = final.with_name(f".{name}.part")
        for _ in range(2):
            try:
                await conn.get(f"{self.dir}/{name}", part, max_bytes)
            except remote.DownloadRefused as exc:
                raise IntegrityError(f"{name}: {exc}") from None
            except SFTP_DROPS:
                raise
            except asyncssh.SFTPError as exc:  # no such file, permission denied, ...
                raise IntegrityError(f"{name}: the instance refused it: {exc.reason}") from None
            if sha256_of(part) == sha:
                part.replace(final)
                return final
        part.unlink(missing_ok=True)
        raise IntegrityError(f"{name}: checksum mismatch after download")

    async def _succeed(self, result: dict[str, Any], outputs: list[str]) -> Outcome:
        now = self.app.clock.now()
        job = self.job
        started = job.started_at or now
        assigned = _time(job.extra.get("assigned_at")) or started
        gpu_seconds = max(0.0, (now - started).total_seconds())
        cost = queue.job_cost(self.inst.price_per_hour, (now - assigned).total_seconds())
        ceiling = self.app.limits().hard_cap.total_seconds()
        first_use, doubts = first_use_seconds(result, ceiling)
        if doubts:
            log.warning(
                "job_result_timing_refused", job_id=job.id, instance_id=self.inst.id, doubts=doubts
            )
        try:
            await self.app.store.transition_job(
                job.id,
                JobState.SUCCEEDED,
                details={"outputs": outputs, "cost": cost},
                outputs=tuple(outputs),
                error=None,
                gpu_seconds=gpu_seconds,
                cost=cost,
                extra={**job.extra, "result": finite_only(result), **first_use},
            )
        except IllegalTransition:
            return Outcome.CANCELLED  # cancelled while fetching: the files stay, unrecorded
        self._observe_run("succeeded", now)
        log.info(
            "job_succeeded",
            job_id=job.id,
            instance_id=self.inst.id,
            cost=cost,
            gpu_seconds=round(gpu_seconds, 3),
            **first_use,
        )
        return Outcome.SUCCEEDED


def _time(value: Any) -> datetime | None:
    return parse_ts(value) if isinstance(value, str) else None


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_bytes(data)
    tmp.replace(path)


async def _quietly_close(conn: RemoteConn) -> None:
    with contextlib.suppress(*SSH_ERRORS):
        await conn.close()
