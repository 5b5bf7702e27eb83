"""providers.sim.ssh = "openssh" where it cannot run: refused at once with the reason (exit
78), never a sim whose instances fail to boot one by one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gpuwarden.cli import main
from gpuwarden.config.settings import SimSettings
from gpuwarden.sim import openssh


def test_without_sshd_the_reason_names_the_package(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(openssh, "SSHD", tmp_path / "no-sshd")
    reason = openssh.unavailable_reason()
    assert reason is not None and "openssh-server" in reason


def test_without_root_the_reason_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    sshd = tmp_path / "sshd"
    sshd.write_text("")
    monkeypatch.setattr(openssh, "SSHD", sshd)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    reason = openssh.unavailable_reason()
    assert reason is not None and "root" in reason


def test_gpuwarden_sim_refuses_openssh_it_cannot_serve(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(openssh, "SSHD", tmp_path / "no-sshd")
    with pytest.raises(SystemExit) as ended:
        main(["sim", "--ssh", "openssh", "--sandbox", str(tmp_path / "sim")])
    assert ended.value.code == 78
    assert "openssh-server" in capsys.readouterr().err
    assert not (tmp_path / "sim").exists()  # nothing started


def test_the_setting_takes_only_the_two_servers() -> None:
    assert SimSettings().ssh == "asyncssh"
    assert SimSettings(ssh="openssh").ssh == "openssh"
    with pytest.raises(ValueError, match="asyncssh"):
        SimSettings(ssh="dropbear")
