"""Documentation built from the parser itself, so it cannot drift from the command:
`gpuwarden completion SHELL` (shtab: a completion script for bash, zsh or tcsh) and
`gpuwarden man` (argparse-manpage: the gpuwarden(1) manual page in roff).

    gpuwarden completion bash | sudo tee /usr/share/bash-completion/completions/gpuwarden
    gpuwarden man | sudo tee /usr/local/share/man/man1/gpuwarden.1 && man gpuwarden
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

SHELLS = ("bash", "zsh", "tcsh")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "completion",
        help="print a shell completion script (bash, zsh or tcsh)",
        description="Print a completion script for SHELL, generated from the parser.",
        epilog="bash: gpuwarden completion bash > ~/.local/share/bash-completion/completions/"
        "gpuwarden (or source it from ~/.bashrc); zsh: gpuwarden completion zsh > "
        "~/.zfunc/_gpuwarden with ~/.zfunc in $fpath.",
    )
    p.add_argument("shell", choices=SHELLS, help="the shell")
    p.set_defaults(func=_completion)

    p = sub.add_parser(
        "man",
        help="print the gpuwarden(1) manual page (roff)",
        description="Print the manual page, generated from the parser, in roff.",
        epilog="gpuwarden man > gpuwarden.1 && man ./gpuwarden.1",
    )
    p.set_defaults(func=_man)


def _root() -> argparse.ArgumentParser:
    from gpuwarden.cli import build_parser

    return build_parser()


def _completion(args: argparse.Namespace) -> int:
    import shtab

    sys.stdout.write(shtab.complete(_root(), shell=args.shell))
    return 0


def man_page() -> str:
    """The manual page, in roff."""
    from argparse_manpage.manpage import Manpage

    from gpuwarden import __version__

    data = {
        "project_name": "gpuwarden",
        "version": __version__,
        "manual_title": "gpuwarden manual",
        "manual_section": "1",
        "url": "see README.md in the source",
    }
    return str(Manpage(_root(), _data=data, format="single-commands-section"))


def _man(args: argparse.Namespace) -> int:
    sys.stdout.write(man_page())
    return 0
