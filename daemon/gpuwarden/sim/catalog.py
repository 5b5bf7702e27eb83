"""The sim's offer catalog: Vast.ai asks and Lambda Cloud instance types.

Values follow the reference payloads (examples/vast/search-offers.response.json and
examples/lambda/instance-types.response.json): Vast GPU names with spaces, GPU RAM in MB,
`dph_*` in USD/hour, storage cost in USD per GB-month, geolocation "Region, CC"; Lambda
prices in US cents per hour with per-region capacity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Vast bills storage per GB-month; a month is 30 days here (720 h), as on the site.
HOURS_PER_MONTH = 720.0
DEFAULT_ALLOCATED_GB = 8.0  # the search spec's default for allocated_storage


@dataclass(frozen=True, slots=True)
class VastMachine:
    ask_id: int
    machine_id: int
    host_id: int
    gpu_name: str
    num_gpus: int
    gpu_ram_mb: int
    compute_cap: int
    dph_base: float
    storage_cost: float  # USD per GB-month
    geolocation: str
    reliability: float
    verified: bool
    cpu_name: str
    cpu_cores: int
    cpu_ram_mb: int
    inet_down: float
    inet_up: float
    dlperf: float
    public_ipaddr: str


def _m(*a: Any) -> VastMachine:
    return VastMachine(*a)


# ask, machine, host, gpu, n, gpu_ram MB, cc, $/h base, $/GB-mo, geo, reliability, verified,
# cpu, cores, cpu_ram MB, down, up, dlperf, ip (documentation ranges, never dialled)
# fmt: off
VAST_MACHINES: tuple[VastMachine, ...] = (
    _m(14825071, 31205, 118422, "RTX 3090", 1, 24576, 860, 0.16, 0.15, "Quebec, CA",
       0.9962, True, "Xeon® E5-2697 v4", 36, 64393, 893.1, 702.4, 29.6, "203.0.113.15"),
    _m(14825102, 31877, 118422, "RTX 3090", 2, 24576, 860, 0.31, 0.15, "Quebec, CA",
       0.9958, True, "Xeon® E5-2697 v4", 36, 128786, 893.1, 702.4, 58.9, "203.0.113.16"),
    _m(15011342, 28811, 99120, "RTX 3090", 1, 24576, 860, 0.13, 0.10, "Ohio, US",
       0.9712, False, "Ryzen 9 5950X", 32, 64280, 512.0, 480.2, 29.1, "203.0.113.21"),
    _m(15207788, 40117, 251090, "RTX 4090", 1, 24564, 890, 0.349, 0.20, "Texas, US",
       0.9991, True, "Core™ i9-13900K", 32, 128624, 2341.7, 1874.2, 68.1, "203.0.113.66"),
    _m(15207790, 40118, 251090, "RTX 4090", 2, 24564, 890, 0.69, 0.20, "Texas, US",
       0.9989, True, "Core™ i9-13900K", 32, 128624, 2341.7, 1874.2, 135.8, "203.0.113.67"),
    _m(15330421, 41200, 260001, "RTX 4090", 1, 24564, 890, 0.295, 0.18, "Oregon, US",
       0.9934, True, "Ryzen 9 7950X", 32, 96210, 1200.4, 980.3, 67.4, "203.0.113.70"),
    _m(15330555, 41377, 260417, "RTX 4090", 1, 24564, 890, 0.27, 0.12, "Bavaria, DE",
       0.9871, True, "Ryzen 9 7950X", 32, 64180, 950.0, 910.5, 67.0, "203.0.113.71"),
    _m(15330612, 41402, 260533, "RTX 4090", 4, 24564, 890, 1.32, 0.20, "Ontario, CA",
       0.9977, True, "EPYC 7543 32-Core", 64, 257740, 3120.2, 2890.7, 270.1, "203.0.113.72"),
    _m(15402210, 42001, 270310, "RTX A5000", 1, 24564, 860, 0.19, 0.10, "Nevada, US",
       0.9902, True, "Xeon® Gold 6226R", 32, 128700, 800.3, 760.1, 25.2, "203.0.113.80"),
    _m(15402288, 42034, 270355, "RTX A6000", 1, 49140, 860, 0.45, 0.15, "Utah, US",
       0.9957, True, "EPYC 7313 16-Core", 32, 128700, 1800.1, 1500.0, 38.7, "203.0.113.81"),
    _m(15510032, 43300, 281002, "L40S", 1, 46068, 890, 0.79, 0.20, "Virginia, US",
       0.9985, True, "EPYC 9354 32-Core", 64, 257320, 5020.3, 4800.1, 91.3, "203.0.113.90"),
    _m(15510077, 43301, 281002, "L40S", 2, 46068, 890, 1.56, 0.20, "Virginia, US",
       0.9983, True, "EPYC 9354 32-Core", 64, 514640, 5020.3, 4800.1, 182.2, "203.0.113.91"),
    _m(15620101, 44510, 290113, "A100 PCIE", 1, 40960, 800, 0.78, 0.20, "Illinois, US",
       0.9968, True, "EPYC 7502 32-Core", 64, 257830, 2200.5, 2100.0, 86.2, "203.0.113.100"),
    _m(15620144, 44533, 290140, "A100 SXM4", 1, 81920, 800, 1.05, 0.25, "Sweden, SE",
       0.9979, True, "EPYC 7763 64-Core", 128, 515400, 9400.0, 9100.0, 107.0, "203.0.113.101"),
    _m(15620145, 44534, 290140, "A100 SXM4", 8, 81920, 800, 8.2, 0.25, "Sweden, SE",
       0.9979, True, "EPYC 7763 64-Core", 128, 2061600, 9400.0, 9100.0, 852.3, "203.0.113.102"),
    _m(15730210, 45600, 300991, "H100 SXM", 1, 81559, 900, 2.05, 0.30, "Texas, US",
       0.9993, True, "Xeon® Platinum 8480+", 112, 1031200, 10200.1, 9800.4, 210.7, "203.0.113.110"),
    _m(15730288, 45612, 301002, "H100 PCIE", 1, 81559, 900, 1.75, 0.25, "Quebec, CA",
       0.9975, True, "EPYC 9454 48-Core", 96, 515600, 6500.0, 6100.0, 168.4, "203.0.113.111"),
    _m(15730299, 45699, 301077, "H100 SXM", 8, 81559, 900, 16.0, 0.30, "Iceland, IS",
       0.9990, True, "Xeon® Platinum 8480+", 224, 2062400, 25000.0, 24000.0, 1680.3,
       "203.0.113.112"),
    _m(15840001, 46700, 310511, "Tesla V100", 1, 16384, 700, 0.11, 0.08, "Poland, PL",
       0.9811, True, "Xeon® E5-2680 v4", 28, 64200, 700.0, 650.0, 14.9, "203.0.113.120"),
    _m(15840050, 46744, 310599, "RTX 3080", 1, 10240, 860, 0.07, 0.08, "Guangdong, CN",
       0.9402, False, "Core™ i7-12700K", 20, 32100, 300.0, 100.0, 18.2, "203.0.113.121"),
)
# fmt: on


def vast_offer(m: VastMachine, *, allocated_gb: float, rented: bool, bid: bool) -> dict[str, Any]:
    """One offer as POST /api/v0/bundles/ returns it (fields as in the reference example)."""
    storage_total = round(m.storage_cost * allocated_gb / HOURS_PER_MONTH, 6)
    min_bid = round(m.dph_base * 0.45, 4)
    base = min_bid if bid else m.dph_base
    total = round(base + storage_total, 6)
    flops = round(m.dlperf * 1.21, 1)
    return {
        "id": m.ask_id,
        "ask_contract_id": m.ask_id,
        "bundle_id": 900000000 + m.ask_id,
        "bundled_results": None,
        "machine_id": m.machine_id,
        "host_id": m.host_id,
        "hostname": None,
        "num_gpus": m.num_gpus,
        "gpu_name": m.gpu_name,
        "gpu_arch": "nvidia",
        "gpu_ram": m.gpu_ram_mb,
        "gpu_total_ram": m.gpu_ram_mb * m.num_gpus,
        "gpu_frac": 1.0,
        "gpu_ids": list(range(m.num_gpus)),
        "gpu_lanes": 16,
        "gpu_mem_bw": 913.1,
        "gpu_max_power": 450,
        "gpu_max_temp": 83,
        "gpu_display_active": False,
        "bw_nvlink": 0.0,
        "compute_cap": m.compute_cap,
        "cuda_max_good": 12.8 if m.compute_cap >= 890 else 12.4,
        "driver_version": "570.86.10",
        "driver_vers": 570861000,
        "cpu_name": m.cpu_name,
        "cpu_arch": "amd64",
        "cpu_cores": m.cpu_cores,
        "cpu_cores_effective": float(m.cpu_cores // 2),
        "cpu_ghz": 3.8,
        "cpu_ram": m.cpu_ram_mb,
        "has_avx": 1,
        "mobo_name": "PRO Z790-A",
        "pci_gen": 4.0,
        "pcie_bw": 25.1,
        "disk_space": 406.8,
        "disk_bw": 3120.4,
        "disk_name": "Samsung SSD 990 PRO 2TB",
        "inet_down": m.inet_down,
        "inet_up": m.inet_up,
        "inet_down_cost": 0.0039,
        "inet_up_cost": 0.0039,
        "internet_down_cost_per_tb": 3.9,
        "internet_up_cost_per_tb": 3.9,
        "direct_port_count": 98,
        "public_ipaddr": m.public_ipaddr,
        "static_ip": True,
        "geolocation": m.geolocation,
        "geolocode": 1234567,
        "dph_base": base,
        "dph_total": total,
        "min_bid": min_bid,
        "is_bid": bid,
        "storage_cost": m.storage_cost,
        "storage_total_cost": storage_total,
        "vram_costperhour": round(base / (m.gpu_ram_mb / 1000), 6),
        "credit_discount_max": 0.4,
        "discount_rate": None,
        "dlperf": m.dlperf,
        "dlperf_per_dphtotal": round(m.dlperf / total, 4),
        "total_flops": flops,
        "flops_per_dphtotal": round(flops / total, 4),
        "score": round(m.dlperf * 5.03 * m.reliability, 1),
        "reliability": m.reliability,
        "reliability2": m.reliability,
        "reliability_mult": 0.999,
        "expected_reliability": m.reliability,
        "rentable": True,
        "rented": rented,
        "external": False,
        "hosting_type": 0,
        "verification": "verified" if m.verified else "unverified",
        "vericode": 1 if m.verified else 0,
        "vms_enabled": False,
        "is_vm_deverified": False,
        "resource_type": "gpu",
        "cluster_id": None,
        "os_version": "22.04",
        "logo": "/static/logos/vastai_small2.png",
        "webpage": None,
        "start_date": 1733990400.0,
        "end_date": 1893456000.0,
        "duration": 2592000.0,
        "time_remaining": "",
        "time_remaining_isbid": "",
        "search": _price_block(base, storage_total),
        "instance": _price_block(base, storage_total),
    }


def _price_block(gpu: float, disk: float) -> dict[str, float]:
    total = round(gpu + disk, 6)
    return {
        "gpuCostPerHour": gpu,
        "diskHour": disk,
        "totalHour": total,
        "discountTotalHour": 0,
        "discountedTotalPerHour": total,
    }


# --- Lambda --------------------------------------------------------------------------------

LAMBDA_REGIONS: dict[str, str] = {
    "us-east-1": "Virginia, USA",
    "us-east-2": "Washington DC, USA",
    "us-east-3": "Ohio, USA",
    "us-west-1": "California, USA",
    "us-west-2": "Arizona, USA",
    "us-west-3": "Utah, USA",
    "us-south-1": "Texas, USA",
    "us-south-2": "North Texas, USA",
    "us-south-3": "Central Texas, USA",
    "us-midwest-1": "Illinois, USA",
    "us-midwest-2": "Chicago, USA",
    "europe-central-1": "Germany",
    "asia-south-1": "India",
    "asia-northeast-1": "Osaka, Japan",
    "asia-northeast-2": "Tokyo, Japan",
    "australia-east-1": "Sydney, Australia",
    "me-west-1": "Israel",
}


@dataclass(frozen=True, slots=True)
class LambdaType:
    name: str
    gpus: int
    gpu_description: str
    price_cents_per_hour: int
    vcpus: int
    memory_gib: int
    storage_gib: int
    regions: tuple[str, ...]  # with capacity available

    def instance_type(self) -> dict[str, Any]:
        desc = f"{self.gpus}x {self.gpu_description}" if self.gpus else "4x CPU General (16 GiB)"
        return {
            "name": self.name,
            "description": desc,
            "gpu_description": self.gpu_description,
            "price_cents_per_hour": self.price_cents_per_hour,
            "specs": {
                "vcpus": self.vcpus,
                "memory_gib": self.memory_gib,
                "storage_gib": self.storage_gib,
                "gpus": self.gpus,
            },
        }


def _t(*a: Any) -> LambdaType:
    return LambdaType(*a)


# The late-2025 catalog of the reference fixture, plus capacity for the A6000 and RTX 6000
# so that cheap single-GPU launches are possible in the sim.
# fmt: off
LAMBDA_TYPES: tuple[LambdaType, ...] = (
    _t("gpu_1x_gh200", 1, "GH200 (96 GB)", 149, 64, 432, 4096, ()),
    _t("gpu_8x_b200_sxm6", 8, "B200 (180 GB SXM6)", 3992, 208, 2900, 22528,
       ("australia-east-1", "us-east-1")),
    _t("gpu_8x_h100_sxm5", 8, "H100 (80 GB SXM5)", 2392, 208, 1800, 22528,
       ("us-west-3", "us-south-2", "us-south-3")),
    _t("gpu_4x_h100_sxm5", 4, "H100 (80 GB SXM5)", 1236, 104, 900, 11264,
       ("us-south-2", "us-south-3")),
    _t("gpu_2x_h100_sxm5", 2, "H100 (80 GB SXM5)", 638, 52, 450, 5632,
       ("us-south-2", "us-south-3")),
    _t("gpu_1x_h100_sxm5", 1, "H100 (80 GB SXM5)", 329, 26, 225, 2816,
       ("us-south-2", "us-south-3")),
    _t("gpu_1x_h100_pcie", 1, "H100 (80 GB PCIe)", 249, 26, 200, 1024, ("us-west-3",)),
    _t("gpu_8x_a100_80gb_sxm4", 8, "A100 (80 GB SXM4)", 1432, 240, 1800, 20480,
       ("us-midwest-1", "us-east-1", "australia-east-1")),
    _t("gpu_1x_a10", 1, "A10 (24 GB PCIe)", 75, 30, 200, 1400, ("us-east-1", "us-west-1")),
    _t("gpu_1x_rtx6000", 1, "RTX 6000 (24 GB)", 50, 14, 46, 512, ("us-south-1",)),
    _t("gpu_1x_a100", 1, "A100 (40 GB PCIe)", 129, 30, 200, 512, ()),
    _t("gpu_1x_a100_sxm4", 1, "A100 (40 GB SXM4)", 129, 30, 200, 512,
       ("us-east-1", "us-west-2", "asia-south-1")),
    _t("gpu_2x_a100", 2, "A100 (40 GB PCIe)", 258, 60, 400, 1024, ()),
    _t("gpu_4x_a100", 4, "A100 (40 GB PCIe)", 516, 120, 800, 1024, ()),
    _t("gpu_8x_a100", 8, "A100 (40 GB SXM4)", 1032, 124, 1800, 6144,
       ("us-west-1", "us-east-1", "me-west-1", "asia-northeast-1", "asia-northeast-2",
        "us-west-2", "europe-central-1")),
    _t("gpu_1x_a6000", 1, "A6000 (48 GB)", 80, 14, 100, 200, ("us-west-1",)),
    _t("gpu_2x_a6000", 2, "A6000 (48 GB)", 160, 28, 200, 1024, ()),
    _t("gpu_4x_a6000", 4, "A6000 (48 GB)", 320, 56, 400, 1024, ()),
    _t("gpu_8x_v100", 8, "Tesla V100 (16 GB)", 440, 92, 448, 6041, ()),
    _t("cpu_4x_general", 0, "N/A", 20, 4, 16, 100, ()),
)
# fmt: on


def lambda_region(name: str) -> dict[str, str]:
    return {"name": name, "description": LAMBDA_REGIONS[name]}


def lambda_type(name: str) -> LambdaType | None:
    return next((t for t in LAMBDA_TYPES if t.name == name), None)


def lambda_instance_types() -> dict[str, Any]:
    """GET /instance-types `data`: {name: {instance_type, regions_with_capacity_available}}."""
    return {
        t.name: {
            "instance_type": t.instance_type(),
            "regions_with_capacity_available": [lambda_region(r) for r in t.regions],
        }
        for t in LAMBDA_TYPES
    }
