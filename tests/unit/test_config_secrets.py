"""A secret never reaches check-config output or a log line, whichever way it came in
(file, environment, credentials directory) and however it is logged."""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from pydantic import SecretStr

from gpuwarden.cli import main
from gpuwarden.config import settings as config
from gpuwarden.core.clock import FakeClock
from gpuwarden.system import logs as glog

FILE_KEY = "lambda-secret-in-the-config-file-0001"
ENV_KEY = "vast-secret-from-the-environment-0002"
CRED_KEY = "sim-secret-from-credentials-0003"  # via the env var, as credentials cover vast/lambda
PEM_LINE = "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW"
PEM = f"-----BEGIN OPENSSH PRIVATE KEY-----\n{PEM_LINE}\n-----END OPENSSH PRIVATE KEY-----\n"
SECRETS = (FILE_KEY, ENV_KEY, CRED_KEY, PEM_LINE)


@pytest.fixture
def secret_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    for name in list(os.environ):
        if name.startswith("GPUWARDEN_") or name == "CREDENTIALS_DIRECTORY":
            monkeypatch.delenv(name)
    path = tmp_path / "c.toml"
    path.write_text(f'[providers.lambda]\napi_key = "{FILE_KEY}"\n')
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "ssh_private_key").write_text(PEM)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    monkeypatch.setenv("GPUWARDEN_PROVIDERS__VAST__API_KEY", ENV_KEY)
    monkeypatch.setenv("GPUWARDEN_PROVIDERS__SIM__API_KEY", CRED_KEY)
    glog.clear_secrets()
    yield path
    glog.clear_secrets()


@pytest.mark.parametrize("fmt", [[], ["--json"]], ids=["toml", "json"])
def test_check_config_never_prints_a_secret(
    secret_config: Path, fmt: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["check-config", *fmt, str(secret_config)])
    out, err = capsys.readouterr()
    assert exc.value.code == 0
    assert out.count(glog.MASK) >= 4  # the four secrets are there, masked
    for secret in SECRETS:
        assert secret not in out + err


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    glog.configure(mode="json", stream=stream, clock=FakeClock(), level="debug")
    yield stream
    structlog.reset_defaults()
    glog.clear_secrets()


def test_no_log_line_carries_a_secret(secret_config: Path, json_log: io.StringIO) -> None:
    settings = config.load(secret_config)
    glog.register_secrets_from(settings)
    log = structlog.get_logger("test")
    vast_key = settings.providers.vast.api_key
    assert vast_key is not None
    log.info("settings_loaded", settings=settings)  # the whole object
    log.info("dump", data=settings.model_dump())  # SecretStr objects inside a dict
    log.info("key_value", api_key=ENV_KEY, token=CRED_KEY, password="hunter2-longer")
    log.info("secretstr", value=vast_key)
    log.info(f"message with {FILE_KEY} inside")
    log.warning("request", headers={"Authorization": f"Bearer {ENV_KEY}", "Accept": "json"})
    log.warning("header_text", line=f"Authorization: Bearer {CRED_KEY}")
    log.warning("pem_line", detail=f"bad key line {PEM_LINE}")
    log.info("nested", outer={"inner": [{"private_key": PEM}, FILE_KEY]})
    try:
        raise RuntimeError(f"provider said: invalid key {ENV_KEY}")
    except RuntimeError:
        log.exception("call_failed")
    logging.getLogger("asyncssh").warning("stdlib record with %s", CRED_KEY)
    out = json_log.getvalue()
    assert out.count("\n") == 11
    for secret in (*SECRETS, "hunter2-longer"):
        assert secret not in out
    assert glog.MASK in out


def test_unregistered_bearer_token_and_authorization_are_masked(json_log: io.StringIO) -> None:
    log = structlog.get_logger("test")
    log.info("http", header="authorization: Basic dXNlcjpwYXNzd29yZA==")
    log.info("http", text="sent Bearer abcdefghijklmnop to the API")
    log.info("http", secret=SecretStr("plain-secretstr-value"))
    out = json_log.getvalue()
    assert "dXNlcjpwYXNzd29yZA" not in out
    assert "abcdefghijklmnop" not in out
    assert "plain-secretstr-value" not in out
    assert out.count(glog.MASK) == 3


def test_harmless_values_pass_through(json_log: io.StringIO) -> None:
    log = structlog.get_logger("test")
    log.info("instance_terminated", instance_id="i-123", reason="idle", cost=0.42, api_key=None)
    out = json_log.getvalue()
    assert '"instance_id": "i-123"' in out
    assert '"cost": 0.42' in out
    assert '"api_key": null' in out  # an unset key is not a secret, and says so
