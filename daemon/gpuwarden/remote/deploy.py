"""The files that go onto instances: the probe, the dead-man switch and the job runner.

They live in deploy/instance/ in a source checkout and in the package's assets/ directory in
an installed wheel; both the watchdog and the job runner read them through deploy_file().
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path


def deploy_file(name: str) -> str:
    """The text of a file from deploy/instance/ (a source checkout), or from the package's
    assets/ directory (an installed wheel)."""
    source = Path(__file__).resolve().parents[3] / "deploy" / "instance" / name
    if source.is_file():
        return source.read_text()
    asset = importlib.resources.files("gpuwarden") / "assets" / name
    return asset.read_text()
