"""`gpuwarden sim` as a user runs it: it prints its URLs, serves, and prints the ledger when
stopped with SIGINT."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow


def test_gpuwarden_sim_serves_and_prints_the_ledger(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-c",
        "from gpuwarden.cli import main; main()",
        "sim",
        "--json",
        "--port",
        "0",
        "--boot-delay",
        "0.2s",
        "--sandbox",
        str(tmp_path / "sandboxes"),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        assert info["vast"].endswith("/vast") and info["lambda"].endswith("/lambda/api/v1")
        assert info["api_key"] == "sim-key"
        auth = {"Authorization": "Bearer sim-key"}
        offers = httpx.post(f"{info['vast']}/api/v0/bundles/", json={"limit": 1}, timeout=5)
        ask = offers.json()["offers"][0]["id"]
        made = httpx.put(
            f"{info['vast']}/api/v0/asks/{ask}/",
            json={"image": "img", "label": "cli-test"},
            headers=auth,
            timeout=5,
        )
        assert made.json()["success"] is True
        ledger = httpx.get(f"{info['admin']}/_sim/ledger", timeout=5).json()
        assert [r["label"] for r in ledger["instances"]] == ["cli-test"]
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    final = json.loads(out.strip().splitlines()[-1])
    assert final["running"] == 1  # never destroyed: the ledger shows it still billing
    assert final["instances"][0]["label"] == "cli-test"
    assert (tmp_path / "sandboxes").is_dir()


def test_gpuwarden_sim_help_lists_its_options() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "from gpuwarden.cli import main; main()", "sim", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for option in ("--port", "--config", "--boot-delay", "--json"):
        assert option in out
