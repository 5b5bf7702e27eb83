"""The CLI's own start-up cost: the socket is found without building Settings, and a `status`
written to a pipe imports none of the heavy libraries (pydantic, httpx, rich, structlog...)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import daemon_env

from gpuwarden.cli import client as client_mod
from gpuwarden.config import paths
from gpuwarden.config import settings as config

# (file text or None for no file, environment) -> daemon.socket, both ways
CASES: list[tuple[str | None, dict[str, str]]] = [
    (None, {}),
    ("", {}),
    ("[policy]\nidle_timeout = '10m'\n", {}),
    ('[daemon]\nsocket = "/srv/gw/control.sock"\n', {}),
    ('[daemon]\nsocket = "run/c.sock"\n', {}),  # relative: against the file's directory
    ('[daemon]\nsocket = "~/gw.sock"\n', {}),
    ('[daemon]\nsocket = "/srv/a.sock"\n', {"GPUWARDEN_DAEMON__SOCKET": "/srv/env.sock"}),
    ('[daemon]\nsocket = "/srv/a.sock"\n', {"GPUWARDEN_DAEMON__SOCKET": "rel/env.sock"}),
    ("", {"gpuwarden_daemon__socket": "/srv/lower.sock"}),  # names match in any case
    ("", {"GPUWARDEN_DAEMON__STATE_DIR": "/srv/state"}),  # another key: the default
]


@pytest.mark.parametrize(("text", "env"), CASES)
def test_the_light_socket_read_agrees_with_settings(
    text: str | None, env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in [k for k in os.environ if k.upper().startswith("GPUWARDEN_")]:
        monkeypatch.delenv(var)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    conf = tmp_path / "etc" / "gw.toml"
    conf.parent.mkdir()
    if text is not None:
        conf.write_text(text)
    full = config.load(conf, require_file=False).daemon.socket
    light = paths.light_socket(conf, dict(os.environ))
    assert light == full


@pytest.mark.parametrize(
    ("text", "env"),
    [
        ("[daemon]\nsocket = 5\n", {}),  # not a string: Settings is the judge
        ("[daemon\n", {}),  # not TOML
        ("daemon = 3\n", {}),
        ("", {"GPUWARDEN_DAEMON": '{"socket": "/srv/j.sock"}'}),  # the section as JSON
    ],
)
def test_what_the_light_read_cannot_say_goes_to_settings(
    text: str, env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "gw.toml"
    conf.write_text(text)
    assert paths.light_socket(conf, env) is None
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    # Through the client: the full load decides, and a broken file is passed over.
    expected: Any
    try:
        expected = config.load(conf).daemon.socket
    except config.ConfigError:
        expected = paths.DEFAULT_SOCKET
    monkeypatch.delenv("GPUWARDEN_SOCKET", raising=False)
    assert client_mod.resolve_socket(None, conf) == expected


HEAVY = ("pydantic", "pydantic_settings", "httpx", "rich", "structlog", "asyncssh", "aiosqlite")
PROBE = """
import sys
from gpuwarden.cli import main
try:
    main(sys.argv[2:])
finally:
    with open(sys.argv[1], "w") as f:
        f.write("\\n".join(sorted(sys.modules)))
"""


async def _serve_status(sock: Path, reply: dict[str, Any]) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            req = json.loads(line)
            answer = {"jsonrpc": "2.0", "id": req["id"], "result": reply}
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        writer.close()

    return await asyncio.start_unix_server(handle, str(sock))


STATUS = {
    "now": "2026-01-01T12:00:00Z",
    "count": 1,
    "instances": [
        {
            "id": "ab12cd34",
            "provider": "vast",
            "gpu": "RTX 4090",
            "state": "running",
            "price_per_hour": 0.4,
            "uptime_s": 600,
            "lease_until": "2026-01-01T14:00:00Z",
            "time_left_s": 600,
            "deadline_reason": "idle",
            "last_probe_at": "2026-01-01T11:59:00Z",
            "last_probe_ok": True,
            "ssh": "root@10.0.0.1:22",
            "cost_now": 0.07,
            "est_total": 0.8,
        }
    ],
}


@pytest.mark.parametrize("json_mode", [False, True])
async def test_status_to_a_pipe_imports_no_heavy_library(
    short_dir: Path, tmp_path: Path, json_mode: bool
) -> None:
    """Also with rows left out of the page: the line that says so goes to stderr, plainly."""
    sock = short_dir / "c.sock"
    server = await _serve_status(sock, {**STATUS, "count": 10_000, "shown": 1})
    listed = tmp_path / "modules.txt"
    async with server:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            PROBE,
            str(listed),
            "status",
            *(["--json"] if json_mode else []),
            "--socket",
            str(sock),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=daemon_env(),
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert "ab12cd34" in out.decode()
    assert json_mode or "TOTAL" in out.decode()
    assert "of 10,000" in (err if json_mode else out + err).decode()
    modules = set(listed.read_text().split())
    assert "gpuwarden.cli.output" in modules  # the probe saw the command run
    loaded = sorted(m for m in modules if m.split(".")[0] in HEAVY)
    assert loaded == []


EXTRAS_PROBE = """
import sys
import gpuwarden.system.logs, gpuwarden.providers.http, structlog.dev
extras = ("rich", "click", "pygments", "greenlet")
skipped = sorted(m for m in sys.modules if m.split(".")[0] in extras)
import rich.text
print(skipped, structlog.dev.rich is None, rich.text.Text("x").plain)
"""


def test_structlog_and_httpx_are_imported_without_their_optional_extras() -> None:
    """gpuwarden/__init__.py: the daemon's loggers and HTTP clients come without rich,
    click, pygments and greenlet (structlog's and httpx's optional extras), and rich is
    still there for whoever imports it afterwards (the CLI's tables)."""
    done = subprocess.run(
        [sys.executable, "-c", EXTRAS_PROBE],
        capture_output=True,
        text=True,
        env=daemon_env(),
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[]", "True", "x"]
