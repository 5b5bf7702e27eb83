"""Where the sim must answer as the real providers do, byte for byte: Vast's exact
`Content-Type: application/json` (official clients compare the header; no charset), and
Lambda's 400 with its error JSON for a launch whose region_name is not a string (not a 500)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from sim_support import KEY, new_key, running_sim, urls

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
