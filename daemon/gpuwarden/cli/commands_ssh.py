"""Logging in to an instance: `gpuwarden ssh ID [-- CMD...]` and `gpuwarden ssh-config`.

The daemon says where (user, host, port), which host key it pinned at its first connection
(kept in `<state_dir>/known_hosts`, which it writes) and which key it logs in with; `ssh`
then replaces this process with the system `ssh`, given an argument list (never a shell
string), checking the host key strictly against that file. The daemon's key is used when this
user may read it; otherwise ssh offers the user's own keys (put on instances with
`ssh.authorized_keys`). Exit codes: those of `ssh` once it runs; before that see output.py.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from gpuwarden.cli.client import ControlClient
from gpuwarden.cli.commands_control import ID_HELP
from gpuwarden.cli.output import EX_DOMAIN, EX_OK, Out, command, run_command


def register(sub: Any) -> None:
    p = command(
        sub,
        "ssh",
        "log in to an instance with the system ssh (host key pinned by the daemon)",
        _ssh,
        epilog="Once ssh runs, its exit code is the command's.",
    )
    p.add_argument("id", metavar="ID", help=ID_HELP)
    p.add_argument(
        "remote",
        metavar="CMD",
        nargs="*",
        help="a command to run there instead of a login shell; put it after -- when it "
        "has options of its own (gpuwarden ssh ID -- ls -l)",
    )
    p.add_argument(
        "--print",
        dest="print_only",
        action="store_true",
        help="print the ssh command line instead of running it",
    )

    command(
        sub,
        "ssh-config",
        "print Host blocks for ~/.ssh/config, one per instance whose SSH has answered",
        _ssh_config,
    )


def ssh_argv(info: Mapping[str, Any], remote: Sequence[str] = ()) -> list[str]:
    """The system ssh's arguments for the instance `info` describes (the daemon's `ssh` reply):
    its port and user, the daemon's known_hosts file with strict checking, and the daemon's
    key when this user may read it."""
    argv = [
        "ssh",
        "-p",
        str(info["port"]),
        "-o",
        f"UserKnownHostsFile={info['known_hosts']}",
        "-o",
        "StrictHostKeyChecking=yes",
    ]
    identity = info.get("identity_file")
    if identity and os.access(identity, os.R_OK):
        argv += ["-i", str(identity)]
    argv.append(f"{info['user']}@{info['host']}")
    if remote:
        argv += ["--", *remote]
    return argv


def _refusal(info: Mapping[str, Any]) -> tuple[str, str] | None:
    """Why `gpuwarden ssh` cannot log in yet, and what to do, or None."""
    if not info.get("ssh_ready"):
        return (
            f"instance {info.get('id')} has not answered SSH yet (it is booting)",
            "'gpuwarden launch --wait' waits for it; 'gpuwarden status' shows it as "
            "running once it answers",
        )
    known = str(info.get("known_hosts"))
    if not os.access(known, os.R_OK):
        return (
            f"cannot read the daemon's known_hosts file {known}",
            "run as a member of the daemon's group (usermod -aG gpuwarden $USER), or as root",
        )
    return None


def _ssh(args: argparse.Namespace) -> int:
    remote = list(args.remote)

    async def body(client: ControlClient, out: Out) -> int:
        info = await client.call("ssh", {"id": args.id})
        problem = _refusal(info)
        if problem is not None:
            out.error(problem[0])
            out.hint(problem[1])
            return EX_DOMAIN
        argv = ssh_argv(info, remote)
        if args.print_only or out.json_mode:
            if out.json_mode:
                out.json({**info, "argv": argv})
            else:
                out.print(shlex.join(argv))
            return EX_OK
        program = shutil.which("ssh")
        if program is None:
            out.error("no ssh client found on PATH")
            out.hint("install OpenSSH's client (apt-get install openssh-client)")
            return EX_DOMAIN
        await client.aclose()
        sys.stdout.flush()
        sys.stderr.flush()
        # An argument list: nothing here passes through a local shell.
        os.execv(program, argv)  # noqa: S606
        return EX_DOMAIN  # not reached: execv does not return

    return run_command(args, body)


def host_block(info: Mapping[str, Any], known_hosts: str, identity: str | None) -> str:
    """One `Host` block for ~/.ssh/config, named by the instance's label."""
    lines = [
        f"# {info['id']} ({info['state']})",
        f"Host {info['label']}",
        f"    HostName {info['host']}",
        f"    Port {info['port']}",
        f"    User {info['user']}",
        f"    UserKnownHostsFile {known_hosts}",
        "    StrictHostKeyChecking yes",
    ]
    if identity and os.access(identity, os.R_OK):
        lines.append(f"    IdentityFile {identity}")
    return "\n".join(lines) + "\n"


def _ssh_config(args: argparse.Namespace) -> int:
    async def body(client: ControlClient, out: Out) -> int:
        r = await client.call("ssh.hosts")
        hosts = r.get("instances", [])
        if out.json_mode:
            out.json(r)
            return EX_OK
        blocks = [
            host_block(h, str(r.get("known_hosts")), r.get("identity_file"))
            for h in hosts
            if h.get("ssh_ready")
        ]
        waiting = [h["id"] for h in hosts if not h.get("ssh_ready")]
        out.print("\n".join(blocks) if blocks else "# No instance has answered SSH yet.")
        if waiting:
            out.print(f"# Not answered SSH yet (no host key to pin): {', '.join(waiting)}")
        return EX_OK

    return run_command(args, body)
