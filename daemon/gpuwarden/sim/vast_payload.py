"""Vast instance payloads as GET /api/v0/instances/{id}/ and /api/v1/instances/ return them,
built from the rented offer and the sim's instance (fields as in the reference examples)."""

from __future__ import annotations

import itertools
import math
import shlex
from datetime import datetime
from typing import Any

from gpuwarden.sim.core import SimInstance


def iso(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def env_pairs(env: Any) -> list[tuple[str, str]]:
    """`env` as the SDK sends it (a dict; port mappings are keys with value "1") or as the spec
    describes it (a Docker flag string: "-e A=1 -p 8000:8000")."""
    if isinstance(env, dict):
        return [(str(k), str(v)) for k, v in env.items()]
    if isinstance(env, str):
        words, pairs = shlex.split(env), []
        for flag, arg in itertools.pairwise(words):
            if flag == "-e" and "=" in arg:
                k, _, v = arg.partition("=")
                pairs.append((k, v))
            elif flag == "-p":
                pairs.append((f"-p {arg}", "1"))
        return pairs
    return []


def instance_payload(inst: SimInstance, now: datetime) -> dict[str, Any]:
    """One instance as GET /api/v0/instances/{id}/ and /api/v1/instances/ return it."""
    d = inst.details
    o = d["offer"]
    running = inst.status == "running"
    wanted = "stopped" if inst.status == "stopped" else "running"  # stopped: outbid
    status_msg = {
        None: None,
        "created": "Creating container",
        "loading": f"Pulling image {d['image']} ... 43%",
        "running": f"success, running {d['image'].replace(':', '_')}/ssh",
        "stopped": "Instance stopped: outbid",
    }.get(inst.status)
    out: dict[str, Any] = {
        "id": int(inst.id),
        "machine_id": o["machine_id"],
        "host_id": o["host_id"],
        "bundle_id": o["bundle_id"],
        "actual_status": inst.status,
        "intended_status": wanted,
        "cur_state": wanted,
        "next_state": wanted,
        "status_msg": status_msg,
        "label": inst.label or None,
        "image_uuid": d["image"],
        "image_args": [],
        "image_runtype": "ssh ssh_direc ssh_proxy" if "ssh" in d["runtype"] else d["runtype"],
        "template_id": None,
        "template_hash_id": None,
        "template_name": None,
        "extra_env": d["extra_env"],
        "onstart": inst.onstart,
        "jupyter_token": d["jupyter_token"],
        "ssh_host": "127.0.0.1",
        "ssh_idx": "0",
        "public_ipaddr": "127.0.0.1",
        "local_ipaddrs": "127.0.0.1 \n",
        "static_ip": True,
        "direct_port_count": 1,
        "ports": None,
        "start_date": inst.created_at.timestamp(),
        "end_date": o["end_date"],
        "uptime_mins": None,
        "duration": o["duration"],
        "disk_space": d["disk"],
        "cpu_util": 0.0,
        "gpu_util": None,
        "gpu_temp": None,
        "mem_limit": None,
        "mem_usage": None,
        "vmem_usage": None,
        "disk_util": -1,
        "disk_usage": -1,
        "credit_balance": None,
        "credit_discount": None,
        "client_run_time": 0.05,
        "host_run_time": 2592000.0,
        "country_code": o["geolocation"].rsplit(",", 1)[-1].strip(),
    }
    for k in _FROM_OFFER:
        out[k] = o[k]
    out["gpu_totalram"] = o["gpu_ram"]
    if running and inst.ssh_port is not None:
        port = str(inst.ssh_port)
        out.update(
            ports={"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": port}]},  # noqa: S104 - a label
            ssh_port=inst.ssh_port,
            direct_port_start=inst.ssh_port,
            direct_port_end=inst.ssh_port,
            uptime_mins=math.floor((now - inst.created_at).total_seconds() / 6) / 10,
            gpu_util=0.0,
            gpu_temp=34.0,
        )
    return out


_FROM_OFFER = (
    "num_gpus", "gpu_name", "gpu_arch", "gpu_ram", "gpu_frac", "gpu_lanes", "gpu_mem_bw",
    "bw_nvlink", "cuda_max_good", "driver_version", "compute_cap", "cpu_name", "cpu_arch",
    "cpu_cores", "cpu_cores_effective", "cpu_ram", "disk_name", "disk_bw", "inet_up",
    "inet_down", "inet_up_cost", "inet_down_cost", "geolocation", "verification", "rentable",
    "hosting_type", "external", "is_bid", "min_bid", "dph_base", "dph_total", "storage_cost",
    "storage_total_cost", "vram_costperhour", "credit_discount_max", "reliability2", "score",
    "dlperf", "dlperf_per_dphtotal", "total_flops", "flops_per_dphtotal", "os_version",
    "mobo_name", "pci_gen", "pcie_bw", "logo", "webpage", "time_remaining",
    "time_remaining_isbid", "search", "instance",
)  # fmt: skip
