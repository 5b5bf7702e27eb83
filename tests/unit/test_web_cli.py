"""`gpuwarden dashboard` and the wiring of the dashboard service."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.conftest import MakeApp

from gpuwarden.cli import build_parser
from gpuwarden.config.settings import Settings
from gpuwarden.lifecycle import wiring
from gpuwarden.web.auth import load_or_create_token, token_path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    args = build_parser().parse_args(list(argv))
    code = int(args.func(args))
    out, err = capsys.readouterr()
    return code, out, err


def config(tmp_path: Path, listen: str | None) -> Path:
    path = tmp_path / "config.toml"
    text = f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n'
    if listen is not None:
        text += f'[dashboard]\nlisten = "{listen}"\n'
    path.write_text(text)
    return path


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(__import__("os").environ):
        if name.startswith("GPUWARDEN_"):
            monkeypatch.delenv(name)


def test_it_prints_the_url_with_the_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = config(tmp_path, "127.0.0.1:8092")
    token = load_or_create_token(token_path(tmp_path / "state"))
    code, out, _ = run(capsys, "dashboard", "--config", str(path))
    assert code == 0
    assert out.strip() == f"http://127.0.0.1:8092/?token={token}"
    code, out, _ = run(capsys, "dashboard", "--config", str(path), "--json")
    got = json.loads(out)
    assert got["url"].endswith(token) and got["listen"] == "127.0.0.1:8092"
    assert got["token_file"] == str(tmp_path / "state" / "dashboard.token")


def test_it_says_why_when_there_is_nothing_to_open(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "dashboard", "--config", str(config(tmp_path, None)))
    assert code == 78 and "dashboard.listen" in err
    code, _, err = run(capsys, "dashboard", "--config", str(config(tmp_path, "127.0.0.1:8092")))
    assert code == 1 and "dashboard.token" in err and "has the daemon started" in err
    code, _, err = run(capsys, "dashboard", "--config", str(config(tmp_path, "0.0.0.0:80")))
    assert code == 78 and "dashboard.listen" in err and "allow_remote" in err


async def test_the_service_runs_only_when_listen_is_set(tmp_path: Path, make_app: MakeApp) -> None:
    off = await make_app(Settings(daemon={"state_dir": str(tmp_path)}))
    assert "dashboard" not in [s.name for s in wiring.build_services(off)]
    on = await make_app(
        Settings(daemon={"state_dir": str(tmp_path)}, dashboard={"listen": "127.0.0.1:0"})
    )
    names = [s.name for s in wiring.build_services(on)]
    assert names[-1] == "dashboard"  # after the jobs' recovery: it serves a settled store
