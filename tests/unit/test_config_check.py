"""`gpuwarden check-config`: each kind of bad value exits 78 naming the dotted field; the
environment and $CREDENTIALS_DIRECTORY override the file; a secret is never printed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from gpuwarden.cli import main
from gpuwarden.config import settings as config
from gpuwarden.config.durations import parse_duration

EXAMPLE = Path(__file__).resolve().parents[2] / "config.example.toml"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("GPUWARDEN_") or name == "CREDENTIALS_DIRECTORY":
            monkeypatch.delenv(name)


def check(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(["check-config", *argv])
    out, err = capsys.readouterr()
    assert isinstance(exc.value.code, int)
    return exc.value.code, out, err


BAD = [
    ("unknown key", '[daemon]\nsocket_path = "/tmp/x"\n', "daemon.socket_path", "unknown"),
    ("unknown section", "[polcy]\nidle_timeout = '1h'\n", "polcy", "unknown"),
    ("bad duration", '[policy]\nidle_timeout = "soon"\n', "policy.idle_timeout", "duration"),
    ("number unit typo", '[policy]\npoll_interval = "30 sec"\n', "policy.poll_interval", ""),
    ("negative price", "[budget]\ndaily_limit = -5.0\n", "budget.daily_limit", "greater"),
    ("negative credit floor", "[budget]\ncredit_floor = -1\n", "budget.credit_floor", ""),
    (
        "lease_max < lease_default",
        '[policy]\nlease_default = "6h"\nlease_max = "5h"\n',
        "policy.lease_max",
        "lease_default",
    ),
    (
        "lease_default above the default lease_max",
        '[policy]\nlease_default = "9h"\n',
        "policy.lease_max",
        "lease_default",
    ),
    (
        "hard_cap < lease_max",
        '[policy]\nlease_max = "8h"\nhard_cap = "6h"\n',
        "policy.hard_cap",
        "lease_max",
    ),
    ("wrong type", '[jobs]\nmax_instances = "many"\n', "jobs.max_instances", ""),
    ("not TOML", "[daemon\n", "(file)", "TOML"),
    # Values that used to escape as OverflowError (a traceback, and on SIGHUP a dead daemon).
    (
        "duration too long",
        '[policy]\nidle_timeout = "99999999999d"\n',
        "policy.idle_timeout",
        "100",
    ),
    ("infinite duration", "[policy]\nhard_cap = inf\n", "policy.hard_cap", "finite"),
    ("not-a-number duration", "[policy]\npoll_interval = nan\n", "policy.poll_interval", "finite"),
    ("huge seconds", "[policy]\npoll_interval = 1e300\n", "policy.poll_interval", "100"),
    # Valid but absurd: refused with the reason.
    ("a poll that pins a core", '[policy]\npoll_interval = "0s"\n', "policy.poll_interval", "1s"),
    ("no time for requests", '[daemon]\nrequest_timeout = "0s"\n', "daemon.request_timeout", "1s"),
    ("no time to stop", '[daemon]\nshutdown_timeout = "0s"\n', "daemon.shutdown_timeout", "1s"),
    ("a cap of weeks", '[policy]\nhard_cap = "1000h"\n', "policy.hard_cap", "at most"),
    ("uid -1", "[daemon]\nallowed_uids = [-1]\n", "daemon.allowed_uids.0", "greater"),
    (
        "an infinite price",
        "[budget]\nmax_hourly_price = inf\n",
        "budget.max_hourly_price",
        "finite",
    ),
]


@pytest.mark.parametrize(("case", "text", "field", "reason"), BAD, ids=[b[0] for b in BAD])
def test_bad_value_exits_78_naming_the_field(
    case: str,
    text: str,
    field: str,
    reason: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    code, out, err = check([str(path)], capsys)
    assert code == config.EX_CONFIG == 78
    assert out == ""  # nothing printed as if it were valid
    line = next((ln for ln in err.splitlines() if ln.strip().startswith(field + ":")), None)
    assert line is not None, err
    assert reason.lower() in line.lower()
    assert str(path) in line  # where the value came from


def test_every_problem_is_reported_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        '[daemon]\nbogus = 1\n[policy]\nidle_timeout = "x"\n[budget]\ndaily_limit = -1\n'
    )
    code, _, err = check([str(path)], capsys)
    assert code == 78
    for field in ("daemon.bogus", "policy.idle_timeout", "budget.daily_limit"):
        assert f"  {field}:" in err


def test_missing_file_exits_78(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = check([str(tmp_path / "nope.toml")], capsys)
    assert code == 78
    assert "no such file" in err


def test_bad_environment_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GPUWARDEN_POLICY__IDLE_TIMEOUT", "whenever")
    code, _, err = check([str(EXAMPLE)], capsys)
    assert code == 78
    assert "policy.idle_timeout" in err
    assert "environment variable GPUWARDEN_POLICY__IDLE_TIMEOUT" in err


def test_example_is_valid(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = check([str(EXAMPLE)], capsys)
    assert code == 0, err
    assert "[providers.sim]" in out
    assert "enabled = true" in out


def test_path_from_gpuwarden_config(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GPUWARDEN_CONFIG", str(EXAMPLE))
    code, out, _ = check(["--json"], capsys)
    assert code == 0
    assert json.loads(out)["providers"]["sim"]["enabled"] is True


def test_environment_overrides_the_file(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GPUWARDEN_POLICY__IDLE_TIMEOUT", "10m")
    monkeypatch.setenv("GPUWARDEN_PROVIDERS__SIM__ENABLED", "false")
    monkeypatch.setenv("GPUWARDEN_DAEMON__ALLOWED_UIDS", "[1000, 1001]")
    code, out, _ = check(["--json", str(EXAMPLE)], capsys)
    assert code == 0
    data = json.loads(out)
    assert data["policy"]["idle_timeout"] == "10m"
    assert data["providers"]["sim"]["enabled"] is False
    assert data["daemon"]["allowed_uids"] == [1000, 1001]
    settings = config.load(EXAMPLE)
    assert settings.policy.idle_timeout.total_seconds() == 600


def test_credentials_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "vast_api_key").write_text("vast-key-from-credentials\n")
    (creds / "lambda_api_key").write_text("lambda-key-from-credentials")
    pem = "-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n-----END OPENSSH PRIVATE KEY-----\n"
    (creds / "ssh_private_key").write_text(pem)
    (creds / "hf_token").write_text("hf_from_credentials\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    settings = config.load(EXAMPLE)
    vast, lam = settings.providers.vast.api_key, settings.providers.lambda_.api_key
    assert vast is not None and vast.get_secret_value() == "vast-key-from-credentials"
    assert lam is not None and lam.get_secret_value() == "lambda-key-from-credentials"
    key = settings.ssh.private_key
    assert key is not None and key.get_secret_value() == pem  # PEM keeps its newlines
    hf = settings.jobs.hf_token
    assert hf is not None and hf.get_secret_value() == "hf_from_credentials"
    assert set(config.CREDENTIALS) == {
        "vast_api_key",
        "lambda_api_key",
        "ssh_private_key",
        "hf_token",
    }


def test_environment_beats_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "vast_api_key").write_text("from-file")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    monkeypatch.setenv("GPUWARDEN_PROVIDERS__VAST__API_KEY", "from-env")
    key = config.load(EXAMPLE).providers.vast.api_key
    assert key is not None and key.get_secret_value() == "from-env"


UNREADABLE = [
    ("a Latin-1 byte", b"[policy]\nidle_timeout = '1h'\n# caf\xe9\n", "UTF-8"),
    ("a binary file", bytes(range(256)) * 4, "UTF-8"),
]


@pytest.mark.parametrize(("case", "data", "reason"), UNREADABLE, ids=[u[0] for u in UNREADABLE])
def test_a_file_that_is_not_text_exits_78_naming_it(
    case: str, data: bytes, reason: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(data)
    code, out, err = check([str(path)], capsys)
    assert code == 78
    assert out == ""
    assert "Traceback" not in err
    assert f"(file): not {reason} text" in err and str(path) in err


@pytest.mark.parametrize(
    ("var", "value", "field"),
    [
        ("GPUWARDEN_POLICY", "notjson", "policy"),
        ("GPUWARDEN_DAEMON__ALLOWED_UIDS", "[1000,", "daemon"),
    ],
)
def test_a_table_in_the_environment_that_is_not_json_names_the_variable(
    var: str,
    value: str,
    field: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(var, value)
    code, _, err = check([str(EXAMPLE)], capsys)
    assert code == 78
    assert "Traceback" not in err
    assert f"  {field}: not valid JSON" in err
    assert f"environment variable {var}" in err


def test_run_refuses_a_file_that_is_not_text_with_78_before_touching_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gpuwarden.lifecycle import supervisor

    path = tmp_path / "bad.toml"
    path.write_bytes(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n# caf\xe9\n'.encode("latin-1"))
    assert supervisor.main(str(path)) == 78
    assert "not UTF-8 text" in capsys.readouterr().err
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30m", 1800),
        ("1h30m", 5400),
        ("1h 30m", 5400),
        ("2d4h", 187200),
        ("1m5s", 65),
        ("250ms", 0.25),
        ("1.5h", 5400),
    ],
)
def test_durations_may_be_compound(text: str, seconds: float) -> None:
    assert parse_duration(text).total_seconds() == seconds


@pytest.mark.parametrize("text", ["", "30", "h", "1h-30m", "m30", "1x"])
def test_what_is_not_a_duration_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="1h30m"):
        parse_duration(text)


def test_a_provider_without_a_key_is_refused_by_check_config_and_run_alike(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One validation: what check-config passes, run accepts; and a refused run writes no
    file (no state dir, database, lock or SSH key)."""
    (tmp_path / "creds").mkdir()  # as under systemd, without the key among the credentials
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "creds"))
    state = tmp_path / "state"
    path = tmp_path / "c.toml"
    path.write_text(f'[daemon]\nstate_dir = "{state}"\n[providers.vast]\nenabled = true\n')
    code, _, err = check([str(path)], capsys)
    assert code == 78 and "providers.vast.api_key: required" in err
    code, out, _ = check(["--json", str(path)], capsys)
    assert code == 78
    assert json.loads(out) == {
        "valid": False,
        "problems": [
            {
                "setting": "providers.vast.api_key",
                "reason": "required when providers.vast.enabled is true (set it or put it "
                "in the credential file vast_api_key)",
                "from": "the configuration",
            }
        ],
    }
    with pytest.raises(SystemExit) as exc:
        main(["run", "--config", str(path)])
    assert exc.value.code == 78
    assert "providers.vast.api_key" in capsys.readouterr().err
    assert not state.exists()


def test_outside_systemd_a_key_in_a_credential_store_counts(tmp_path: Path) -> None:
    """check-config run by an operator: the key is in /etc/credstore for LoadCredential=."""
    settings = config.Settings(
        daemon={"state_dir": str(tmp_path)}, providers={"vast": {"enabled": True}}
    )
    with pytest.raises(config.ConfigError):
        config.check_startable(settings)
    with pytest.raises(config.ConfigError):
        config.check_startable(settings, credstores=[tmp_path / "no-such-store"])
    (tmp_path / "vast_api_key").write_text("vk")
    config.check_startable(settings, credstores=[tmp_path / "no-such-store", tmp_path])
