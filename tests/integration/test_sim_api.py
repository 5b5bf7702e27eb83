"""The sim's responses validate against the official OpenAPI specs (copies in
tests/fixtures/providers/), for every endpoint and documented status it serves.

Documented exceptions, patched into the loaded Vast spec (the files stay verbatim copies):
1. v0 show-instance `Instance.ports` is typed as a list of ints; the real API (v1 spec, CLI,
   dstack) returns a Docker-style dict `{"22/tcp": [{"HostIp", "HostPort"}]}`. We use the v1
   list endpoint's `ports` schema.
2. v0 `Instance.extra_env` is typed as a list of strings; the real API returns [key, value]
   pairs, as the v1 list schema says. We use the v1 schema.
3. v0 show-instance answers `{"instances": null}` for an unknown or destroyed id (SDK and dstack
   handle it); the spec types `instances` as an object only. We allow null.
Paths are validated without the trailing slash the sim also serves (the specs have none);
servers are pointed at the sim's base URLs.
"""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml  # type: ignore[import-untyped,unused-ignore]
from openapi_core import Config, OpenAPI
from openapi_core.testing import MockRequest, MockResponse
from sim_support import KEY, new_key, running_sim, urls
from tests.conftest import eventually

from gpuwarden.sim import SimCloud

pytestmark = pytest.mark.slow

FIXTURES = Path(__file__).parents[1] / "fixtures" / "providers"
_CACHE: dict[str, dict[str, Any]] = {}


def _load(name: str) -> dict[str, Any]:
    if name not in _CACHE:
        text = (FIXTURES / name).read_text()
        _CACHE[name] = yaml.safe_load(text) if name.endswith(".yaml") else json.loads(text)
    return copy.deepcopy(_CACHE[name])


def vast_spec(base: str) -> OpenAPI:
    spec = _load("vast-openapi.yaml")
    spec["servers"] = [{"url": base}]
    v1_item = spec["paths"]["/api/v1/instances"]["get"]["responses"]["200"]["content"][
        "application/json"
    ]["schema"]["properties"]["instances"]["items"]["properties"]
    inst = spec["components"]["schemas"]["Instance"]["properties"]
    inst["ports"] = v1_item["ports"]  # exception 1
    inst["extra_env"] = v1_item["extra_env"]  # exception 2
    show = spec["paths"]["/api/v0/instances/{id}"]["get"]["responses"]["200"]["content"][
        "application/json"
    ]["schema"]["properties"]
    show["instances"] = {"anyOf": [{"$ref": "#/components/schemas/Instance"}, {"type": "null"}]}
    return OpenAPI.from_dict(spec, config=Config(spec_validator_cls=None))  # exception 3 ^


def lambda_spec(base: str) -> OpenAPI:
    spec = _load("lambda-openapi.json")
    spec["servers"] = [{"url": base}]
    return OpenAPI.from_dict(spec, config=Config(spec_validator_cls=None))


class Checker:
    """Sends a request to the sim and validates the response against a spec."""

    def __init__(self, http: httpx.AsyncClient, spec: OpenAPI, origin: str) -> None:
        self.http, self.spec, self.origin = http, spec, origin
        self.checked: list[tuple[str, str, int]] = []

    async def __call__(
        self, method: str, url: str, *, status: int, body: Any = None, **kw: Any
    ) -> Any:
        resp = await self.http.request(method, url, json=body, **kw)
        assert resp.status_code == status, (method, url, resp.status_code, resp.text)
        path = httpx.URL(url).path.rstrip("/")
        request = MockRequest(
            self.origin,
            method.lower(),
            path,
            args=dict(resp.request.url.params),
            data=resp.request.content or None,
        )
        response = MockResponse(resp.content, status_code=resp.status_code)
        self.spec.validate_response(request, response)
        self.checked.append((method, path, status))
        return resp.json()


async def test_vast_responses_follow_the_spec(tmp_path: Path) -> None:
    async with running_sim(tmp_path) as cloud, httpx.AsyncClient() as http:
        base = urls(cloud).vast
        check = Checker(http, vast_spec(base), urls(cloud).admin)
        auth = {"Authorization": f"Bearer {KEY}"}
        _, pub = new_key()

        # search: filters with string numbers and CLI names; works without a key too
        query = {
            "gpu_name": {"in": ["RTX_4090", "RTX 3090"]},
            "num_gpus": {"eq": "1"},
            "gpu_ram": {"gte": "22000"},
            "verified": {"eq": True},
            "geolocation": {"notin": ["CN"]},
            "order": [["dph_total", "asc"]],
            "type": "ondemand",
            "limit": 3,
        }
        found = await check("POST", f"{base}/api/v0/bundles/", status=200, body=query)
        offers = found["offers"]
        assert 0 < len(offers) <= 3
        assert all(o["gpu_name"] in ("RTX 4090", "RTX 3090") for o in offers)
        assert [o["dph_total"] for o in offers] == sorted(o["dph_total"] for o in offers)
        await check("POST", f"{base}/api/v0/bundles", status=400, body={"x": {"like": 1}})

        # account and keys (query-parameter auth here)
        me = await check("GET", f"{base}/api/v0/users/current", status=200, params={"api_key": KEY})
        assert me["credit"] == pytest.approx(100.0)
        await check("GET", f"{base}/api/v0/users/current/", status=401)
        await check("POST", f"{base}/api/v0/ssh/", status=200, body={"ssh_key": pub}, headers=auth)
        await check("POST", f"{base}/api/v0/ssh/", status=400, body={}, headers=auth)
        keys = await check("GET", f"{base}/api/v0/ssh/", status=200, headers=auth)
        assert [k["key"] for k in keys] == [pub]

        # create, errors first
        ask = offers[0]["id"]
        spec = {"image": "pytorch/pytorch", "disk": 20, "label": "spec-1", "runtype": "ssh_direct"}
        await check("PUT", f"{base}/api/v0/asks/{ask}/", status=401, body=spec)
        await check("PUT", f"{base}/api/v0/asks/1/", status=404, body=spec, headers=auth)
        await check("PUT", f"{base}/api/v0/asks/{ask}/", status=400, body={}, headers=auth)
        made = await check("PUT", f"{base}/api/v0/asks/{ask}", status=200, body=spec, headers=auth)
        iid = made["new_contract"]
        assert made["success"] is True and made["instance_api_key"]
        await check("PUT", f"{base}/api/v0/asks/{ask}/", status=410, body=spec, headers=auth)

        # show while booting, then running
        shown = await check("GET", f"{base}/api/v0/instances/{iid}/", status=200, headers=auth)
        assert shown["instances"]["actual_status"] in (None, "created", "loading")
        assert shown["instances"]["ports"] is None

        async def running() -> Any:
            r = await http.get(f"{base}/api/v0/instances/{iid}/", headers=auth)
            return r.json()["instances"]["actual_status"] == "running"

        await eventually(running)
        shown = await check("GET", f"{base}/api/v0/instances/{iid}", status=200, headers=auth)
        inst = shown["instances"]
        assert inst["public_ipaddr"] == "127.0.0.1"
        assert int(inst["ports"]["22/tcp"][0]["HostPort"]) == inst["ssh_port"]
        await check("GET", f"{base}/api/v0/instances/{iid}/", status=401)

        # list (v1, keyset paging)
        params = {"select_filters": "{}", "order_by": '[{"col":"id","dir":"asc"}]', "limit": "25"}
        listed = await check(
            "GET", f"{base}/api/v1/instances/", status=200, headers=auth, params=params
        )
        assert [i["id"] for i in listed["instances"]] == [iid]
        assert listed["label_counts"] == {"spec-1": 1} and listed["next_token"] is None

        # faults answer with the documented shapes
        await _post_faults(http, cloud, {"vast": {"rate_429": 1.0}})
        await check("GET", f"{base}/api/v0/instances/{iid}/", status=429, headers=auth)
        await check("DELETE", f"{base}/api/v0/instances/{iid}/", status=429, headers=auth)
        await _post_faults(http, cloud, {"vast": {"rate_429": 0.0}})
        await check("GET", f"{base}/api/v0/users/current", status=200, headers=auth)

        # destroy, destroy again, show the gone one
        await check("DELETE", f"{base}/api/v0/instances/{iid}/", status=200, headers=auth)
        await check("DELETE", f"{base}/api/v0/instances/{iid}/", status=404, headers=auth)
        gone = await check("GET", f"{base}/api/v0/instances/{iid}/", status=200, headers=auth)
        assert gone == {"instances": None}
        assert len(check.checked) >= 20


def test_the_validation_is_not_vacuous() -> None:
    """A wrong shape fails validation: the checks above could fail."""
    from openapi_core.exceptions import OpenAPIError

    origin = "http://127.0.0.1:1"
    vast, lam = vast_spec(origin + "/vast"), lambda_spec(origin + "/lambda")
    with pytest.raises(OpenAPIError):
        vast.validate_response(
            MockRequest(origin, "get", "/vast/api/v0/users/current"),
            MockResponse(json.dumps({"id": "not an integer"}).encode()),
        )
    with pytest.raises(OpenAPIError):
        lam.validate_response(
            MockRequest(origin, "get", "/lambda/api/v1/instances"),
            MockResponse(json.dumps({"data": [{"id": "x", "status": "booting"}]}).encode()),
        )


async def test_vast_list_pages_by_25_with_a_next_token(tmp_path: Path) -> None:
    # A long boot delay: the instances never start an SSH server during this test.
    async with running_sim(tmp_path, boot_delay=60.0) as cloud, httpx.AsyncClient() as http:
        base = urls(cloud).vast
        check = Checker(http, vast_spec(base), urls(cloud).admin)
        for i in range(27):
            cloud.core.create(
                "vast",
                cloud.core.new_vast_id(),
                label=f"page-{i}",
                price_per_hour=0.1,
                details=_vast_details(),
                onstart="",
                env={},
                authorized=list,
            )
        auth = {"Authorization": f"Bearer {KEY}"}
        first = await check("GET", f"{base}/api/v1/instances/", status=200, headers=auth)
        assert first["instances_found"] == 25 and first["total_instances"] == 27
        token = first["next_token"]
        assert token
        second = await check(
            "GET",
            f"{base}/api/v1/instances/",
            status=200,
            headers=auth,
            params={"after_token": token},
        )
        ids = [i["id"] for i in first["instances"] + second["instances"]]
        assert ids == sorted(ids) and len(set(ids)) == 27
        assert second["next_token"] is None
        await check(
            "GET", f"{base}/api/v1/instances/", status=200, headers=auth, params={"limit": "100"}
        )


def _vast_details() -> dict[str, Any]:
    from gpuwarden.sim import catalog

    offer = catalog.vast_offer(catalog.VAST_MACHINES[0], allocated_gb=10, rented=True, bid=False)
    return {
        "ask_id": -1,
        "offer": offer,
        "disk": 10.0,
        "image": "img",
        "runtype": "ssh",
        "extra_env": [],
        "attached_keys": [],
        "jupyter_token": "t",
        "gpu": offer["gpu_name"],
    }


async def _post_faults(http: httpx.AsyncClient, cloud: SimCloud, body: Any) -> None:
    resp = await http.post(f"{urls(cloud).admin}/_sim/faults", json=body)
    assert resp.status_code == 200, resp.text


async def test_lambda_responses_follow_the_spec(tmp_path: Path) -> None:
    async with running_sim(tmp_path) as cloud, httpx.AsyncClient() as http:
        base = urls(cloud).lambda_
        check = Checker(http, lambda_spec(urls(cloud).admin + "/lambda"), urls(cloud).admin)
        bearer = {"Authorization": f"Bearer {KEY}"}
        basic = {"Authorization": "Basic " + base64.b64encode(f"{KEY}:".encode()).decode()}
        raw_basic = {"Authorization": f"Basic {KEY}"}
        _, pub = new_key()

        types = await check("GET", f"{base}/instance-types", status=200, headers=basic)
        assert types["data"]["gpu_1x_a10"]["instance_type"]["price_cents_per_hour"] == 75
        await check("GET", f"{base}/instance-types/", status=200, headers=raw_basic)
        await check("GET", f"{base}/instances", status=401)
        await check("GET", f"{base}/instances", status=401, headers={"Authorization": "Bearer no"})

        # ssh keys: add, add generated, list, delete, bad requests
        added = await check(
            "POST",
            f"{base}/ssh-keys",
            status=200,
            headers=bearer,
            body={"name": "k", "public_key": pub},
        )
        generated = await check(
            "POST", f"{base}/ssh-keys/", status=200, headers=bearer, body={"name": "g"}
        )
        assert generated["data"]["private_key"].startswith("-----BEGIN")
        await check("POST", f"{base}/ssh-keys", status=400, headers=bearer, body={"name": "k"})
        listed = await check("GET", f"{base}/ssh-keys", status=200, headers=bearer)
        assert {k["name"] for k in listed["data"]} == {"k", "g"}
        gid = generated["data"]["id"]
        await check("DELETE", f"{base}/ssh-keys/{gid}", status=200, headers=bearer)
        await check("DELETE", f"{base}/ssh-keys/{gid}", status=400, headers=bearer)
        assert added["data"]["public_key"] == pub

        # launch: errors, then one that works
        good = {
            "region_name": "us-east-1",
            "instance_type_name": "gpu_1x_a10",
            "ssh_key_names": ["k"],
            "quantity": 1,
            "name": "spec-l",
        }
        launch = f"{base}/instance-operations/launch"
        await check("POST", launch, status=400, headers=bearer, body={**good, "ssh_key_names": []})
        await check("POST", launch, status=400, headers=bearer, body={**good, "quantity": 2})
        not_json = await http.post(launch, headers=bearer, content=b"[1, 2")
        assert not_json.status_code == 400
        assert not_json.json()["error"]["code"] == "global/invalid-parameters"
        await check(
            "POST", launch, status=400, headers=bearer, body={**good, "region_name": "us-south-1"}
        )
        await check(
            "POST",
            launch,
            status=404,
            headers=bearer,
            body={**good, "instance_type_name": "gpu_9x"},
        )
        await check(
            "POST", launch, status=404, headers=bearer, body={**good, "ssh_key_names": ["nope"]}
        )
        made = await check("POST", launch, status=200, headers=bearer, body=good)
        iid = made["data"]["instance_ids"][0]

        booting = await check("GET", f"{base}/instances", status=200, headers=bearer)
        assert booting["data"][0]["status"] == "booting" and "ip" not in booting["data"][0]

        async def active() -> Any:
            r = await http.get(f"{base}/instances/{iid}", headers=bearer)
            return r.json()["data"]["status"] == "active"

        await eventually(active)
        one = await check("GET", f"{base}/instances/{iid}", status=200, headers=bearer)
        assert one["data"]["ip"] == "127.0.0.1" and one["data"]["ssh_port"] > 0
        await check("GET", f"{base}/instances/{'0' * 32}", status=404, headers=bearer)
        renamed = await check(
            "POST", f"{base}/instances/{iid}", status=200, headers=bearer, body={"name": "spec-m"}
        )
        assert renamed["data"]["name"] == "spec-m"

        # zero credit: 403 global/account-inactive on launch
        await _post_faults(http, cloud, {"credit": {"lambda": 0}})
        refused = await check("POST", launch, status=403, headers=bearer, body=good)
        assert refused["error"]["code"] == "global/account-inactive"

        # terminate, then unknown ids
        term = f"{base}/instance-operations/terminate"
        done = await check("POST", term, status=200, headers=bearer, body={"instance_ids": [iid]})
        assert done["data"]["terminated_instances"][0]["status"] == "terminating"
        await check("POST", term, status=404, headers=bearer, body={"instance_ids": ["f" * 32]})

        async def unlisted() -> Any:
            r = await http.get(f"{base}/instances", headers=bearer)
            return r.json()["data"] == []

        await eventually(unlisted)
        after = await check("GET", f"{base}/instances/{iid}", status=200, headers=bearer)
        assert after["data"]["status"] == "terminated"
        assert len(check.checked) >= 20
