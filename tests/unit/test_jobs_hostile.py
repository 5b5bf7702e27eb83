"""An instance that lies in its result.json, or whose every SFTP call fails (issue 17, item 4):
the job fails cleanly with the reason (never stuck in fetching), nothing is written outside
the job's output directory, and repeated drops are retried with a growing wait, not at once.
Real Store, FakeClock, FakeRemote."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from jobs_fakes import FakeConnector, add_instance, add_job, drive, settings
from structlog.testing import capture_logs
from tests.conftest import MakeApp

from gpuwarden.core.clock import FakeClock
from gpuwarden.core.model import JobState
from gpuwarden.fleet.app import App
from gpuwarden.jobs.results import BadResult, drop_backoff, first_use_seconds, parse_result
from gpuwarden.jobs.runner import Outcome, Runner

AppClock = tuple[App, FakeClock]
SHA = hashlib.sha256(b"x").hexdigest()


@pytest.fixture
async def app_clock(tmp_path: Path, make_app: MakeApp) -> AppClock:
    clock = FakeClock()
    (tmp_path / "state").mkdir()
    return await make_app(settings(tmp_path / "state", max_image_mb=0.001), clock), clock


def entry(name: Any, sha: Any = SHA, **more: Any) -> dict[str, Any]:
    return {"name": name, "sha256": sha, **more}


HOSTILE: list[tuple[str, Any, str]] = [
    ("dotdot", {"files": [entry("..")]}, "not a plain file name"),
    ("empty", {"files": [entry("")]}, "not a plain file name"),
    ("dot", {"files": [entry(".")]}, "not a plain file name"),
    ("path", {"files": [entry("../../../etc/cron.d/x")]}, "not a plain file name"),
    ("absolute", {"files": [entry("/etc/passwd")]}, "not a plain file name"),
    ("nul", {"files": [entry("a\x00b.png")]}, "not a plain file name"),
    ("newline", {"files": [entry("a.png\n")]}, "not a plain file name"),
    ("ours", {"files": [entry("result.json")]}, "not a plain file name"),
    ("not a string", {"files": [entry(7)]}, "name is not a string"),
    ("not an object", {"files": ["image-0.png"]}, "is not an object"),
    ("files not a list", {"files": "image-0.png"}, "files is not a list"),
    ("no files", {"files": []}, "names no image"),
    ("many", {"files": [entry(f"i{n}.png") for n in range(5000)]}, "5000 files"),
    ("twice", {"files": [entry("a.png"), entry("a.png")]}, "twice"),
    ("bad sha", {"files": [entry("a.png", sha="00")]}, "not a sha256"),
    ("huge", {"files": [entry("a.png", bytes=10**12)]}, "over the cap"),
    ("negative size", {"files": [entry("a.png", bytes=-1)]}, "not a size"),
    ("a list", [1, 2], "not a JSON object"),
]


@pytest.mark.parametrize(("case", "result", "reason"), HOSTILE, ids=[c[0] for c in HOSTILE])
def test_a_hostile_result_is_refused_with_the_reason(case: str, result: Any, reason: str) -> None:
    with pytest.raises(BadResult, match=reason):
        parse_result(json.dumps(result).encode(), max_files=4, max_bytes=1000)


@pytest.mark.parametrize("raw", [b"\xff\xfe", b"{", b""])
def test_a_result_that_is_not_json_is_refused(raw: bytes) -> None:
    with pytest.raises(BadResult, match="not JSON"):
        parse_result(raw, max_files=4, max_bytes=1000)


def test_a_well_formed_result_passes() -> None:
    raw = json.dumps({"files": [entry("image-0.png", bytes=10)], "seed": 1}).encode()
    result, [file] = parse_result(raw, max_files=1, max_bytes=1000)
    assert (file.name, file.sha256, file.size) == ("image-0.png", SHA, 10)
    assert result["seed"] == 1


async def run_with_result(app: App, clock: FakeClock, result: bytes) -> tuple[Outcome, Any]:
    connector = FakeConnector()
    runner = Runner(app, connector, poll=1.0, reattach=60.0)
    inst = await add_instance(app)
    job = await add_job(app, state=JobState.PROVISIONING, instance_id=inst.id)
    connector.remote(inst.id).result_json = result
    outcome = await drive(clock, runner.execute(job, inst))
    return outcome, await app.store.get_job(job.id)


@pytest.mark.parametrize(("case", "result", "reason"), HOSTILE[:9], ids=[c[0] for c in HOSTILE[:9]])
async def test_a_lying_instance_fails_its_job_and_writes_nothing_outside(
    app_clock: AppClock, tmp_path: Path, case: str, result: Any, reason: str
) -> None:
    app, clock = app_clock
    before = sorted(p for p in tmp_path.rglob("*") if "state" not in p.parts)
    outcome, job = await run_with_result(app, clock, json.dumps(result).encode())
    assert outcome is Outcome.FAILED
    assert job.state is JobState.FAILED and reason in (job.error or "")
    assert sorted(p for p in tmp_path.rglob("*") if "state" not in p.parts) == before
    out = app.settings.output_dir / job.id
    assert not out.exists() or list(out.iterdir()) == []


async def test_a_file_the_instance_names_but_lacks_fails_the_job(app_clock: AppClock) -> None:
    app, clock = app_clock
    outcome, job = await run_with_result(
        app, clock, json.dumps({"files": [entry("missing.png")]}).encode()
    )
    assert outcome is Outcome.FAILED
    assert "missing.png: the instance refused it" in (job.error or "")


async def test_an_image_over_the_size_cap_is_not_downloaded(
    app_clock: AppClock, tmp_path: Path
) -> None:
    # The runner reports no size, so the cap is met at the download: 1000 bytes here.
    app, clock = app_clock
    connector = FakeConnector()
    runner = Runner(app, connector, poll=1.0, reattach=60.0)
    inst = await add_instance(app)
    job = await add_job(app, state=JobState.PROVISIONING, instance_id=inst.id)
    remote = connector.remote(inst.id)
    big = b"p" * 5000
    remote.files[f".gpuwarden/jobs/{job.id}/big.png"] = big
    digest = hashlib.sha256(big).hexdigest()
    remote.result_json = json.dumps({"files": [entry("big.png", sha=digest)]}).encode()
    assert await drive(clock, runner.execute(job, inst)) is Outcome.FAILED
    failed = await app.store.get_job(job.id)
    assert "big.png" in (failed.error or "") and "over 1000" in (failed.error or "")
    assert not any((app.settings.output_dir / job.id).iterdir())


async def test_repeated_ssh_errors_back_off_and_give_up_after_the_reattach_window(
    app_clock: AppClock,
) -> None:
    app, clock = app_clock
    connector = FakeConnector()
    runner = Runner(app, connector, poll=1.0, reattach=120.0)
    inst = await add_instance(app)
    job = await add_job(app, state=JobState.PROVISIONING, instance_id=inst.id)
    remote = connector.remote(inst.id)
    remote.drop_next = 10**9  # every call on every connection fails
    started = clock.monotonic()
    assert await drive(clock, runner.execute(job, inst)) is Outcome.LOST
    elapsed = clock.monotonic() - started
    # 1, 2, 4, ... 30, 30 s between tries: about a dozen connects in two minutes, where
    # retrying at once made thousands a minute.
    assert 120.0 <= elapsed <= 120.0 + 30.0
    assert 5 <= remote.connects <= 12


def test_the_drop_backoff_doubles_up_to_its_cap() -> None:
    assert [drop_backoff(n, 1.0) for n in (1, 2, 3, 5, 6, 40)] == [1, 2, 4, 16, 30, 30]


# --- durations and counts an instance reports --------------------------------------------------

HARD_CAP_S = 8 * 3600.0  # policy.hard_cap's default: no instance lives longer


@pytest.mark.parametrize(
    ("reported", "counted", "doubted"),
    [
        ({"setup_s": 90.0, "download_s": 40.0}, (90.0, 40.0), []),
        ({}, (0.0, 0.0), []),  # a runner too old to say
        ({"setup_s": 0, "download_s": 0.0}, (0.0, 0.0), []),
        ({"setup_s": -5.0, "download_s": float("nan")}, (0.0, 0.0), ["setup_s", "download_s"]),
        ({"setup_s": float("inf"), "download_s": "12"}, (0.0, 0.0), ["setup_s", "download_s"]),
        ({"setup_s": True, "download_s": None}, (0.0, 0.0), ["setup_s"]),
        ({"setup_s": 1e300}, (HARD_CAP_S, 0.0), ["setup_s"]),
        # Each is under the ceiling, the two together are not.
        ({"setup_s": 20000.0, "download_s": 20000.0}, (20000.0, 8800.0), ["download_s"]),
    ],
)
def test_reported_setup_times_are_bounded_and_doubts_named(
    reported: dict[str, Any], counted: tuple[float, float], doubted: list[str]
) -> None:
    seconds, doubts = first_use_seconds(reported, HARD_CAP_S)
    assert (seconds["setup_s"], seconds["download_s"]) == counted
    assert [d.split("=")[0] for d in doubts] == doubted


async def test_lying_setup_times_are_capped_and_logged_and_the_job_succeeds(
    tmp_path: Path, make_app: MakeApp
) -> None:
    clock = FakeClock()
    app = await make_app(settings(tmp_path), clock)
    connector = FakeConnector(setup_s=1e300, download_s=float("nan"))  # NaN: not JSON
    inst = await add_instance(app)
    job = await add_job(app, state=JobState.PROVISIONING, instance_id=inst.id)
    runner = Runner(app, connector, poll=1.0, reattach=60.0)
    with capture_logs() as logs:
        assert await drive(clock, runner.execute(job, inst)) is Outcome.SUCCEEDED
    done = await app.store.get_job(job.id)
    assert (done.extra["setup_s"], done.extra["download_s"]) == (HARD_CAP_S, 0.0)
    assert done.extra["result"]["download_s"] is None  # kept as JSON can show it
    [line] = [e for e in logs if e["event"] == "job_result_timing_refused"]
    assert line["job_id"] == job.id and line["log_level"] == "warning"
    assert [d.split("=")[0] for d in line["doubts"]] == ["setup_s", "download_s"]


@pytest.mark.parametrize(
    "bad",
    [None, "3", 2.5, True, -1, 10**30, float("nan")],
    ids=["null", "text", "fraction", "bool", "negative", "huge", "nan"],
)
async def test_a_progress_line_that_is_not_counts_is_skipped(app_clock: AppClock, bad: Any) -> None:
    """Before, int(None) or int(NaN) raised out of the runner (the job went back to the queue
    as an internal error, to fail the same way again), a huge count overflowed the database's
    integer, and the others were recorded as the job's progress."""
    app, clock = app_clock
    connector = FakeConnector()
    inst = await add_instance(app)
    job = await add_job(app, state=JobState.PROVISIONING, instance_id=inst.id)
    remote = connector.remote(inst.id)
    real_advance = remote.advance

    def advance(job_dir: str) -> None:  # a lying line after each real one
        real_advance(job_dir)
        remote._append(f"{job_dir}/progress.jsonl", {"event": "progress", "step": bad, "total": 99})

    remote.advance = advance  # type: ignore[method-assign]
    outcome = await drive(clock, Runner(app, connector, poll=1.0, reattach=60.0).execute(job, inst))
    assert outcome is Outcome.SUCCEEDED
    done = await app.store.get_job(job.id)
    assert (done.progress_step, done.progress_total) == (3, 3)  # only the real lines taken
