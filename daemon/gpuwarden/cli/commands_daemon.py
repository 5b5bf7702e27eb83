"""`gpuwarden run` and `gpuwarden check-config`."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("run", help="run the daemon in the foreground")
    p.add_argument(
        "--config", help="config file (default: $GPUWARDEN_CONFIG or /etc/gpuwarden/config.toml)"
    )
    p.set_defaults(func=_todo)


def _todo(args: argparse.Namespace) -> int:
    raise SystemExit("not yet")
