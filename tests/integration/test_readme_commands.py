"""Every command README.md shows, run against the sim: a standalone `gpuwarden sim` (started by
the README's own command) and a daemon that uses it (providers.sim.base_url).

The commands are read from the README's fenced blocks: every line of an `sh` block, and every
`$ ` line of the others. Each one either runs (in bash, with the sample ids, the sim's port and
the socket path replaced by the real ones, HOME in a temporary directory) and must end with
the exit code the README gives it, or is in SKIPPED with the reason it cannot run here. Both
tables are compared with the README exactly, so a new command cannot be left out silently.
"""

# ruff: noqa: E501 - the README's commands are quoted whole, as it shows them

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cli_support import EXAMPLE, ROOT, Daemon, gw, gw_json
from tests.conftest import LoopThread, short_tmp, unavailable

pytestmark = pytest.mark.slow

README = ROOT / "README.md"
SHELL_BLOCKS = ("sh", "bash", "shell")
SAMPLE_IDS = re.compile(r"\b(de38ba3c|3f9a2c1b)\b")

DEMO = "started by tests/integration/test_supervisor_demo.py"
ROOT_ONLY = (
    "needs root and a systemd host; deploy/install.sh is tested under --root in test_install.py"
)
SYSTEMD = "needs the systemd service (test_systemd_unit.py checks the unit)"
JOURNAL = "needs journald; test_journald_recipes.py checks the recipes' fields"
MAKE = "a make target of this checkout: running it here would rerun or remove the test setup"

SKIPPED: dict[str, str] = {
    "make demo": DEMO,
    "make test": MAKE,
    'make fast # pytest -m "not slow": every test that spawns no daemon or SSH server, under a minute': MAKE,
    "make test # make lint, then the whole suite with coverage, failing under the coverage floor": MAKE,
    "make lint # ruff check, ruff format --check, mypy --strict, lint-imports (the layer contract)": MAKE,
    "make demo # the daemon end to end on config.example.toml against the simulated cloud": DEMO,
    "make bench # tests/bench: the guard's deadline-to-destroy lag with 1,000 instances (p99 < 1 s),": MAKE,
    "make run # the daemon in the foreground on $GPUWARDEN_CONFIG or config.example.toml": (
        "runs a daemon in the foreground on this checkout's state; the CLI's search for its "
        "socket is tested in tests/unit/test_cli_everyday.py"
    ),
    "make clean # remove .venv and caches": MAKE,
    "make chaos # tests/chaos at full size: 50 SIGKILLs of a real daemon against the sim behind a": (
        "minutes of SIGKILLs; make test runs the bounded chaos run (tests/chaos) itself"
    ),
    "GPUWARDEN_POLICY__IDLE_TIMEOUT=10m": "an environment variable, shown as the form to write",
    "GPUWARDEN_PROVIDERS__SIM__ENABLED=false": "an environment variable, shown as the form to write",
    "GPUWARDEN_PROVIDERS__VAST__API_KEY=... # secrets work too": "an environment variable form",
    "GPUWARDEN_DAEMON__ALLOWED_UIDS='[1000, 1001]' # lists as JSON": "an environment variable form",
    "sudo gpuwarden reap --config /etc/gpuwarden/config.toml": ROOT_ONLY,
    "sudo deploy/install.sh --vast-key-file ~/vast.key --ssh-key-file ~/.ssh/gpuwarden_ed25519": ROOT_ONLY,
    'sudo usermod -aG gpuwarden "$USER" # operators use the control socket through this group': ROOT_ONLY,
    "sudo systemctl start gpuwarden # READY once the reconciler's first pass is done": SYSTEMD,
    "sudo systemctl stop gpuwarden # drains for daemon.shutdown_timeout; instances keep running": SYSTEMD,
    "sudo systemctl reload gpuwarden # SIGHUP: re-read /etc/gpuwarden/config.toml": SYSTEMD,
    "sudo systemctl restart gpuwarden": SYSTEMD,
    "systemctl status gpuwarden # the STATUS line names the loops and providers": SYSTEMD,
    "gpuwarden check-config /etc/gpuwarden/config.toml # before a reload: exit 0 valid, 78 not": (
        "needs an installed /etc/gpuwarden/config.toml (check-config itself runs above on bad.toml)"
    ),
    "journalctl -u gpuwarden -n 5 EVENT=config_reloaded EVENT=config_reload_refused": JOURNAL,
    "journalctl -u gpuwarden -f": JOURNAL,
    "journalctl -u gpuwarden INSTANCE_ID=3f9a2c1b": JOURNAL,
    "journalctl -u gpuwarden JOB_ID=j5d41402abc": JOURNAL,
    "journalctl -u gpuwarden EVENT=instance_terminated EVENT=instance_vanished": JOURNAL,
    'journalctl -u gpuwarden --since "7 days ago" REASON=watchdog': JOURNAL,
    "journalctl -u gpuwarden PROVIDER=vast --since today": JOURNAL,
    "journalctl -u gpuwarden -p err --since yesterday": JOURNAL,
    "journalctl -u gpuwarden -o json --since today": JOURNAL,
    "journalctl -u gpuwarden --since today -o cat | grep -A 40 'Fatal Python error'": JOURNAL,
    "git pull": "changes the checkout",
    "sudo deploy/install.sh # new package into the venv, new unit; restarts the daemon": ROOT_ONLY,
    "diff config.example.toml /etc/gpuwarden/config.toml # new settings have defaults; add any you want": (
        "needs an installed /etc/gpuwarden/config.toml"
    ),
    "sudo -u gpuwarden sqlite3 /var/lib/gpuwarden/gpuwarden.db \\ "
    "\"VACUUM INTO '/var/lib/gpuwarden/backup-$(date +%F).db'\"": ROOT_ONLY,
    "sudo mv /var/lib/gpuwarden/backup-*.db /backup/": ROOT_ONLY,
    "sudo deploy/install.sh --no-venv --vast-key-file new-vast.key # writes the credential (encrypted if it was)": ROOT_ONLY,
    "sudo systemd-run --pipe --wait --uid=gpuwarden --gid=gpuwarden \\ "
    "-p LoadCredential=vast_api_key -p LoadCredential=lambda_api_key \\ "
    "/opt/gpuwarden/venv/bin/gpuwarden reap --config /etc/gpuwarden/config.toml --yes": ROOT_ONLY,
    "sudo systemctl stop gpuwarden": SYSTEMD,
    "sudo deploy/install.sh --no-venv --hf-token-file ~/hf.token # stores the credential hf_token, restarts": ROOT_ONLY,
}

# Commands whose documented outcome is not exit 0, and the code the README gives them.
EXIT_CODES: dict[str, int] = {
    "gpuwarden check-config bad.toml": 78,
    "gpuwarden launch --gpu 4090 --hours 2": 1,  # no terminal here: refused without --yes
    "gpuwarden extend de38ba3c 20": 1,  # past the lease maximum
    "gpuwarden destroy-all": 1,  # no terminal here: refused without --yes
}

# Commands that run until Ctrl-C: started, given a moment, then interrupted (exit 0).
UNTIL_CTRL_C = ("gpuwarden events --follow", "gpuwarden sim --port")

# Tools a command needs beyond gpuwarden and bash (CI installs them: .ci/run).
TOOLS = ("curl", "jq", "socat", "man", "ssh")

# The sample config whose refusal the README shows.
BAD_TOML = '[policy]\nidle_timeout = "soon"\nhard_cap = "4h"\n'


@dataclass(frozen=True)
class Shown:
    command: str  # as the README has it, whitespace squeezed, continuation lines joined
    block: str  # the fence's language


def readme_commands(text: str) -> list[Shown]:
    found: list[Shown] = []
    for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M):
        lines = body.replace("\\\n", "\\ ").splitlines()
        for line in lines:
            stripped = line.strip()
            if lang in SHELL_BLOCKS:
                if stripped and not stripped.startswith("#"):
                    found.append(Shown(" ".join(stripped.split()), lang))
            elif lang in ("", "console") and stripped.startswith("$ "):
                found.append(Shown(" ".join(stripped[2:].split()), lang))
    return found


COMMANDS = readme_commands(README.read_text())
TO_RUN = [c.command for c in COMMANDS if c.command not in SKIPPED]


def test_the_readme_commands_are_all_accounted_for() -> None:
    shown = [c.command for c in COMMANDS]
    assert len(shown) > 60  # the parser found the blocks
    stale = sorted(set(SKIPPED) - set(shown))
    assert stale == [], f"SKIPPED names commands the README no longer shows: {stale}"
    assert sorted(set(EXIT_CODES) - set(TO_RUN)) == []
    # Every gpuwarden command the README shows runs, except those needing root or /etc.
    skipped_gw = sorted(c for c in SKIPPED if c.startswith("gpuwarden "))
    assert skipped_gw == [
        "gpuwarden check-config /etc/gpuwarden/config.toml # before a reload: exit 0 valid, 78 not"
    ]


# --- the rig: the README's sim, a daemon on it -------------------------------------------


@dataclass
class Rig:
    daemon: Daemon
    port: int
    work: Path
    env: dict[str, str]

    @property
    def faults_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/_sim/faults"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


SIM_COMMAND = next(c for c in TO_RUN if c.startswith("gpuwarden sim --port"))


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    with short_tmp() as base, LoopThread() as loop:
        port = free_port()
        work = base / "work"
        home = base / "home"
        for d in (work, home / ".ssh", home / ".local/share/bash-completion/completions"):
            d.mkdir(parents=True)
        (work / "bad.toml").write_text(BAD_TOML)
        bin_dir = str(Path(sys.executable).parent)
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("GPUWARDEN_")},
            "PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "HOME": str(home),
            "TMPDIR": str(base),  # the sim's sandbox (kept after it exits) goes here
            "NO_COLOR": "1",
            "MANPAGER": "cat",
            "PAGER": "cat",
        }
        sim = subprocess.Popen(
            ["bash", "-c", substitute(SIM_COMMAND, port, None, None)],
            env=env,
            cwd=work,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert sim.stdout is not None
        first = sim.stdout.readline()
        assert first.startswith("vast:"), first
        daemon = Daemon(base, loop)
        daemon.env["GPUWARDEN_PROVIDERS__SIM__BASE_URL"] = f"http://127.0.0.1:{port}"
        daemon.env["GPUWARDEN_DASHBOARD__LISTEN"] = f"127.0.0.1:{free_port()}"
        # What `gpuwarden dashboard` reads (the daemon's config, not its socket).
        same = ("GPUWARDEN_DAEMON__STATE_DIR", "GPUWARDEN_DASHBOARD__LISTEN")
        env |= {"GPUWARDEN_CONFIG": str(EXAMPLE)} | {k: daemon.env[k] for k in same}
        try:
            daemon.start()
            yield Rig(daemon, port, work, {**env, "GPUWARDEN_SOCKET": str(daemon.socket)})
        finally:
            daemon.stop()
            sim.send_signal(signal.SIGINT)
            try:
                sim.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                sim.kill()
                sim.communicate()


def substitute(command: str, port: int, live: dict[str, str] | None, socket: str | None) -> str:
    text = command.replace("8700", str(port))
    if live is not None:
        text = SAMPLE_IDS.sub(live["id"], text).replace("<id>", live["provider_id"])
    if socket is not None:
        text = text.replace("/run/gpuwarden/control.sock", socket)
    return text


def live_instance(rig: Rig) -> dict[str, str]:
    """A live instance whose SSH has answered (launched when there is none)."""
    rows = [r for r in gw_json(rig.daemon, "status") if r.get("ssh_ready")]
    if not rows:
        code, _, err = gw(
            rig.daemon, "launch", "--gpu", "4090", "--hours", "1", "--yes", "--wait", "--json"
        )
        assert code == 0, err
        rows = [r for r in gw_json(rig.daemon, "status") if r.get("ssh_ready")]
    return {"id": rows[0]["id"], "provider_id": rows[0]["provider_id"]}


def reset_faults(rig: Rig) -> None:
    """The knobs back to none after a README example set one (the next command is not its
    subject), and the credit back."""
    calm = {
        "latency": "0s",
        "rate_5xx": 0,
        "rate_429": 0,
        "create_error_exists": 0,
        "list_lag": "0s",
        "destroy_noop": 0,
        "end_on_zero_credit": False,
        "credit": 100,
    }
    httpx.post(rig.faults_url, json=calm, timeout=10).raise_for_status()
    gw(rig.daemon, "resume")


@pytest.mark.parametrize("command", TO_RUN)
def test_a_readme_command_runs_as_documented(rig: Rig, command: str) -> None:
    if command == SIM_COMMAND:
        return  # it is the rig's sim, running since the fixture started it
    for tool in TOOLS:
        if re.search(rf"(^|[|&;] *){tool}\b", command) and shutil.which(tool) is None:
            unavailable(f"{tool} is not installed here (.ci/run installs it in CI)")
    needs_live = (
        bool(SAMPLE_IDS.search(command))
        or "<id>" in command
        or command in ("gpuwarden destroy-all",)
    )
    live = live_instance(rig) if needs_live else None
    text = substitute(command, rig.port, live, str(rig.daemon.socket))
    expected = EXIT_CODES.get(command, 0)
    if command.startswith(UNTIL_CTRL_C):
        proc = subprocess.Popen(
            ["bash", "-c", f"exec {text}"],
            env=rig.env,
            cwd=rig.work,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        first = proc.stdout.readline() if ready else ""  # it is following: its backlog is out
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        out, code = first + out, proc.returncode
        assert first, f"{text} printed nothing within 30 s: {err}"
    else:
        done = subprocess.run(
            ["bash", "-o", "pipefail", "-c", text],
            env=rig.env,
            cwd=rig.work,
            capture_output=True,
            text=True,
            timeout=180,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        code, out, err = done.returncode, done.stdout, done.stderr
    if "_sim/faults -d" in command:
        reset_faults(rig)
    assert code == expected, f"{text}\nexit {code}\n--- stdout\n{out}\n--- stderr\n{err}"
    assert "Traceback" not in err, err
