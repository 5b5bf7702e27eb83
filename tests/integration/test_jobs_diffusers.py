"""The runner's diffusers engine for real: a tiny randomly initialised Stable Diffusion
pipeline built from configs (no download), saved to disk and loaded by the runner through
AutoPipelineForText2Image, exactly as it loads stabilityai/sd-turbo on a GPU.

Needs torch, diffusers and transformers (CI installs them: .ci/run); skipped elsewhere."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import struct
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from tests.conftest import load_runner

pytestmark = pytest.mark.slow


def _needs(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(
            f"the diffusers engine test needs {', '.join(missing)} "
            "(pip install torch==2.13.0 and the runner's PINNED_PACKAGES, as .ci/run does)"
        )


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's byte alphabet: with one token per character (and its end-of-word form)
    and no merges, the tokenizer needs no downloaded vocabulary."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    bs += range(ord("®"), ord("ÿ") + 1)
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def build_tiny_pipeline(root: Path) -> Path:
    # Imported as Any: these packages are optional and untyped.
    torch: Any = importlib.import_module("torch")
    diffusers: Any = importlib.import_module("diffusers")
    transformers: Any = importlib.import_module("transformers")

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
    )
    vae = diffusers.AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
    )
    text_encoder = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=1000,
        )
    )
    vocab: dict[str, int] = {"<|startoftext|>": 0, "!!pad": 1, "<|endoftext|>": 2}
    for c in _bytes_to_unicode():
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    tok_dir = root / "tokenizer-src"
    tok_dir.mkdir(parents=True)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(
        vocab_file=str(tok_dir / "vocab.json"),
        merges_file=str(tok_dir / "merges.txt"),
        model_max_length=77,
    )
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=diffusers.EulerDiscreteScheduler(steps_offset=1),  # 0 is deprecated (a warning)
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    model = root / "tiny-sd"
    pipe.save_pretrained(str(model))
    return model


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


def run_job(runner: ModuleType, job_dir: Path, spec: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    job_dir.mkdir(parents=True)
    (job_dir / "spec.json").write_text(json.dumps(spec))
    code = runner.run(str(job_dir / "spec.json"))
    result = json.loads((job_dir / "result.json").read_text()) if code == 0 else {}
    return int(code), result


# The engine runs torch, diffusers and numpy in this process, where warnings are errors; on an
# instance it is a process of its own and their deprecation notices are only printed.
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
def test_the_diffusers_engine_runs_a_tiny_pipeline_from_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # accelerate too: without any of the runner's pinned packages it would pip-install them.
    _needs("torch", "diffusers", "transformers", "accelerate")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing may come from the network
    model = build_tiny_pipeline(tmp_path)
    runner = load_runner()
    spec = {
        "job_id": "jtiny",
        "prompt": "a tiny fox",
        "negative_prompt": "blurry",
        "seed": 3,
        "steps": 2,
        "width": 64,
        "height": 48,
        "engine": "diffusers",
        "model": str(model),
        "guidance": 0.0,
        "count": 1,
    }
    code, result = run_job(runner, tmp_path / "a", spec)
    assert code == 0, (tmp_path / "a" / "progress.jsonl").read_text()
    assert result["engine"] == "diffusers" and result["model"] == str(model)
    assert (result["seed"], result["steps"], result["size"]) == (3, 2, [64, 48])
    [f] = result["files"]
    data = (tmp_path / "a" / f["name"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == f["sha256"]
    assert png_size(data) == (64, 48)
    events = [json.loads(ln) for ln in (tmp_path / "a" / "progress.jsonl").read_text().splitlines()]
    steps = [e["step"] for e in events if e["event"] == "progress"]
    assert steps == [1, 2]  # from callback_on_step_end
    assert events[-1]["event"] == "done"
    # The seed is honoured: the same seed gives the same image.
    code, again = run_job(runner, tmp_path / "b", spec)
    assert code == 0 and again["files"][0]["sha256"] == f["sha256"]


def test_auto_picks_preview_without_cuda(tmp_path: Path) -> None:
    _needs("torch")
    torch: Any = importlib.import_module("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: auto would pick diffusers")
    runner = load_runner()
    code, result = run_job(
        runner,
        tmp_path / "c",
        {"prompt": "x", "seed": 1, "steps": 1, "width": 64, "height": 64, "engine": "auto"},
    )
    assert code == 0 and result["engine"] == "preview"
