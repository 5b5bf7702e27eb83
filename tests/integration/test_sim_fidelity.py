"""Where the sim must answer as the real providers do, byte for byte: Vast's exact
`Content-Type: application/json` (official clients compare the header; no charset), and
Lambda's 400 with its error JSON for a launch whose region_name is not a string (not a 500).
And where the sim's SSH server would hide a fault: a detached start must not hold its
channel open (the job's started_at would lag its real start)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import asyncssh
import httpx
import pytest
from sim_support import KEY, new_key, running_sim, urls

from gpuwarden.core.clock import SystemClock
from gpuwarden.remote import ssh as remote
from gpuwarden.sim import sshhost

pytestmark = pytest.mark.slow


async def test_vast_answers_with_exactly_application_json(tmp_path: Path) -> None:
    async with running_sim(tmp_path) as cloud, httpx.AsyncClient() as http:
        base, auth = urls(cloud).vast, {"Authorization": f"Bearer {KEY}"}
        answers = [
            await http.post(f"{base}/api/v0/bundles/", json={"limit": 1}),
            await http.get(f"{base}/api/v1/instances/", headers=auth),
            await http.get(f"{base}/api/v0/instances/", headers=auth),
            await http.get(f"{base}/api/v0/users/current/", headers=auth),
            await http.get(f"{base}/api/v1/instances/"),  # 401, no key
            await http.get(f"{base}/api/v0/instances/999999/", headers=auth),
            await http.delete(f"{base}/api/v0/instances/999999/", headers=auth),
        ]
        for resp in answers:
            assert resp.headers["content-type"] == "application/json", (resp.url, resp.headers)
            resp.json()  # and the body is JSON
        assert {r.status_code for r in answers} >= {200, 401}


async def test_vast_faults_answer_with_exactly_application_json(tmp_path: Path) -> None:
    async with (
        running_sim(tmp_path, faults={"rate_429": 1.0}) as cloud,
        httpx.AsyncClient() as http,
    ):
        resp = await http.get(
            f"{urls(cloud).vast}/api/v1/instances/", headers={"Authorization": f"Bearer {KEY}"}
        )
        assert resp.status_code == 429
        assert resp.headers["content-type"] == "application/json"


@pytest.mark.parametrize("bad", [["us-east-1"], {"name": "us-east-1"}, 7, None])
async def test_lambda_launch_with_a_region_that_is_no_string_is_a_400(
    tmp_path: Path, bad: Any
) -> None:
    async with running_sim(tmp_path) as cloud, httpx.AsyncClient() as http:
        base, auth = urls(cloud).lambda_, {"Authorization": f"Bearer {KEY}"}
        _, pub = new_key()
        added = await http.post(
            f"{base}/ssh-keys", json={"name": "k", "public_key": pub}, headers=auth
        )
        assert added.status_code == 200, added.text
        for field in ("region_name", "instance_type_name"):
            body = {
                "region_name": "us-east-1",
                "instance_type_name": "gpu_1x_a10",
                "ssh_key_names": ["k"],
                field: bad,
            }
            resp = await http.post(f"{base}/instance-operations/launch", json=body, headers=auth)
            assert resp.status_code == 400, (field, resp.status_code, resp.text)
            error = resp.json()["error"]
            assert error["code"] == "global/invalid-parameters"
            assert field in error["message"]


async def test_a_detached_start_does_not_hold_the_ssh_channel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sim waits for a finished command's output for a while, as sshd waits for EOF on its
    pipes (for ever). Made longer than the start's own timeout here, a start whose detached
    job kept the channel's pipes would time out; the daemon's start must come back at once."""
    monkeypatch.setattr(sshhost, "_DRAIN_AFTER_EXIT", 60.0)
    key, pub = new_key()
    host = sshhost.SshHost(
        instance_id="i1",
        sandbox=tmp_path / "box",
        env={"PATH": "/usr/local/bin:/usr/bin:/bin"},
        host_key=asyncssh.generate_private_key("ssh-ed25519"),
        authorized=lambda: [pub],
        now=SystemClock().now,
    )
    port = await host.start()
    try:
        async with await remote.connect(
            remote.SshTarget("127.0.0.1", port), key, timeout=10.0
        ) as conn:
            # Not vacuous: a command that leaves a child on the channel's pipes is held.
            with pytest.raises(TimeoutError):
                await conn.run("sleep 30 &", timeout=3)
            await remote.start_detached(conn, "job", ["sleep", "30"], timeout=20)
            assert (await remote.job_status(conn, "job", timeout=10)).state == "running"
            await remote.kill(conn, "job/pid", timeout=10)
            assert (await remote.job_status(conn, "job", timeout=10)).state == "dead"
    finally:
        await host.stop()
