"""The `gpuwarden` command. Each group of subcommands lives in its own module and registers
itself here; `main` only parses and dispatches.

Exit codes: 0 ok, 1 a domain error, 2 usage, 69 daemon unreachable (EX_UNAVAILABLE),
78 bad configuration (EX_CONFIG).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gpuwarden import __version__


def build_parser() -> argparse.ArgumentParser:
    # Imported here so that `gpuwarden --help` stays fast and the modules stay independent.
    from gpuwarden.cli import commands_control, commands_daemon, commands_jobs, commands_sim

    parser = argparse.ArgumentParser(
        prog="gpuwarden",
        description=(
            "Rent cloud GPUs, run diffusion jobs on them, and make sure no rented GPU bills "
            "past its deadline."
        ),
        epilog="Run 'gpuwarden COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"gpuwarden {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (commands_daemon, commands_sim, commands_control, commands_jobs):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    code: int = args.func(args)
    sys.exit(code)
