"""The sim's instances as machines: SSH exec and SFTP in the sandbox, the environment,
onstart/user_data, open-session reporting, instance-scoped keys, and cleanup on destroy."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import asyncssh
import httpx
import pytest
from sim_support import KEY, new_key, running_sim, urls
from tests.conftest import eventually

from gpuwarden.sim import SimCloud
from gpuwarden.sim.procs import instance_pids

pytestmark = pytest.mark.slow


async def _vast_instance(
    cloud: SimCloud, http: httpx.AsyncClient, pub: str, **body: Any
) -> dict[str, Any]:
    base, auth = urls(cloud).vast, {"Authorization": f"Bearer {KEY}"}
    await http.post(f"{base}/api/v0/ssh/", json={"ssh_key": pub}, headers=auth)
    offers = (await http.post(f"{base}/api/v0/bundles/", json={"limit": 1})).json()["offers"]
    made = await http.put(
        f"{base}/api/v0/asks/{offers[0]['id']}/",
        json={"image": "img", "label": "ssh-test", **body},
        headers=auth,
    )
    made.raise_for_status()
    iid = made.json()["new_contract"]

    async def running() -> dict[str, Any] | None:
        r = await http.get(f"{base}/api/v0/instances/{iid}/", headers=auth)
        inst: dict[str, Any] = r.json()["instances"]
        return inst if inst["actual_status"] == "running" else None

    inst: dict[str, Any] = await eventually(running)
    inst["instance_api_key"] = made.json()["instance_api_key"]
    return inst


def _connect(port: int, key: asyncssh.SSHKey, user: str = "root") -> Any:
    return asyncssh.connect(
        "127.0.0.1", port, username=user, client_keys=[key], known_hosts=None, connect_timeout=5
    )


async def test_exec_environment_sftp_and_onstart(tmp_path: Path) -> None:
    async with running_sim(tmp_path) as cloud, httpx.AsyncClient() as http:
        key, pub = new_key()
        inst = await _vast_instance(
            cloud, http, pub, onstart="echo booted; echo $CONTAINER_ID", env={"JOB": "7"}
        )
        iid, port = str(inst["id"]), inst["ssh_port"]
        sandbox = cloud.core.find(iid).sandbox  # type: ignore[union-attr]
        async with _connect(port, key) as conn:
            r = await conn.run(
                "echo $PWD $HOME; echo $GPUWARDEN_SIM_INSTANCE $CONTAINER_ID $JOB; "
                "echo $GPUWARDEN_SIM_API; echo oops >&2; exit 3"
            )
            lines = str(r.stdout).splitlines()
            assert lines[0] == f"{sandbox} {sandbox}"
            assert lines[1] == f"{iid} {iid} 7"
            assert lines[2] == urls(cloud).vast
            assert r.stderr == "oops\n" and r.exit_status == 3
            r = await conn.run("echo $CONTAINER_API_KEY")
            assert str(r.stdout).strip() == inst["instance_api_key"]
            r = await conn.run("cat", input="through stdin\n")
            assert r.stdout == "through stdin\n"

            async with conn.start_sftp_client() as sftp:
                await sftp.makedirs(".gpuwarden/jobs/j1", exist_ok=True)
                async with sftp.open(".gpuwarden/jobs/j1/spec.json", "w") as f:
                    await f.write('{"prompt": "a cat"}')
                assert await sftp.realpath(".") == "/"
            assert (sandbox / ".gpuwarden/jobs/j1/spec.json").read_text() == '{"prompt": "a cat"}'
            r = await conn.run("cat ~/.gpuwarden/jobs/j1/spec.json")
            assert r.stdout == '{"prompt": "a cat"}'

        log = sandbox / ".gpuwarden-sim" / "onstart.log"

        async def onstart_done() -> bool:
            return log.exists() and log.read_text() == f"booted\n{iid}\n"

        await eventually(onstart_done)


async def test_a_key_that_was_not_registered_is_refused(tmp_path: Path) -> None:
    async with running_sim(tmp_path) as cloud, httpx.AsyncClient() as http:
        _, pub = new_key()
        other, _ = new_key()
        inst = await _vast_instance(cloud, http, pub)
        with pytest.raises(asyncssh.PermissionDenied):
            async with _connect(inst["ssh_port"], other):
                pass


async def test_open_sessions_are_reported(tmp_path: Path) -> None:
    async with running_sim(tmp_path) as cloud, httpx.AsyncClient() as http:
        key, pub = new_key()
        inst = await _vast_instance(cloud, http, pub)
        iid = str(inst["id"])
        sessions_file = cloud.core.find(iid).sandbox / ".gpuwarden-sim" / "sessions"  # type: ignore[union-attr]
        assert cloud.sessions(iid) == 0 and sessions_file.read_text() == ""
        async with _connect(inst["ssh_port"], key, user="alice") as conn:
            shell = await conn.create_process(term_type="xterm")  # interactive: listed by who

            async def listed() -> bool:
                return "alice" in sessions_file.read_text()

            await eventually(listed)
            assert cloud.sessions(iid) == 1
            r = await conn.run("who")
            assert str(r.stdout).count("alice pts/") == 1  # the exec session is not a login
            admin = (await http.get(f"{urls(cloud).admin}/_sim/instances")).json()
            row = next(i for i in admin["instances"] if i["id"] == iid)
            assert row["sessions"] == 1 and row["interactive_sessions"] == 1
            shell.stdin.write("echo from-shell\nexit\n")
            assert await shell.stdout.read() == "from-shell\n"
            await shell.wait_closed()

        async def closed() -> bool:
            return cloud.sessions(iid) == 0 and sessions_file.read_text() == ""

        await eventually(closed)


async def test_destroy_kills_detached_processes_and_keeps_the_sandbox(tmp_path: Path) -> None:
    async with running_sim(tmp_path) as cloud, httpx.AsyncClient() as http:
        key, pub = new_key()
        inst = await _vast_instance(cloud, http, pub)
        iid = str(inst["id"])
        async with _connect(inst["ssh_port"], key) as conn:
            r = await conn.run("setsid nohup sleep 300 > runner.log 2>&1 < /dev/null & echo $!")
            runner = int(str(r.stdout).strip())

        async def started() -> bool:
            return runner in instance_pids(iid, cloud.core.token)

        await eventually(started)
        # The instance's own key may destroy only its own instance.
        base = urls(cloud).vast
        own = {"Authorization": f"Bearer {inst['instance_api_key']}"}
        other = await http.delete(f"{base}/api/v0/instances/{int(iid) + 1}/", headers=own)
        assert other.status_code == 403
        done = await http.delete(f"{base}/api/v0/instances/{iid}/", headers=own)
        assert done.json() == {"success": True}
        assert cloud.ledger()["instances"][0]["ended_by"] == "api:instance_key"

        async def killed() -> bool:
            try:
                os.kill(runner, 0)
            except ProcessLookupError:
                return True
            return Path(f"/proc/{runner}/status").read_text().find("State:\tZ") >= 0

        await eventually(killed)
        assert (cloud.core.find(iid).sandbox / "runner.log").exists()  # type: ignore[union-attr]
        with pytest.raises(OSError):
            async with _connect(inst["ssh_port"], key):
                pass


async def test_closing_the_session_hangs_up_its_command(tmp_path: Path) -> None:
    async with running_sim(tmp_path) as cloud, httpx.AsyncClient() as http:
        key, pub = new_key()
        inst = await _vast_instance(cloud, http, pub)
        iid = str(inst["id"])
        async with _connect(inst["ssh_port"], key) as conn:
            proc = await conn.create_process("sleep 300")

            async def running() -> bool:
                return len(instance_pids(iid, cloud.core.token)) >= 1

            await eventually(running)
            proc.close()

        async def gone() -> bool:
            return instance_pids(iid, cloud.core.token) == []

        await eventually(gone)


async def test_lambda_user_data_runs_at_boot(tmp_path: Path) -> None:
    async with running_sim(tmp_path) as cloud, httpx.AsyncClient() as http:
        key, pub = new_key()
        base, auth = urls(cloud).lambda_, (KEY, "")
        await http.post(f"{base}/ssh-keys", json={"name": "k", "public_key": pub}, auth=auth)
        made = await http.post(
            f"{base}/instance-operations/launch",
            json={
                "region_name": "us-east-1",
                "instance_type_name": "gpu_1x_a10",
                "ssh_key_names": ["k"],
                "user_data": "#!/bin/sh\necho user-data $GPUWARDEN_SIM_INSTANCE\n",
            },
            auth=auth,
        )
        iid = made.json()["data"]["instance_ids"][0]
        log = tmp_path / "sim" / f"lambda-{iid}" / ".gpuwarden-sim" / "onstart.log"

        async def ran() -> bool:
            return log.exists() and log.read_text() == f"user-data {iid}\n"

        await eventually(ran)
        data = (await http.get(f"{base}/instances/{iid}", auth=auth)).json()["data"]
        async with _connect(data["ssh_port"], key, user="ubuntu") as conn:
            assert (await conn.run("echo ok")).stdout == "ok\n"


async def test_a_download_is_capped_and_takes_only_regular_files(tmp_path: Path) -> None:
    """remote.download over real SFTP: a file over the cap is refused before any byte lands,
    a FIFO (which could stream for ever) and a directory are refused, a small file lands."""
    from gpuwarden.remote import ssh as remote

    async with running_sim(tmp_path) as cloud, httpx.AsyncClient() as http:
        key, pub = new_key()
        inst = await _vast_instance(cloud, http, pub)
        async with _connect(inst["ssh_port"], key) as conn:
            r = await conn.run(
                "head -c 5000 /dev/zero > big; printf ok > small; mkfifo pipe; mkdir d"
            )
            assert r.exit_status == 0
            local = tmp_path / "got" / "x"
            for name, why in (
                ("big", "5000 bytes, over 1000"),
                ("pipe", "not a regular"),
                ("d", "not a regular"),
            ):
                with pytest.raises(remote.DownloadRefused, match=why):
                    await remote.download(conn, name, local, max_bytes=1000)
                assert list(local.parent.iterdir()) == []
            await remote.download(conn, "small", local, max_bytes=1000)
            assert local.read_bytes() == b"ok"


async def test_a_written_file_is_for_the_login_user_only(tmp_path: Path) -> None:
    """remote.write_file over SFTP: the job spec, the Hugging Face token and authorized_keys
    are mode 0600 on the instance, whatever the server's umask would give."""
    from gpuwarden.remote import ssh as remote

    async with running_sim(tmp_path) as cloud, httpx.AsyncClient() as http:
        key, pub = new_key()
        inst = await _vast_instance(cloud, http, pub)
        sandbox = cloud.core.find(str(inst["id"])).sandbox  # type: ignore[union-attr]
        async with _connect(inst["ssh_port"], key) as conn:
            await remote.write_file(conn, ".gpuwarden/jobs/j1/hf_token", b"hf_secret")
        written = sandbox / ".gpuwarden/jobs/j1/hf_token"
        assert written.read_bytes() == b"hf_secret"
        assert written.stat().st_mode & 0o777 == 0o600
