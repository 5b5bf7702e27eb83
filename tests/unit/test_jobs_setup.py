"""The runner's engine setup on an instance: the pinned packages it installs, the `setup_s` it
reports, the model download it times (`download_s`), the job that records them, and the cold
start that counts them."""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from jobs_fakes import FakeConnector, add_instance, add_job, drive, settings
from tests.conftest import RUNNER_SCRIPT as RUNNER
from tests.conftest import MakeApp, load_runner

from gpuwarden.core.clock import FakeClock
from gpuwarden.core.model import JobState
from gpuwarden.jobs.results import setup_seconds
from gpuwarden.jobs.runner import Outcome, Runner

ROOT = Path(__file__).resolve().parents[2]
ENGINE_PACKAGES = ("diffusers", "transformers", "accelerate")


def test_the_engine_packages_are_pinned_exactly_in_one_place() -> None:
    tree = ast.parse(RUNNER.read_text())
    [pins] = [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "PINNED_PACKAGES" for t in node.targets)
    ]
    values = ast.literal_eval(pins)
    assert [re.fullmatch(r"([a-z]+)==(\d+(\.\d+)+)", v) is not None for v in values] == [
        True
    ] * len(ENGINE_PACKAGES)
    assert sorted(v.split("==")[0] for v in values) == sorted(ENGINE_PACKAGES)
    # No other file of the package names a version of them (or installs them unpinned).
    pattern = re.compile(r"(diffusers|transformers|accelerate)\s*(==|>=|~=|<=)")
    named = [
        str(p.relative_to(ROOT))
        for p in (ROOT / "daemon" / "gpuwarden").rglob("*")
        if p.suffix in (".py", ".sh") and pattern.search(p.read_text())
    ]
    assert named == [str(RUNNER.relative_to(ROOT))]


def test_the_runner_installs_the_pins_and_times_it(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = load_runner()
    calls: list[list[str]] = []
    emitted: list[dict[str, Any]] = []

    class Progress:
        def emit(self, **event: Any) -> None:
            emitted.append(event)

    def fake_run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 0)

    ticks = iter([100.0, 142.5])
    # The runner imports subprocess and importlib.util where it installs: patch the modules.
    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setattr(mod.time, "monotonic", lambda: next(ticks, 142.5))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert mod.ensure_diffusers(Progress()) == pytest.approx(42.5)
    assert calls == [[sys.executable, "-m", "pip", "install", "--quiet", *mod.PINNED_PACKAGES]]
    assert emitted == [{"event": "installing", "packages": list(mod.PINNED_PACKAGES)}]


def test_the_runner_spends_no_setup_where_the_engine_is_there(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mod = load_runner()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("nothing to install"))
    assert mod.ensure_diffusers(object()) == 0.0


def test_the_preview_engine_reports_no_setup_in_its_result(tmp_path: Path) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text('{"prompt": "a fox", "engine": "preview", "steps": 1, "seed": 1}')
    mod = load_runner()
    assert mod.run(str(spec)) == 0
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["setup_s"] == 0.0 and result["timings"]["setup_s"] == 0.0
    assert result["download_s"] == 0.0 and result["timings"]["download_s"] == 0.0


class _Pipelines:
    """Stands for diffusers.DiffusionPipeline: a cache holding the models in `cached`."""

    def __init__(self, cached: set[str]) -> None:
        self.cached = cached
        self.fetched: list[str] = []

    def download(self, model: str, local_files_only: bool = False) -> str:
        if model not in self.cached:
            if local_files_only:
                raise OSError(f"{model} is not in the cache")
            self.fetched.append(model)
            self.cached.add(model)
        return f"/cache/{model}"


def _fake_diffusers(monkeypatch: pytest.MonkeyPatch, cached: set[str]) -> _Pipelines:
    pipelines = _Pipelines(cached)
    module = types.ModuleType("diffusers")
    module.DiffusionPipeline = pipelines  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "diffusers", module)
    return pipelines


class _Emitted:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def emit(self, **event: Any) -> None:
        self.events.append(event)


def test_the_runner_times_the_models_first_download(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = load_runner()
    pipelines = _fake_diffusers(monkeypatch, cached=set())
    ticks = iter([200.0, 263.5])
    monkeypatch.setattr(mod.time, "monotonic", lambda: next(ticks, 263.5))
    progress = _Emitted()
    assert mod.fetch_model("stabilityai/sd-turbo", progress) == pytest.approx(63.5)
    assert pipelines.fetched == ["stabilityai/sd-turbo"]
    assert progress.events == [{"event": "downloading", "model": "stabilityai/sd-turbo"}]
    # The next job on this machine finds it in the cache: nothing fetched, nothing counted.
    assert mod.fetch_model("stabilityai/sd-turbo", _Emitted()) == 0.0
    assert pipelines.fetched == ["stabilityai/sd-turbo"]


def test_a_local_model_directory_is_no_download(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    mod = load_runner()
    pipelines = _fake_diffusers(monkeypatch, cached=set())
    assert mod.fetch_model(str(tmp_path), _Emitted()) == 0.0
    assert pipelines.fetched == []


def test_the_runner_takes_a_hugging_face_token_into_its_environment_and_removes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    spec = tmp_path / "spec.json"
    spec.write_text('{"prompt": "a fox", "engine": "preview", "steps": 1, "seed": 1}')
    (tmp_path / "hf_token").write_text("hf_abc\n")
    mod = load_runner()
    assert mod.run(str(spec)) == 0
    assert not (tmp_path / "hf_token").exists()  # not left for the machine's next renter
    import os

    assert os.environ["HF_TOKEN"] == "hf_abc"
    assert "hf_abc" not in (tmp_path / "result.json").read_text()


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (42.5, 42.5),
        (7, 7.0),
        (0, 0.0),
        (-3.0, 0.0),
        (None, 0.0),
        ("12", 0.0),
        (True, 0.0),
        (float("nan"), 0.0),
        (float("inf"), 0.0),
    ],
)
def test_setup_seconds_trusts_only_a_number_of_seconds(value: Any, seconds: float) -> None:
    assert setup_seconds({"setup_s": value}) == seconds
    assert setup_seconds({"download_s": value}, "download_s") == seconds
    assert setup_seconds({}) == 0.0  # a runner too old to say


async def test_a_results_setup_lands_in_the_job(tmp_path: Path, make_app: MakeApp) -> None:
    clock = FakeClock()
    app = await make_app(settings(tmp_path), clock)
    connector = FakeConnector(setup_s=37.25, download_s=12.0)
    inst = await add_instance(app)
    job = await add_job(app, state=JobState.PROVISIONING, instance_id=inst.id)
    runner = Runner(app, connector, poll=1.0, reattach=60.0)
    assert await drive(clock, runner.execute(job, inst)) is Outcome.SUCCEEDED
    done = await app.store.get_job(job.id)
    assert done.extra["setup_s"] == 37.25 and done.extra["result"]["setup_s"] == 37.25
    assert done.extra["download_s"] == 12.0
    # The next job on the same machine finds the engine installed.
    again = await add_job(app, "j2", state=JobState.PROVISIONING, instance_id=inst.id)
    assert await drive(clock, runner.execute(again, inst)) is Outcome.SUCCEEDED
    assert (await app.store.get_job(again.id)).extra["setup_s"] == 0.0
