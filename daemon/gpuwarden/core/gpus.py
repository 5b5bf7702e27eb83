"""GPU model names: whether a GPU a provider reports is the model asked for. Pure, and below
both the providers (offer searches) and the config (warm-schedule classes), so that the two
agree on what "A10" means."""

from __future__ import annotations

import re

_WORD = re.compile(r"[a-z0-9]+")


def gpu_matches(wanted: str | None, name: str) -> bool:
    """Does the GPU called `name` (as a provider reports it) match the model asked for?

    Whole words of the name, in a row, case and separators ignored: "4090", "rtx 4090" and
    "RTX4090" match "RTX 4090", "A100" matches "A100 SXM4", but "A10" matches neither
    "A100 SXM4" nor "A100X": a substring match rented an A100 for "A10". None or "" asks for
    any GPU; text with no letter or digit matches nothing."""
    if not wanted:
        return True
    want = "".join(_WORD.findall(wanted.lower()))
    words = _WORD.findall(name.lower())
    return bool(want) and any(
        "".join(words[i:j]) == want for i in range(len(words)) for j in range(i + 1, len(words) + 1)
    )
