"""The package as users install it: a wheel built from a copy of the source (as
deploy/install.sh and `pip install .` build it), not the editable install every other test
uses. What goes onto instances (the probe, the dead-man switch, the job runner) must ride in
it, or the installed daemon dies at start-up looking for them."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

INSTANCE_FILES = ("probe.sh", "deadman.sh", "txt2img.py")


@pytest.mark.slow  # builds the wheel (about 6 s), once per run: the `wheel` fixture
def test_the_wheel_carries_what_goes_onto_instances(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    for name in INSTANCE_FILES:
        assert f"gpuwarden/remote/assets/{name}" in names, (name, sorted(names))
    assert "gpuwarden/web/assets/dashboard.html" in names  # the dashboard's page


@pytest.mark.slow
def test_the_installed_wheel_reads_its_own_instance_files(wheel: Path, tmp_path: Path) -> None:
    """Installed apart from the checkout (its dependencies come from this venv, after it on
    sys.path), deploy_file() finds every instance file inside the installed package."""
    target = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet"]
    subprocess.run(
        [*pip, "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    probe = (
        "import sys, gpuwarden\n"
        "from gpuwarden.remote.deploy import deploy_file\n"
        "print(gpuwarden.__file__)\n"
        "for name in sys.argv[1:]:\n"
        "    assert deploy_file(name).strip(), name\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = subprocess.run(
        [sys.executable, "-c", probe, *INSTANCE_FILES],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # not the checkout: nothing may be found there
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).is_relative_to(target)  # the installed copy answered
