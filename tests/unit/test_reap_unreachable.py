"""`reap` when a provider cannot be listed: it says so and why, and exits 1."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from gpuwarden.cli import main
from gpuwarden.system import logs as glog


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in list(os.environ):
        if name.startswith(("GPUWARDEN_", "CREDENTIALS_DIRECTORY")):
            monkeypatch.delenv(name)
    yield
    # reap configures logging for itself (warnings on stderr): give the next tests theirs.
    structlog.reset_defaults()
    glog.close()
    glog.clear_secrets()


def test_reap_says_plainly_that_the_in_process_sim_cannot_be_listed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not "No instance with our label" as if it had looked: it could not, and says why."""
    path = tmp_path / "c.toml"
    path.write_text(f'[daemon]\nstate_dir = "{tmp_path}"\n[providers.sim]\nenabled = true\n')
    with pytest.raises(SystemExit) as exc:
        main(["reap", "--config", str(path), "--yes"])
    out, err = capsys.readouterr()
    assert exc.value.code == 1
    assert "No instance with our label at the providers that could be listed." in out
    assert "list sim-vast and sim-lambda failed" in err and "destroy-all" in err


def test_reap_refuses_to_guess_the_label_when_the_database_is_unreadable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before, it fell back to "main", listed gpuwarden-main-* (none of this state dir's
    instances, which carry its own label) and said there was nothing to reap, exit 0."""
    (tmp_path / "gpuwarden.db").write_bytes(b"not a database" * 100)
    path = tmp_path / "c.toml"
    path.write_text(
        f'[daemon]\nstate_dir = "{tmp_path}"\n'
        '[providers.sim]\nenabled = true\nbase_url = "http://127.0.0.1:9"\n'
    )
    with pytest.raises(SystemExit) as exc:
        main(["reap", "--config", str(path), "--yes"])
    out, err = capsys.readouterr()
    assert exc.value.code == 1
    assert "cannot tell which instances are ours" in err and "gpuwarden.db" in err
    assert "daemon.installation" in err
    assert "No instance with our label" not in out  # it did not look, and does not say so
