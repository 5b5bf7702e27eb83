"""How an operator reaches an instance: what `gpuwarden ssh` and `gpuwarden ssh-config` need
(user, host, port, the host key the daemon pinned, the known_hosts file it writes, the key
file it logs in with).

The CLI runs the system `ssh` itself; the daemon only says where and as whom, and whether the
instance's SSH has answered yet (its host key is known only then).
"""

from __future__ import annotations

from typing import Any

from gpuwarden.core import errors
from gpuwarden.core.model import Instance, InstanceState
from gpuwarden.fleet.app import App
from gpuwarden.remote import hostkeys
from gpuwarden.remote import ssh as remote


def _identity_file(app: App) -> str | None:
    """The daemon's key file, or None when the key comes as text (ssh.private_key)."""
    pem, path = remote.key_source(app.settings)
    return None if pem else str(path.absolute())


def _endpoint(inst: Instance) -> dict[str, Any]:
    return {
        "id": inst.id,
        "label": inst.label,
        "state": inst.state.value,
        "user": inst.ssh_user,
        "host": inst.ssh_host,
        "port": inst.ssh_port,
        "host_key": inst.extra.get("host_key"),
        "ssh_ready": inst.extra.get("host_key") is not None,
    }


async def ssh_info(app: App, inst: Instance) -> dict[str, Any]:
    """Where to log in to `inst`; refused (invalid_state) while it has no SSH address or is
    ending."""
    if inst.state not in (InstanceState.PROVISIONING, InstanceState.RUNNING):
        raise errors.InvalidState(
            f"instance {inst.id} is {inst.state.value}: there is nothing to log in to",
            id=inst.id,
            state=inst.state.value,
        )
    if not inst.ssh_host or not inst.ssh_port:
        raise errors.InvalidState(
            f"instance {inst.id} has no SSH address yet (it is {inst.state.value}); "
            "'gpuwarden launch --wait' or 'gpuwarden status' shows when it has",
            id=inst.id,
            state=inst.state.value,
        )
    return {**_endpoint(inst), **_files(app)}


async def ssh_hosts(app: App) -> dict[str, Any]:
    """Every live instance with an SSH address, for `gpuwarden ssh-config`."""
    live = await app.store.instances([InstanceState.PROVISIONING, InstanceState.RUNNING])
    hosts = [_endpoint(i) for i in live if i.ssh_host and i.ssh_port]
    return {"instances": hosts, **_files(app)}


def _files(app: App) -> dict[str, Any]:
    return {
        "known_hosts": str(hostkeys.known_hosts_path(app.settings).absolute()),
        "identity_file": _identity_file(app),
    }
