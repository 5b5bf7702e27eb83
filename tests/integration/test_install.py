"""deploy/install.sh in --root mode: what it lays down, that a second run changes nothing and
never overwrites the config, the modes of the credentials, and what --uninstall [--purge]
keeps and removes. Offline and fast: --no-venv skips the pip step, except in one slow test
that runs it (a venv created under --root, the wheel installed there, its `check-config` run).

Every command that would touch the live system (systemctl, systemd-sysusers, useradd,
systemd-creds, chown) is shadowed on PATH by a recorder: in --root mode none may run.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from gpuwarden.config import settings as config

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "install.sh"
LIVE_COMMANDS = (
    "systemctl",
    "systemd-sysusers",
    "systemd-tmpfiles",
    "systemd-creds",
    "useradd",
    "groupadd",
    "userdel",
    "chown",
)
VAST_KEY = "vast-test-key-0123456789\n"
LAMBDA_KEY = "secret_lambda_test_key\n"
SSH_KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAAtestkey\n-----END OPENSSH PRIVATE KEY-----\n"


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """PATH with recorders for the live-system commands first."""
    shims = tmp_path / "shims"
    shims.mkdir()
    log = tmp_path / "live-calls.log"
    for name in LIVE_COMMANDS:
        shim = shims / name
        shim.write_text(f'#!/bin/sh\necho "{name} $*" >> "{log}"\nexit 0\n')
        shim.chmod(0o755)
    return {**os.environ, "PATH": f"{shims}:{os.environ['PATH']}", "LIVE_LOG": str(log)}


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name, text in (("vast", VAST_KEY), ("lambda", LAMBDA_KEY), ("ssh", SSH_KEY)):
        p = tmp_path / f"{name}.key"
        p.write_text(text)
        out[name] = p
    return out


@pytest.fixture(autouse=True)
def _clean_config_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # config.load reads GPUWARDEN_* and CREDENTIALS_DIRECTORY; the test's shell must not leak in.
    for name in list(os.environ):
        if name.startswith("GPUWARDEN_") or name == "CREDENTIALS_DIRECTORY":
            monkeypatch.delenv(name)


def install(
    root: Path, env: dict[str, str], *args: str | Path, ok: bool = True, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["bash", str(SCRIPT), "--root", str(root), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    if ok:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def live_calls(env: dict[str, str]) -> str:
    log = Path(env["LIVE_LOG"])
    return log.read_text() if log.exists() else ""


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def snapshot(root: Path) -> dict[str, tuple[int, bytes | str]]:
    """Every path under root with its mode and content (or link target)."""
    out: dict[str, tuple[int, bytes | str]] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = (mode(p), os.readlink(p))
        elif p.is_file():
            out[rel] = (mode(p), p.read_bytes())
        else:
            out[rel] = (mode(p), "dir")
    return out


def test_install_lays_down_a_working_tree(
    tmp_path: Path, env: dict[str, str], keys: dict[str, Path]
) -> None:
    root = tmp_path / "root"
    result = install(
        root, env, "--no-venv", "--vast-key-file", keys["vast"], "--ssh-key-file", keys["ssh"]
    )

    assert live_calls(env) == ""  # --root: nothing ran against the real system ...
    for cmd in ("systemd-sysusers", "systemctl daemon-reload", "systemctl enable"):
        assert f"would run: {cmd}" in result.stdout  # ... it said what it would run instead

    unit = root / "etc/systemd/system/gpuwarden.service"
    assert unit.read_text() == (ROOT / "systemd/gpuwarden.service").read_text()
    assert mode(unit) == 0o644
    sysusers = root / "etc/sysusers.d/gpuwarden.conf"
    assert sysusers.read_text() == (ROOT / "systemd/gpuwarden.sysusers").read_text()
    assert (root / "etc/tmpfiles.d/gpuwarden.conf").is_file()

    # Credentials: plain (no systemd-creds in --root mode), root-only.
    for store in ("etc/credstore", "etc/credstore.encrypted"):
        assert mode(root / store) == 0o700
    assert (root / "etc/credstore/vast_api_key").read_text() == VAST_KEY
    assert (root / "etc/credstore/ssh_private_key").read_text() == SSH_KEY
    assert not (root / "etc/credstore/lambda_api_key").exists()
    for name in ("vast_api_key", "ssh_private_key"):
        assert mode(root / "etc/credstore" / name) == 0o600
    dropin = root / "etc/systemd/system/gpuwarden.service.d/10-credentials.conf"
    lines = dropin.read_text().splitlines()
    assert lines[lines.index("[Service]") :] == [
        "[Service]",
        "LoadCredential=",
        *(f"LoadCredential={name}" for name in config.CREDENTIALS),
    ]

    assert mode(root / "var/lib/gpuwarden") == 0o750
    link = root / "usr/local/bin/gpuwarden"
    assert os.readlink(link) == "/opt/gpuwarden/venv/bin/gpuwarden"
    assert not (root / "opt/gpuwarden/venv").exists()  # --no-venv
    assert "--no-venv" in result.stdout


def test_installed_config_is_the_example_with_production_paths(
    tmp_path: Path, env: dict[str, str], keys: dict[str, Path]
) -> None:
    root = tmp_path / "root"
    install(root, env, "--no-venv", "--vast-key-file", keys["vast"])
    conf = root / "etc/gpuwarden/config.toml"
    assert mode(conf) == 0o640
    installed = config.load(conf)
    assert installed.daemon.state_dir == Path("/var/lib/gpuwarden")
    assert installed.daemon.socket == Path("/run/gpuwarden/control.sock")
    assert not installed.providers.sim.enabled
    assert installed.providers.vast.enabled  # its key was installed
    # Nothing else differs from the example.
    example = config.load(ROOT / "config.example.toml").model_dump(mode="json", by_alias=True)
    ours = installed.model_dump(mode="json", by_alias=True)
    changed = {
        f"{section}.{key}"
        for section, values in ours.items()
        for key in values
        if values[key] != example[section][key]
    }
    assert changed <= {"daemon.state_dir", "daemon.socket", "providers.sim", "providers.vast"}


def test_second_run_is_idempotent_and_never_overwrites_the_config(
    tmp_path: Path, env: dict[str, str], keys: dict[str, Path]
) -> None:
    root = tmp_path / "root"
    install(root, env, "--no-venv", "--vast-key-file", keys["vast"])
    conf = root / "etc/gpuwarden/config.toml"
    edited = conf.read_text() + "\n# edited by the operator\n"
    conf.write_text(edited)

    before = snapshot(root)
    result = install(root, env, "--no-venv")
    assert snapshot(root) == before
    assert "kept /etc/gpuwarden/config.toml" in result.stdout
    assert "installed" not in result.stdout  # nothing was copied again

    # A later run adds a key: the config is still the operator's, the new key is 0600.
    install(root, env, "--no-venv", "--lambda-key-file", keys["lambda"])
    assert conf.read_text() == edited
    assert (root / "etc/credstore/lambda_api_key").read_text() == LAMBDA_KEY
    assert mode(root / "etc/credstore/lambda_api_key") == 0o600
    assert (root / "etc/credstore/vast_api_key").read_text() == VAST_KEY
    assert live_calls(env) == ""


def test_uninstall_keeps_config_and_state_then_purge_removes_them(
    tmp_path: Path, env: dict[str, str], keys: dict[str, Path]
) -> None:
    root = tmp_path / "root"
    install(root, env, "--no-venv", "--vast-key-file", keys["vast"])
    # What a real install and a running daemon would have left.
    venv_python = root / "opt/gpuwarden/venv/bin/python"
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text("")
    db = root / "var/lib/gpuwarden/gpuwarden.db"
    db.write_text("state")
    other_cred = root / "etc/credstore/other_service_key"
    other_cred.write_text("not ours")

    result = install(root, env, "--uninstall")
    assert "would run: systemctl disable --now gpuwarden.service" in result.stdout
    assert not (root / "etc/systemd/system/gpuwarden.service").exists()
    assert not (root / "etc/systemd/system/gpuwarden.service.d").exists()
    assert not (root / "opt/gpuwarden").exists()
    assert not (root / "usr/local/bin/gpuwarden").is_symlink()
    assert (root / "etc/gpuwarden/config.toml").is_file()
    assert db.read_text() == "state"
    assert (root / "etc/credstore/vast_api_key").is_file()

    install(root, env, "--uninstall", "--purge")
    assert not (root / "etc/gpuwarden").exists()
    assert not (root / "var/lib/gpuwarden").exists()
    assert not (root / "etc/credstore/vast_api_key").exists()
    assert other_cred.read_text() == "not ours"  # the credstore is shared: only ours go
    assert not (root / "etc/sysusers.d/gpuwarden.conf").exists()
    assert live_calls(env) == ""


def test_bad_invocations_fail_clearly(tmp_path: Path, env: dict[str, str]) -> None:
    root = tmp_path / "root"
    help_ = install(root, env, "--help")
    assert "--uninstall" in help_.stdout and "--root DIR" in help_.stdout

    cases: list[tuple[list[str | Path], str]] = [
        (["--bogus"], "unknown option '--bogus'"),
        (["--purge"], "--purge only goes with --uninstall"),
        (["--no-venv", "--vast-key-file", tmp_path / "missing"], "cannot read"),
        (["--vast-key-file"], "--vast-key-file needs a value"),
    ]
    for args, message in cases:
        result = install(root, env, *args, ok=False)
        assert result.returncode != 0, args
        assert message in result.stderr, (args, result.stderr)
    assert not (root / "etc/gpuwarden").exists()  # refused before laying anything down


def test_venv_step(tmp_path: Path, env: dict[str, str]) -> None:
    """The venv step needs PyPI, so it is checked by inspection and by its refusal path: a
    wheel that does not exist stops the install before a venv is made."""
    root = tmp_path / "root"
    result = install(root, env, "--wheel", tmp_path / "nope.whl", ok=False)
    assert result.returncode != 0
    assert "no such wheel or source tree" in result.stderr
    assert not (root / "opt/gpuwarden/venv").exists()

    text = SCRIPT.read_text()
    assert "VENV=$OPT/venv" in text and "OPT=/opt/gpuwarden" in text
    assert '"$PYTHON" -m venv "$ROOT$VENV"' in text
    assert '"$py" -m pip install --quiet --upgrade "$STAGE"' in text  # a copy of the source
    assert '"$py" -m pip install --quiet --upgrade "$target"' in text  # or the --wheel
    assert '"$target/daemon"' in text  # the instance files ride in the package (test_wheel)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_installed_unit_and_credentials_dropin_verify(
    tmp_path: Path, env: dict[str, str], keys: dict[str, Path]
) -> None:
    """The unit plus the drop-in install.sh wrote load without a warning (ExecStart is pointed
    at this interpreter: see test_systemd_unit.unit_for_verify)."""
    root = tmp_path / "root"
    install(root, env, "--no-venv", "--vast-key-file", keys["vast"])
    check = tmp_path / "check"
    check.mkdir()
    installed = root / "etc/systemd/system"
    text = (installed / "gpuwarden.service").read_text()
    assert "/opt/gpuwarden/venv/bin/python" in text
    unit = check / "gpuwarden.service"
    unit.write_text(text.replace("/opt/gpuwarden/venv/bin/python", sys.executable))
    shutil.copytree(installed / "gpuwarden.service.d", check / "gpuwarden.service.d")
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0
    assert result.stdout + result.stderr == ""


@pytest.mark.slow
def test_install_with_the_venv_step_installs_the_wheel_and_its_gpuwarden_runs(
    tmp_path: Path, env: dict[str, str], keys: dict[str, Path], wheel: Path
) -> None:
    """The venv step on: install.sh creates the venv under --root and installs the wheel into
    it; then that install's own `gpuwarden check-config` accepts the installed config.
    Offline: pip gets no index and installs the wheel alone (PIP_NO_INDEX, PIP_NO_DEPS); its
    dependencies come from this venv through PYTHONPATH (ahead of site-packages on sys.path,
    but the checkout's editable finder is a .pth hook, which PYTHONPATH entries do not run:
    the `gpuwarden.__file__` check below proves the installed copy is the one imported)."""
    root = tmp_path / "root"
    offline = {**env, "PIP_NO_INDEX": "1", "PIP_NO_DEPS": "1"}
    python = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin") or sys.executable
    result = install(
        root,
        offline,
        "--python",
        python,
        "--wheel",
        wheel,
        "--vast-key-file",
        keys["vast"],
        timeout=300,
    )
    venv = root / "opt/gpuwarden/venv"
    assert "created venv /opt/gpuwarden/venv" in result.stdout
    installed = venv / "bin" / "gpuwarden"
    assert installed.is_file()
    [site] = venv.glob("lib/python3*/site-packages")
    assert (site / "gpuwarden" / "remote" / "assets" / "probe.sh").is_file()
    deps = [p for p in sys.path if p.endswith("site-packages")]
    run_env = {
        **{k: v for k, v in env.items() if not k.startswith("PYTHON")},
        "PYTHONPATH": os.pathsep.join(deps),
        # What systemd's LoadCredential= hands the service: the installed key files.
        "CREDENTIALS_DIRECTORY": str(root / "etc/credstore"),
    }
    checked = subprocess.run(
        [str(installed), "check-config", str(root / "etc/gpuwarden/config.toml")],
        capture_output=True,
        text=True,
        env=run_env,
        cwd=tmp_path,  # not the checkout
        timeout=60,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import gpuwarden; print(gpuwarden.__file__)"],
        capture_output=True,
        text=True,
        env=run_env,
        cwd=tmp_path,
        timeout=60,
        check=True,
    )
    assert Path(where.stdout.strip()).is_relative_to(site)  # the installed copy ran
    assert live_calls(env) == ""
