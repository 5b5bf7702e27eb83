"""GPU names match a model, not a substring: "--gpu A10" once rented an A100 SXM4."""

from __future__ import annotations

import pytest

from gpuwarden.core.clock import FakeClock
from gpuwarden.core.gpus import gpu_matches
from gpuwarden.providers.base import Requirements
from gpuwarden.providers.fake import FakeProvider
from gpuwarden.providers.vast_wire import gpu_candidates


@pytest.mark.parametrize(
    ("wanted", "name", "matches"),
    [
        ("A10", "A10", True),
        ("A10", "A10 PCIe", True),
        ("a10", "A100 SXM4", False),
        ("A10", "A100 PCIE", False),
        ("A100", "A100 SXM4", True),
        ("A100", "A100X", False),
        ("4090", "RTX 4090", True),
        ("rtx 4090", "RTX 4090", True),
        ("RTX4090", "RTX 4090", True),
        ("rtx-4090", "RTX 4090", True),
        ("4090", "RTX 5090", False),
        ("4080", "RTX 4080S", False),
        ("RTX", "RTX 3090", True),
        ("H100 SXM", "H100 SXM", True),
        ("H100", "H100 NVL", True),
        ("SXM", "H100 SXM", True),
        ("L4", "L40S", False),
        ("T4", "Tesla T4", True),
        (None, "RTX 4090", True),
        ("", "RTX 4090", True),
        ("--", "RTX 4090", False),
    ],
)
def test_gpu_matches_whole_words(wanted: str | None, name: str, matches: bool) -> None:
    assert gpu_matches(wanted, name) is matches


def test_vast_sends_only_the_model_asked_for() -> None:
    assert gpu_candidates("A10") == ["A10"]
    assert gpu_candidates("4090") == ["RTX 4090"]
    assert gpu_candidates("A100") == ["A100 PCIE", "A100 SXM4"]


async def test_the_fake_provider_matches_the_same_way(clock: FakeClock) -> None:
    fake = FakeProvider(clock)  # it sells an A10 and an A100 80GB, the A10 dearer
    found = await fake.search_offers(Requirements(gpu_name="A10"))
    assert [o.gpu_name for o in found] == ["A10"]
