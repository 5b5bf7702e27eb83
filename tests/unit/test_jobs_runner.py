"""The runner against a FakeRemote: start, progress, fetch with checksums, failure, cancel,
an SSH drop, and a resume that does not fetch twice. Real Store, FakeClock."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from jobs_fakes import FakeConnector, add_instance, add_job, drive, settings
from tests.conftest import MakeApp

from gpuwarden.core.clock import FakeClock
from gpuwarden.core.model import EntityKind, JobSpec, JobState
from gpuwarden.fleet.app import App
from gpuwarden.jobs.runner import START_GRACE, Outcome, Runner

AppClock = tuple[App, FakeClock]


@pytest.fixture
async def app_clock(tmp_path: Path, make_app: MakeApp) -> AppClock:
    clock = FakeClock()
    return await make_app(settings(tmp_path), clock), clock


async def test_a_job_runs_and_its_image_lands_with_the_reported_checksum(
    app_clock: AppClock,
) -> None:
    app, clock = app_clock
    connector = FakeConnector()
    runner = Runner(app, connector, poll=1.0, reattach=60.0)
    inst = await add_instance(app)
    job = await add_job(app, state=JobState.PROVISIONING, instance_id=inst.id)
    outcome = await drive(clock, runner.execute(job, inst))
    assert outcome is Outcome.SUCCEEDED
    done = await app.store.get_job(job.id)
    assert done.state is JobState.SUCCEEDED
    [image] = done.outputs
    remote = connector.remote(inst.id)
    assert Path(image).read_bytes() == remote.files[f".gpuwarden/jobs/{job.id}/image-0.png"]
    result = json.loads((app.settings.output_dir / job.id / "result.json").read_text())
    assert result["files"][0]["sha256"] == hashlib.sha256(Path(image).read_bytes()).hexdigest()
    assert done.progress_step == done.progress_total == 3
    assert done.gpu_seconds > 0 and done.cost > 0
    # The spec went over as JSON with the prompt untouched; the runner was started once.
    spec = json.loads(remote.files[f".gpuwarden/jobs/{job.id}/spec.json"])
    assert spec["prompt"] == "a fox" and spec["engine"] == "preview"
    assert remote.starts == 1
    # No temporary files are left beside the outputs.
    assert sorted(p.name for p in (app.settings.output_dir / job.id).iterdir()) == [
        "image-0.png",
        "result.json",
    ]
    # The instance was marked active while the job ran.
    events = await app.store.events(kind=EntityKind.INSTANCE, entity_id=inst.id)
    assert any(e.name == "activity" for e in events)


async def test_a_damaged_download_fails_the_job(app_clock: AppClock) -> None:
    app, clock = app_clock
    connector = FakeConnector()
    inst = await add_instance(app)
    connector.remote(inst.id).corrupt = True
    job = await add_job(app, state=JobState.PROVISIONING, instance_id=inst.id)
    outcome = await drive(clock, Runner(app, connector, poll=1.0, reattach=60.0).execute(job, inst))
    assert outcome is Outcome.FAILED
    failed = await app.store.get_job(job.id)
    assert failed.state is JobState.FAILED and "checksum" in (failed.error or "")
    assert not (app.settings.output_dir / job.id / "image-0.png").exists()


async def test_a_runner_error_fails_the_job_with_its_message(app_clock: AppClock) -> None:
    app, clock = app_clock
    connector = FakeConnector()
    inst = await add_instance(app)
    connector.remote(inst.id).fail_with = "CUDA out of memory"
    job = await add_job(app, state=JobState.PROVISIONING, instance_id=inst.id)
    outcome = await drive(clock, Runner(app, connector, poll=1.0, reattach=60.0).execute(job, inst))
    assert outcome is Outcome.FAILED
    assert (await app.store.get_job(job.id)).error == "CUDA out of memory"


async def test_a_cancel_request_kills_the_remote_process(app_clock: AppClock) -> None:
    app, clock = app_clock
    connector = FakeConnector()
    inst = await add_instance(app)
    job = await add_job(
        app, state=JobState.RUNNING, instance_id=inst.id, progress_step=1, progress_total=3
    )
    await app.store.record(EntityKind.JOB, job.id, "cancel_requested")
    remote = connector.remote(inst.id)
    outcome = await drive(clock, Runner(app, connector, poll=1.0, reattach=60.0).execute(job, inst))
    assert outcome is Outcome.CANCELLED
    assert (await app.store.get_job(job.id)).state is JobState.CANCELLED
    assert remote.kills == 1
    assert remote.downloads == []


async def test_an_ssh_drop_reconnects_and_the_runner_is_started_once(app_clock: AppClock) -> None:
    app, clock = app_clock
    connector = FakeConnector()
    inst = await add_instance(app)
    job = await add_job(app, state=JobState.PROVISIONING, instance_id=inst.id)
    remote = connector.remote(inst.id)
    runner = Runner(app, connector, poll=1.0, reattach=60.0)

    original = remote.advance

    def drop_after_first_step(job_dir: str) -> None:
        original(job_dir)
        if remote.jobs[job_dir].step == 1:
            remote.drop_next = 2  # the next two calls fail: reconnect, then go on

    remote.advance = drop_after_first_step  # type: ignore[method-assign]
    outcome = await drive(clock, runner.execute(job, inst))
    assert outcome is Outcome.SUCCEEDED
    assert remote.starts == 1
    assert remote.connects >= 2


async def test_an_unreachable_instance_is_lost_after_the_reattach_budget(
    app_clock: AppClock,
) -> None:
    app, clock = app_clock
    connector = FakeConnector()
    inst = await add_instance(app)
    connector.remote(inst.id).refuse = True
    job = await add_job(app, state=JobState.RUNNING, instance_id=inst.id)
    start = clock.monotonic()
    outcome = await drive(clock, Runner(app, connector, poll=1.0, reattach=30.0).execute(job, inst))
    assert outcome is Outcome.LOST
    assert 30.0 <= clock.monotonic() - start <= 40.0
    assert (await app.store.get_job(job.id)).state is JobState.RUNNING  # the service decides


async def test_a_resumed_fetch_does_not_download_what_already_landed(app_clock: AppClock) -> None:
    app, clock = app_clock
    connector = FakeConnector()
    inst = await add_instance(app)
    # As if the daemon died while fetching: the runner finished, the image had landed, the
    # job row still says fetching.
    job = await add_job(app, state=JobState.FETCHING, instance_id=inst.id)
    remote = connector.remote(inst.id)
    conn = await connector.connect(inst)
    spec = {"prompt": "a fox", "seed": 7, "steps": 1, "count": 1, "engine": "preview"}
    await conn.write(f".gpuwarden/jobs/{job.id}/spec.json", json.dumps(spec).encode())
    await conn.start(f".gpuwarden/jobs/{job.id}", [])
    await conn.status(f".gpuwarden/jobs/{job.id}")  # one step: done
    landed = app.settings.output_dir / job.id / "image-0.png"
    landed.parent.mkdir(parents=True)
    landed.write_bytes(remote.files[f".gpuwarden/jobs/{job.id}/image-0.png"])
    runner = Runner(app, connector, poll=1.0, reattach=60.0)
    assert await drive(clock, runner.execute(job, inst)) is Outcome.SUCCEEDED
    assert remote.downloads == []  # nothing fetched twice
    assert remote.starts == 1  # and nothing run twice
    assert (await app.store.get_job(job.id)).outputs == (str(landed),)


async def test_a_job_not_yet_found_right_after_its_start_is_not_declared_dead(
    app_clock: AppClock,
) -> None:
    """A status read that comes before the wrapper's pid file says "absent": within the start
    grace that is a job still starting, not one that died (which would run it again)."""
    app, clock = app_clock
    connector = FakeConnector()
    inst = await add_instance(app)
    remote = connector.remote(inst.id)
    remote.absent_after_start = 3
    job = await add_job(app, state=JobState.PROVISIONING, instance_id=inst.id)
    outcome = await drive(clock, Runner(app, connector, poll=1.0, reattach=60.0).execute(job, inst))
    assert outcome is Outcome.SUCCEEDED
    assert remote.starts == 1


async def test_a_job_still_absent_after_the_start_grace_died(app_clock: AppClock) -> None:
    app, clock = app_clock
    connector = FakeConnector()
    inst = await add_instance(app)
    connector.remote(inst.id).absent_after_start = 10_000
    job = await add_job(app, state=JobState.PROVISIONING, instance_id=inst.id)
    start = clock.monotonic()
    outcome = await drive(clock, Runner(app, connector, poll=1.0, reattach=60.0).execute(job, inst))
    assert outcome is Outcome.DIED
    assert START_GRACE <= clock.monotonic() - start <= START_GRACE + 5


async def test_no_python_on_the_instance_fails_the_job_saying_so(app_clock: AppClock) -> None:
    """The runner is started through the interpreter search; when that finds no Python 3 the
    job fails with the search's own message (from the job's log), not a shell's."""
    app, clock = app_clock
    connector = FakeConnector()
    inst = await add_instance(app)
    remote = connector.remote(inst.id)
    message = "no python3 on the instance: looked for python3, python on PATH (/usr/bin:/bin)"
    remote.start_exits = (127, message + "\n")
    job = await add_job(app, state=JobState.PROVISIONING, instance_id=inst.id)
    outcome = await drive(clock, Runner(app, connector, poll=1.0, reattach=60.0).execute(job, inst))
    assert outcome is Outcome.FAILED
    assert (await app.store.get_job(job.id)).error == message
    [argv] = remote.argvs
    assert argv[:2] == ["sh", "-c"] and "/opt/conda/bin/python3" in argv[2]
    box = f".gpuwarden/jobs/{job.id}"
    assert argv[-2:] == [f"{box}/txt2img.py", f"{box}/spec.json"]


async def test_a_hugging_face_token_goes_beside_the_spec_of_a_diffusers_job_only(
    tmp_path: Path, make_app: MakeApp
) -> None:
    clock = FakeClock()
    app = await make_app(settings(tmp_path, hf_token="hf_secret_token_123"), clock)
    connector = FakeConnector()
    runner = Runner(app, connector, poll=1.0, reattach=60.0)
    inst = await add_instance(app)
    for engine, sent in (("diffusers", True), ("preview", False)):
        spec = JobSpec(prompt="a fox", steps=3, seed=7, engine=engine)
        job = await add_job(
            app, f"j-{engine}", state=JobState.PROVISIONING, instance_id=inst.id, spec=spec
        )
        await drive(clock, runner.execute(job, inst))
        files = connector.remote(inst.id).files
        token_file = files.get(f".gpuwarden/jobs/{job.id}/hf_token")
        assert (token_file == b"hf_secret_token_123") is sent, engine
        assert b"hf_secret" not in files[f".gpuwarden/jobs/{job.id}/spec.json"]
    stored = [e.details for e in await app.store.events()]
    assert "hf_secret" not in json.dumps(stored, default=str)


@pytest.mark.parametrize("ends_in_wait", [False, True])
async def test_an_end_seen_while_waiting_on_the_instance_is_not_noticed_a_poll_late(
    app_clock: AppClock, ends_in_wait: bool
) -> None:
    app, clock = app_clock
    connector = FakeConnector()
    inst = await add_instance(app)
    remote = connector.remote(inst.id)
    remote.ends_in_wait = ends_in_wait
    job = await add_job(app, state=JobState.PROVISIONING, instance_id=inst.id)
    outcome = await drive(clock, Runner(app, connector, poll=1.0, reattach=60.0).execute(job, inst))
    assert outcome is Outcome.SUCCEEDED
    done = await app.store.get_job(job.id)
    assert done.started_at is not None and done.finished_at is not None
    took = (done.finished_at - done.started_at).total_seconds()
    assert remote.waits >= 1
    # Three steps, one per status read: two polls of 1 s when the instance's wait returns
    # without the end, none when the wait sees the job end.
    assert took == (0.0 if ends_in_wait else 2.0)
