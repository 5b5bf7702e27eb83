"""The systemd unit: it verifies cleanly, it is hardened (exposure at most 2.0), it agrees with
the daemon's settings, and the libraries the daemon runs work under MemoryDenyWriteExecute=.

`systemd-analyze verify` and `security --offline=yes` read unit files without a running
systemd, so these run in CI containers too; they are skipped only where systemd-analyze is
not installed.
"""

from __future__ import annotations

import grp
import os
import shutil
import socket
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gpuwarden.config.settings import CREDENTIALS, DaemonSettings

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "gpuwarden.service"
VENV_PYTHON = "/opt/gpuwarden/venv/bin/python"
MAX_EXPOSURE = 2.0

ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze is not installed (apt-get install systemd)"
)


def unit_for_verify(dest_dir: Path, unit_text: str | None = None) -> Path:
    """A copy of the unit whose ExecStart interpreter exists on this machine.

    `systemd-analyze verify` checks that ExecStart's binary exists and is executable, and the
    real unit names /opt/gpuwarden/venv/bin/python, which only install.sh creates. So the copy
    points at the interpreter running this test; every other line is the shipped unit's.
    (`verify --root=DIR` is no help: it resolves every path, /bin/kill and the default
    dependencies such as sysinit.target included, inside DIR.)
    """
    text = UNIT.read_text() if unit_text is None else unit_text
    assert VENV_PYTHON in text
    path = dest_dir / "gpuwarden.service"
    path.write_text(text.replace(VENV_PYTHON, sys.executable))
    return path


def verify(unit: Path) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run(
        [ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Section -> key -> every value, in order (unit files repeat keys)."""
    out: dict[str, dict[str, list[str]]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            out.setdefault(section, {})
            continue
        key, _, value = line.partition("=")
        out[section].setdefault(key.strip(), []).append(value.strip())
    return out


@needs_analyze
def test_unit_passes_systemd_analyze_verify_silently(tmp_path: Path) -> None:
    result = verify(unit_for_verify(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""


@needs_analyze
def test_verify_would_catch_a_mistake(tmp_path: Path) -> None:
    """The silent verify above means something: a typo in the unit is reported."""
    broken = UNIT.read_text().replace("NoNewPrivileges=yes", "NoNewPrivileges=yes\nProtectSytem=1")
    result = verify(unit_for_verify(tmp_path, broken))
    assert "ProtectSytem" in result.stdout + result.stderr


@needs_analyze
def test_unit_with_encrypted_credentials_dropin_verifies(tmp_path: Path) -> None:
    """install.sh writes gpuwarden.service.d/10-credentials.conf; both variants must load."""
    unit = unit_for_verify(tmp_path)
    dropin = tmp_path / "gpuwarden.service.d" / "10-credentials.conf"
    dropin.parent.mkdir()
    lines = ["[Service]", "LoadCredential="]
    lines += [f"LoadCredentialEncrypted={name}" for name in CREDENTIALS]
    dropin.write_text("\n".join(lines) + "\n")
    result = verify(unit)
    assert result.stdout + result.stderr == ""


@needs_analyze
def test_unit_exposure_is_at_most_two(tmp_path: Path) -> None:
    assert ANALYZE is not None
    unit = unit_for_verify(tmp_path)
    result = subprocess.run(
        [ANALYZE, "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    lines = [ln for ln in result.stdout.splitlines() if "Overall exposure level" in ln]
    assert lines, result.stdout + result.stderr
    # "→ Overall exposure level for gpuwarden.service: 1.2 OK 🙂"
    score = float(lines[0].split(":", 1)[1].split()[0])
    assert score <= MAX_EXPOSURE, result.stdout


def test_unit_settings_match_the_design() -> None:
    unit = parse_unit(UNIT.read_text())
    svc = unit["Service"]
    assert unit["Unit"]["StartLimitIntervalSec"] == ["0"]
    one = {k: v[-1] for k, v in svc.items()}
    assert one["Type"] == "notify"
    assert one["NotifyAccess"] == "main"
    assert one["WatchdogSec"] == "30s"
    assert one["Restart"] == "always"
    assert one["RestartSec"] == "5s"
    assert one["ExecStart"] == (
        f"{VENV_PYTHON} -X faulthandler -m gpuwarden run --config /etc/gpuwarden/config.toml"
    )
    assert one["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert one["User"] == one["Group"] == "gpuwarden"
    assert "DynamicUser" not in svc
    assert one["UMask"] == "0077"
    assert one["RuntimeDirectoryMode"] == "0750"
    assert one["MemoryDenyWriteExecute"] == "yes"
    assert one["CapabilityBoundingSet"] == ""
    assert svc["SystemCallFilter"] == ["@system-service", "~@privileged @resources"]
    assert one["SystemCallErrorNumber"] == "EPERM"
    assert "IPAddressDeny" not in svc  # the daemon calls provider APIs anywhere


def test_unit_environment_matches_the_directories_and_config_defaults() -> None:
    """StateDirectory=/RuntimeDirectory= are where systemd lets the daemon write, so the unit
    pins the config to them; they are also the config's own defaults."""
    svc = parse_unit(UNIT.read_text())["Service"]
    env = dict(e.split("=", 1) for e in svc["Environment"])
    # %S is /var/lib and %t is /run for system services.
    state = env["GPUWARDEN_DAEMON__STATE_DIR"].replace("%S", "/var/lib")
    sock = env["GPUWARDEN_DAEMON__SOCKET"].replace("%t", "/run")
    assert state == f"/var/lib/{svc['StateDirectory'][0]}" == str(DaemonSettings().state_dir)
    assert sock.startswith(f"/run/{svc['RuntimeDirectory'][0]}/")
    assert sock == str(DaemonSettings().socket)
    assert env["GPUWARDEN_DAEMON__SOCKET_GROUP"] == svc["Group"][0]


def test_unit_loads_every_credential_the_config_reads() -> None:
    svc = parse_unit(UNIT.read_text())["Service"]
    assert sorted(svc["LoadCredential"]) == sorted(CREDENTIALS)


def test_sysusers_snippet_creates_the_units_user() -> None:
    text = (ROOT / "systemd" / "gpuwarden.sysusers").read_text()
    entries = [ln.split() for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert ["g", "gpuwarden", "-"] in entries
    user = next(e for e in entries if e[0] == "u")
    assert user[1] == "gpuwarden"
    assert user[2] == "-:gpuwarden"  # primary group: the socket is born group gpuwarden


_MDWE_PROBE = textwrap.dedent(
    """
    import asyncio, ctypes, mmap, sys
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
        sys.exit(77)
    try:
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except OSError:
        pass
    else:
        sys.exit("MDWE is not in force: a W+X mapping was allowed")

    import aiosqlite, asyncssh, httpx, pydantic, structlog, uvloop

    async def main():
        host_key = asyncssh.generate_private_key("ssh-ed25519")
        client_key = asyncssh.generate_private_key("ssh-ed25519")

        class Server(asyncssh.SSHServer):
            def begin_auth(self, username):
                return False

        def answer(process):
            process.stdout.write("pong\\n")
            process.exit(0)

        server = await asyncssh.listen(
            "127.0.0.1", 0, server_host_keys=[host_key], server_factory=Server,
            process_factory=answer,
        )
        port = server.sockets[0].getsockname()[1]
        async with asyncssh.connect(
            "127.0.0.1", port, known_hosts=None, client_keys=[client_key], username="probe"
        ) as conn:
            result = await conn.run("ping")
        server.close()
        async with aiosqlite.connect(":memory:") as db:
            await db.execute("create table t (x)")
        pydantic.TypeAdapter(int).validate_python("5")
        print(result.stdout.strip())

    uvloop.run(main())
    """
)


def test_daemon_libraries_run_under_memory_deny_write_execute() -> None:
    """MemoryDenyWriteExecute= forbids writable+executable memory; cffi callbacks and JITs
    need it. No systemd runs here, so the probe uses the kernel's own equivalent,
    prctl(PR_SET_MDWE) (Linux 6.3+), then runs what the daemon runs: uvloop, an asyncssh
    round trip with ed25519 keys (cryptography), aiosqlite and pydantic-core."""
    result = subprocess.run(
        [sys.executable, "-c", _MDWE_PROBE],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode == 77:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux < 6.3)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "pong"


_DAEMON_UNDER_MDWE = (
    "import ctypes, runpy, sys\n"
    "if ctypes.CDLL(None).prctl(65, 1, 0, 0, 0) != 0: sys.exit(77)\n"
    "sys.argv = ['gpuwarden', 'run', '--config', sys.argv[1]]\n"
    "runpy.run_module('gpuwarden', run_name='__main__')\n"
)


@pytest.mark.slow
def test_daemon_starts_as_the_unit_runs_it(tmp_path: Path) -> None:
    """`python -X faulthandler -m gpuwarden run` with the unit's UMask=0077, its environment
    (state dir, socket, socket group) and MemoryDenyWriteExecute (as PR_SET_MDWE), running
    the example config's in-process sim cloud: READY=1 arrives over $NOTIFY_SOCKET, the
    control socket is 0660 despite the umask, the database 0600, and SIGTERM stops it with 0."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(30)
    group = grp.getgrgid(os.getgid()).gr_name
    env = {
        **os.environ,
        "NOTIFY_SOCKET": str(tmp_path / "notify"),
        "WATCHDOG_USEC": "30000000",
        "GPUWARDEN_DAEMON__STATE_DIR": str(tmp_path / "state"),
        "GPUWARDEN_DAEMON__SOCKET": str(tmp_path / "run" / "control.sock"),
        "GPUWARDEN_DAEMON__SOCKET_GROUP": group,
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    (tmp_path / "run").mkdir(mode=0o750)
    log = (tmp_path / "daemon.log").open("w")
    daemon = subprocess.Popen(
        [sys.executable, "-X", "faulthandler", "-c", _DAEMON_UNDER_MDWE,
         str(ROOT / "config.example.toml")],
        env=env, stdout=log, stderr=subprocess.STDOUT, umask=0o077,
    )  # fmt: skip
    try:
        messages = ""
        while "READY=1" not in messages:
            try:
                messages += notify.recv(4096).decode()
            except TimeoutError:
                break
            if daemon.poll() is not None:
                break
        if daemon.poll() == 77:
            pytest.skip("this kernel has no PR_SET_MDWE (Linux < 6.3)")
        assert "READY=1" in messages, (tmp_path / "daemon.log").read_text()
        sock = tmp_path / "run" / "control.sock"
        assert stat.S_IMODE(sock.stat().st_mode) == 0o660
        assert stat.S_IMODE((tmp_path / "state" / "gpuwarden.db").stat().st_mode) == 0o600
    finally:
        daemon.terminate()
        code = daemon.wait(30)
        log.close()
        notify.close()
    assert code == 0, (tmp_path / "daemon.log").read_text()
