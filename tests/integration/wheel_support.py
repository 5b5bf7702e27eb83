"""A wheel of this package built as users get it: from a copy of the source (as
deploy/install.sh and `pip install .` build it; an in-tree build would leave build/ and
*.egg-info in the checkout), not the editable install every other test uses."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def build_wheel(work: Path) -> Path:
    src = work / "src"
    src.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "daemon",
        src / "daemon",
        ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"),
    )
    out = work / "dist"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"pip wheel failed:\n{result.stdout}\n{result.stderr}")
    [built] = out.glob("gpuwarden-*.whl")
    return built
