#!/usr/bin/env python3
"""gpuwarden's job runner: one text-to-image job on a rented GPU (or a sim instance).

    python3 txt2img.py JOB_DIR/spec.json

It reads the job spec (a JSON file that the daemon uploaded over SFTP: the prompt travels only
here, never on a command line), writes one JSON object per line to stdout and to
JOB_DIR/progress.jsonl so the daemon can follow it, and leaves the image(s) and result.json in
JOB_DIR. Progress lines:

    {"event": "start", "engine": "preview", "total": 8}
    {"event": "progress", "step": 3, "total": 8}
    {"event": "image", "index": 0, "file": "image-0.png"}
    {"event": "done", "result": "result.json"}        (or {"event": "error", "message": ...})

Two engines, one protocol:
  diffusers  AutoPipelineForText2Image (fp16 on CUDA, else fp32 on the CPU), imported lazily;
  preview    the standard library only: a deterministic picture from prompt and seed, drawn
             over N steps and written as PNG with zlib + struct. A smoke test of an instance.
  auto       diffusers if torch imports and sees CUDA, else preview.

Nothing but the standard library is imported at import time, so the script starts on any
Python 3.8+ image.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import struct
import sys
import time
import warnings
import zlib

DEFAULT_MODEL = "stabilityai/sd-turbo"

# What the diffusers engine installs on an image that lacks it, pinned exactly (the one place
# they are named), so that every instance runs the same code. Releases of the same month, whose
# requirements agree (huggingface-hub >=1.32,<3; safetensors >=0.8; torch >=2.0, which GPU
# images ship).
PINNED_PACKAGES = ("diffusers==0.42.1", "transformers==5.23.0", "accelerate==1.15.0")


class Progress:
    """Writes protocol lines to stdout and to the progress file, flushed at once."""

    def __init__(self, path):
        # A fresh file per run: the daemon reads it from the start when it starts a runner.
        self.file = open(path, "w", encoding="utf-8")  # noqa: SIM115 - lives as long as the job

    def emit(self, **event):
        line = json.dumps(event, sort_keys=True)
        for out in (sys.stdout, self.file):
            out.write(line + "\n")
            out.flush()

    def close(self):
        self.file.close()


def write_atomic(path, data):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --- engine: preview --------------------------------------------------------------------------


def png_bytes(width, height, rgb):
    """A PNG (8-bit RGB, no interlace) from a bytearray of width*height*3 bytes."""
    stride = width * 3
    raw = b"".join(b"\x00" + bytes(rgb[y * stride : (y + 1) * stride]) for y in range(height))

    def chunk(kind, body):
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )


class Canvas:
    def __init__(self, width, height):
        self.w, self.h = width, height
        self.px = bytearray(width * height * 3)

    def gradient(self, top, bottom):
        for y in range(self.h):
            t = y / max(1, self.h - 1)
            color = bytes(int(top[c] + (bottom[c] - top[c]) * t) for c in range(3))
            self.px[y * self.w * 3 : (y + 1) * self.w * 3] = color * self.w

    def span(self, y, x0, x1, color):
        x0, x1 = max(0, x0), min(self.w, x1)
        if 0 <= y < self.h and x0 < x1:
            self.px[(y * self.w + x0) * 3 : (y * self.w + x1) * 3] = bytes(color) * (x1 - x0)

    def rect(self, x, y, w, h, color):
        for yy in range(y, y + h):
            self.span(yy, x, x + w, color)

    def disc(self, cx, cy, r, color):
        for yy in range(cy - r, cy + r + 1):
            dx = int((r * r - (yy - cy) ** 2) ** 0.5)
            self.span(yy, cx - dx, cx + dx + 1, color)


def preview_image(spec, index, on_step):
    """Draw a deterministic picture from (prompt, seed, index): one layer of shapes per step."""
    digest = hashlib.sha256(
        json.dumps([spec["prompt"], spec["negative_prompt"], spec["seed"], index]).encode()
    ).digest()
    rng = random.Random(digest)
    width, height, steps = spec["width"], spec["height"], spec["steps"]

    def color():
        return (rng.randrange(256), rng.randrange(256), rng.randrange(256))

    canvas = Canvas(width, height)
    canvas.gradient(color(), color())
    delay = float(spec.get("preview_step_delay", 0.0))
    for step in range(steps):
        for _ in range(3):
            size = max(2, min(width, height) // (4 + step))
            x, y = rng.randrange(width), rng.randrange(height)
            if rng.random() < 0.5:
                canvas.disc(x, y, size // 2, color())
            else:
                canvas.rect(x - size // 2, y - size // 2, size, size, color())
        if delay > 0:
            time.sleep(delay)  # only to make progress visible; the daemon sets it tiny in tests
        on_step(step + 1)
    return png_bytes(width, height, canvas.px)


# --- engine: diffusers ------------------------------------------------------------------------


def cuda_available():
    try:
        import torch
    except Exception:  # any import failure means "no torch here"
        return False
    return bool(torch.cuda.is_available())


def ensure_diffusers(progress):
    """GPU images ship torch but rarely diffusers: install the pinned packages once, on first
    use. Returns the seconds that took (0.0 when nothing was missing): billed time that belongs
    to the instance's cold start, not to this job's images."""
    import importlib.util
    import subprocess

    names = [pin.split("==")[0] for pin in PINNED_PACKAGES]
    missing = [m for m in names if importlib.util.find_spec(m) is None]
    if not missing:
        return 0.0
    started = time.monotonic()
    progress.emit(event="installing", packages=list(PINNED_PACKAGES))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", *PINNED_PACKAGES],
        check=True,
        stdout=sys.stderr,
    )
    importlib.invalidate_caches()
    return time.monotonic() - started


def fetch_model(model, progress):
    """Download the model's files into the Hugging Face cache unless they are there already
    (or `model` is a local directory). Returns the seconds the download took (0.0 when nothing
    was fetched): like the install, billed time of the machine's first use, not of this job."""
    if os.path.isdir(model):
        return 0.0
    from diffusers import DiffusionPipeline

    try:
        DiffusionPipeline.download(model, local_files_only=True)
        return 0.0
    except Exception:  # not (wholly) in the cache: fetch it below, timed
        pass
    started = time.monotonic()
    progress.emit(event="downloading", model=model)
    DiffusionPipeline.download(model)
    return time.monotonic() - started


class DiffusersEngine:
    """AutoPipelineForText2Image, loaded once per job and used for each image."""

    def __init__(self, spec, progress):
        self.setup_s = ensure_diffusers(progress)
        self.download_s = fetch_model(spec["model"], progress)
        import torch
        from diffusers import AutoPipelineForText2Image

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.float16 if self.device == "cuda" else torch.float32
        with warnings.catch_warnings():
            # diffusers 0.42 renamed torch_dtype to dtype and warns; older releases, which an
            # image may already have, know only torch_dtype, which every release honours.
            warnings.filterwarnings("ignore", ".*torch_dtype.*", FutureWarning)
            self.pipe = AutoPipelineForText2Image.from_pretrained(spec["model"], torch_dtype=dtype)
        self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)

    def image(self, spec, index, on_step):
        generator = self.torch.Generator(self.device).manual_seed(spec["seed"] + index)

        def callback(pipe, step, timestep, kwargs):
            on_step(step + 1)
            return kwargs

        out = self.pipe(
            prompt=spec["prompt"],
            negative_prompt=spec["negative_prompt"] or None,
            num_inference_steps=spec["steps"],
            guidance_scale=spec["guidance"],
            width=spec["width"],
            height=spec["height"],
            generator=generator,
            callback_on_step_end=callback,
        )
        import io

        buf = io.BytesIO()
        out.images[0].save(buf, format="PNG")
        return buf.getvalue()


class PreviewEngine:
    setup_s = 0.0  # nothing to install
    download_s = 0.0  # nor to download

    def __init__(self, spec, progress):
        pass

    def image(self, spec, index, on_step):
        return preview_image(spec, index, on_step)


# --- the job ----------------------------------------------------------------------------------


def normalise(spec):
    """Fill defaults so the result JSON names every value that was used."""
    out = dict(spec)
    out.setdefault("negative_prompt", "")
    out.setdefault("steps", 4)
    out.setdefault("width", 512)
    out.setdefault("height", 512)
    out.setdefault("count", 1)
    out.setdefault("guidance", 0.0)
    if out.get("seed") is None:
        out["seed"] = random.SystemRandom().randrange(2**31)
    if not out.get("model"):
        out["model"] = DEFAULT_MODEL
    engine = out.get("engine") or "auto"
    if engine == "auto":
        engine = "diffusers" if cuda_available() else "preview"
    if engine not in ("diffusers", "preview"):
        raise ValueError(f"unknown engine {engine!r}")
    out["engine"] = engine
    return out


def take_hf_token(job_dir):
    """A Hugging Face token the daemon put beside the spec (jobs.hf_token): into HF_TOKEN for
    huggingface_hub to send when it fetches a gated model, and the file removed, so the token
    does not stay on a machine someone else rents next."""
    path = os.path.join(job_dir, "hf_token")
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError:
        return
    os.remove(path)
    if token:
        os.environ["HF_TOKEN"] = token


def run(spec_path):
    job_dir = os.path.dirname(os.path.abspath(spec_path))
    progress = Progress(os.path.join(job_dir, "progress.jsonl"))
    started = time.monotonic()
    try:
        take_hf_token(job_dir)
        with open(spec_path, encoding="utf-8") as f:
            spec = normalise(json.load(f))
        total = spec["steps"] * spec["count"]
        progress.emit(event="start", engine=spec["engine"], model=spec["model"], total=total)
        engine_cls = DiffusersEngine if spec["engine"] == "diffusers" else PreviewEngine
        engine = engine_cls(spec, progress)
        loaded = time.monotonic()
        files = []
        for index in range(spec["count"]):
            base = index * spec["steps"]

            def on_step(step, base=base):
                progress.emit(event="progress", step=base + step, total=total)

            data = engine.image(spec, index, on_step)
            name = f"image-{index}.png"
            write_atomic(os.path.join(job_dir, name), data)
            files.append(
                {"name": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            )
            progress.emit(event="image", index=index, file=name)
        finished = time.monotonic()
        result = {
            "job_id": spec.get("job_id"),
            "python": sys.executable,  # which interpreter the daemon's search found
            "engine": spec["engine"],
            "model": spec["model"] if spec["engine"] == "diffusers" else "preview",
            "seed": spec["seed"],
            "steps": spec["steps"],
            "size": [spec["width"], spec["height"]],
            "count": spec["count"],
            "guidance": spec["guidance"],
            "prompt_sha256": hashlib.sha256(spec["prompt"].encode("utf-8")).hexdigest(),
            "prompt_chars": len(spec["prompt"]),
            # Installing what the engine needs and downloading the model, apart from loading
            # it: the daemon adds both to the instance's cold start.
            "setup_s": round(engine.setup_s, 3),
            "download_s": round(engine.download_s, 3),
            "timings": {
                "setup_s": round(engine.setup_s, 3),
                "download_s": round(engine.download_s, 3),
                "load_s": round(loaded - started - engine.setup_s - engine.download_s, 3),
                "generate_s": round(finished - loaded, 3),
                "total_s": round(finished - started, 3),
            },
            "files": files,
        }
        write_atomic(
            os.path.join(job_dir, "result.json"), json.dumps(result, indent=2).encode("utf-8")
        )
        progress.emit(event="done", result="result.json")
        return 0
    except Exception as exc:  # reported to the daemon through the protocol
        progress.emit(event="error", message=f"{type(exc).__name__}: {exc}")
        return 1
    finally:
        progress.close()


def main(argv):
    if len(argv) != 2:
        sys.stderr.write("usage: txt2img.py SPEC_JSON\n")
        return 2
    return run(argv[1])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
