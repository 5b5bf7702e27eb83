"""Where the config file and the control socket are, and the environment's names for them:
the one place both settings.py and the CLI take them from.

Kept free of pydantic so that a CLI command can find the socket without building the whole
Settings (importing pydantic-settings and validating every section cost about 0.3 s of each
`gpuwarden status`). `light_socket` reads daemon.socket the way Settings does: the file's
value (a relative path against the file's directory), overridden by the environment; for
anything it cannot read as plainly, it answers None and the caller builds Settings, so that
an odd case is judged by the one full schema.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path

ENV_PREFIX = "GPUWARDEN_"
ENV_NESTED = "__"  # between levels: GPUWARDEN_DAEMON__SOCKET
CONFIG_ENV = ENV_PREFIX + "CONFIG"  # the config file, when --config is not given
SOCKET_ENV = ENV_PREFIX + "SOCKET"  # the CLI's socket, before any config
DEFAULT_CONFIG_PATH = Path("/etc/gpuwarden/config.toml")
DEFAULT_SOCKET = Path("/run/gpuwarden/control.sock")


def resolve_path(explicit: str | os.PathLike[str] | None) -> Path:
    """The config file: the one named, else $GPUWARDEN_CONFIG, else /etc/gpuwarden/."""
    if explicit:
        return Path(explicit)
    env = os.environ.get(CONFIG_ENV)
    return Path(env) if env else DEFAULT_CONFIG_PATH


def light_socket(config_path: Path, env: Mapping[str, str]) -> Path | None:
    """daemon.socket as `settings.load(config_path, require_file=False)` would give it in
    this environment, or None when only the full Settings can say: a file that is not
    plain TOML, a value that is not a string, the daemon section given whole in the
    environment as JSON."""
    # pydantic-settings matches variable names without regard to case.
    names = {k.upper(): v for k, v in env.items() if k.upper().startswith(ENV_PREFIX)}
    if ENV_PREFIX + "DAEMON" in names:
        return None
    value: object = names.get(ENV_PREFIX + "DAEMON" + ENV_NESTED + "SOCKET")
    base = None  # the environment wins; a relative path there is the cwd's
    if value is None:
        value, base = _file_socket(config_path), config_path.parent.absolute()
    if value is None or value is DEFAULT_SOCKET:
        return value
    if not isinstance(value, str) or not value:
        return None
    path = Path(value)
    if base is None:
        return path
    path = path.expanduser()
    return path if path.is_absolute() else base / path


def _file_socket(config_path: Path) -> object:
    """The file's daemon.socket as written, DEFAULT_SOCKET when it gives none, or None when
    the file cannot be read as TOML."""
    if not config_path.exists():
        return DEFAULT_SOCKET
    try:
        data = tomllib.loads(config_path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    daemon = data.get("daemon", {})
    if not isinstance(daemon, dict):
        return None
    return DEFAULT_SOCKET if daemon.get("socket") is None else daemon["socket"]
