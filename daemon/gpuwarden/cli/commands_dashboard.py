"""`gpuwarden dashboard`: the URL of the daemon's dashboard, with its access token."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from gpuwarden.cli.commands_daemon import CONFIG_HELP
from gpuwarden.cli.output import EX_DOMAIN


def register(sub: Any) -> None:
    cmd: argparse.ArgumentParser = sub.add_parser(
        "dashboard",
        help="print the dashboard's URL with its access token",
        description=(
            "Print the URL of the local dashboard (dashboard.listen) with the token the daemon "
            "wrote to its state directory. Opening it once sets a session cookie and drops the "
            "token from the address bar. The token is a password: it lets whoever holds it "
            "extend and destroy instances."
        ),
        epilog=(
            "exit codes: 0 printed, 1 no token yet (the daemon has not served the dashboard) "
            "or it cannot be read, 78 invalid config or the dashboard is off"
        ),
    )
    cmd.add_argument("--config", metavar="PATH", help=CONFIG_HELP)
    cmd.add_argument("--json", action="store_true", help="print JSON: url, listen, token_file")
    cmd.set_defaults(func=_dashboard)


def dashboard_url(listen: str, token: str) -> str:
    from urllib.parse import quote

    from gpuwarden.config.web import split_listen

    host, port = split_listen(listen)
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/?token={quote(token)}"


def _dashboard(args: argparse.Namespace) -> int:
    from gpuwarden.config import paths
    from gpuwarden.config import settings as config
    from gpuwarden.web.auth import read_token, token_path

    try:
        settings = config.load(paths.resolve_path(args.config))
    except config.ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return config.EX_CONFIG
    listen = settings.dashboard.listen
    if not listen:
        print(
            "gpuwarden: the dashboard is off; set dashboard.listen (such as "
            '"127.0.0.1:8092") and restart the daemon',
            file=sys.stderr,
        )
        return config.EX_CONFIG
    if listen.endswith(":0"):
        print(
            "gpuwarden: dashboard.listen has port 0 (any free port); the daemon's log line "
            "dashboard_listening has the port it got",
            file=sys.stderr,
        )
        return config.EX_CONFIG
    path = token_path(settings.daemon.state_dir)
    try:
        token = read_token(path)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        print(
            f"gpuwarden: cannot read the dashboard token {path}: {reason} (has the daemon "
            "started with dashboard.listen set? are you in its socket group?)",
            file=sys.stderr,
        )
        return EX_DOMAIN
    url = dashboard_url(listen, token)
    if args.json:
        print(json.dumps({"url": url, "listen": listen, "token_file": str(path)}))
    else:
        print(url)
    return 0
