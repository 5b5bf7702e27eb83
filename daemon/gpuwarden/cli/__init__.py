"""The `gpuwarden` command. Each group of subcommands lives in its own module and registers
itself here; `main` only parses and dispatches.

Exit codes: 0 ok, 1 a domain error, 2 usage, 69 daemon unreachable (EX_UNAVAILABLE),
75 `launch --wait` timed out with the instance still booting (EX_TEMPFAIL), 78 bad
configuration (EX_CONFIG); `gpuwarden ssh`, once it runs ssh, exits as ssh does.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gpuwarden import __version__


def build_parser() -> argparse.ArgumentParser:
    # Imported here so that `gpuwarden --help` stays fast and the modules stay independent.
    from gpuwarden.cli import (
        commands_control,
        commands_daemon,
        commands_dashboard,
        commands_docs,
        commands_jobs,
        commands_sim,
        commands_ssh,
    )

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
    modules = (
        commands_daemon,
        commands_sim,
        commands_control,
        commands_ssh,
        commands_jobs,
        commands_dashboard,
        commands_docs,
    )
    for module in modules:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # parse_args would blame the top level and print its usage; the subcommand's usage
        # is the one that lists the flags the user meant.
        _subparser(parser, args.command).error(f"unrecognized arguments: {' '.join(extra)}")
    code: int = args.func(args)
    sys.exit(code)


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:  # argparse keeps its subparsers only here
        if isinstance(action, argparse._SubParsersAction):
            found: argparse.ArgumentParser = action.choices[name]
            return found
    return parser
