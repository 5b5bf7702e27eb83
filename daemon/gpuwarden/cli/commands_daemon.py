"""`gpuwarden run` (the daemon in the foreground) and `gpuwarden check-config`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

CONFIG_HELP = (
    "config file (default: $GPUWARDEN_CONFIG, else /etc/gpuwarden/config.toml); "
    "GPUWARDEN_<SECTION>__<KEY> environment variables override it"
)


def register(sub: Any) -> None:
    run: argparse.ArgumentParser = sub.add_parser(
        "run",
        help="run the daemon in the foreground",
        description=(
            "Run the gpuwarden daemon in the foreground until SIGTERM or Ctrl-C. It validates "
            "the config, locks the state directory (one daemon per state dir), opens the "
            "database, starts its loops and tells systemd READY=1. SIGHUP reloads the config. "
            "Logs go to stdout: readable on a terminal, JSON lines in a pipe, native entries "
            "under journald."
        ),
        epilog=(
            "exit codes: 0 stopped cleanly, 1 start-up failed, 75 another daemon holds the "
            "state directory (or another process the database's write lock), 78 invalid "
            "config, 130 interrupted twice"
        ),
    )
    run.add_argument("--config", metavar="PATH", help=CONFIG_HELP)
    run.set_defaults(func=_run)

    check: argparse.ArgumentParser = sub.add_parser(
        "check-config",
        help="validate a config and print the effective settings",
        description=(
            "Load a config the way the daemon would (file, then environment overrides, then "
            "$CREDENTIALS_DIRECTORY) and print the effective settings with every secret "
            "shown as **********. Nothing is started."
        ),
        epilog=(
            "exit codes: 0 valid (gpuwarden run would accept it), 78 invalid (each bad "
            "setting named by its dotted path; with --json also as JSON on stdout)"
        ),
    )
    check.add_argument("path", nargs="?", metavar="PATH", help=CONFIG_HELP)
    check.add_argument("--json", action="store_true", help="print JSON instead of TOML")
    check.set_defaults(func=_check_config)


def _run(args: argparse.Namespace) -> int:
    from gpuwarden.lifecycle import supervisor

    return supervisor.main(args.config)


def _check_config(args: argparse.Namespace) -> int:
    from gpuwarden.config import paths
    from gpuwarden.config import settings as config
    from gpuwarden.system import logs as glog

    path = paths.resolve_path(args.path)
    # Outside systemd a key may wait in a credential store for LoadCredential= to pass on.
    stores = () if os.environ.get("CREDENTIALS_DIRECTORY") else config.SYSTEMD_CREDSTORES
    try:
        settings = config.load(path)
        config.check_startable(settings, credstores=stores)
    except config.ConfigError as exc:
        if args.json:  # the problems as data, for scripts; stderr keeps the readable form
            problems = [{"setting": f, "reason": r, "from": w} for f, r, w in exc.problems]
            print(json.dumps({"valid": False, "problems": problems}, indent=2))
        print(exc.render(), file=sys.stderr)
        return config.EX_CONFIG
    glog.register_secrets_from(settings)
    data = _scrubbed(config.redacted(settings))
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=False))
    else:
        print(f"# effective configuration: {path}, environment, credentials")
        print(to_toml(data), end="")
    return 0


def _scrubbed(value: Any) -> Any:
    """Belt and braces: a secret pasted into a non-secret setting is masked too."""
    from gpuwarden.system import logs as glog

    if isinstance(value, dict):
        return {k: _scrubbed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrubbed(v) for v in value]
    if isinstance(value, str):
        return glog.scrub(value)
    return value


def to_toml(data: dict[str, Any]) -> str:
    """Render nested JSON-able settings as TOML. Unset values (None) become comments, since
    TOML has no null."""
    lines: list[str] = []
    _emit_table(data, (), lines)
    return "\n".join(lines).lstrip("\n") + "\n"


def _emit_table(table: dict[str, Any], path: tuple[str, ...], lines: list[str]) -> None:
    scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in table.items() if isinstance(v, dict)}
    if path and scalars:
        lines += ["", f"[{'.'.join(path)}]"]
    for key, value in scalars.items():
        if value is None:
            lines.append(f"# {key} = (unset)")
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    for key, value in tables.items():
        _emit_table(value, (*path, key), lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)  # a JSON string is a TOML basic string
