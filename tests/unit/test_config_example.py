"""config.example.toml: it loads as-is, enables only the simulated cloud, and documents every
setting (a new field without an entry in the example fails here)."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from gpuwarden.config import settings as config
from gpuwarden.config.settings import Settings

EXAMPLE = Path(__file__).resolve().parents[2] / "config.example.toml"
COMMENTED_KEY = re.compile(r"^#\s?([a-z_][a-z0-9_]*\s*=.*)$")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(__import__("os").environ):
        if name.startswith("GPUWARDEN_") or name == "CREDENTIALS_DIRECTORY":
            monkeypatch.delenv(name)


def setting_paths(
    model: type[BaseModel], prefix: tuple[str, ...] = ()
) -> Iterator[tuple[str, ...]]:
    """Every leaf setting as a path of TOML keys (aliases such as 'lambda' included)."""
    for name, info in model.model_fields.items():
        key = info.alias or name
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from setting_paths(annotation, (*prefix, key))
        else:
            yield (*prefix, key)


def uncommented(text: str) -> dict[str, Any]:
    """The example with its commented-out optional keys ('# key = value') switched on."""
    lines = []
    for line in text.splitlines():
        m = COMMENTED_KEY.match(line.strip())
        lines.append(m.group(1) if m else line)
    return tomllib.loads("\n".join(lines))


def lookup(data: dict[str, Any], path: tuple[str, ...]) -> bool:
    node: Any = data
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


def test_example_loads_and_enables_only_the_sim() -> None:
    settings = config.load(EXAMPLE)
    assert list(settings.providers.enabled()) == ["sim"]
    assert settings.daemon.state_dir != Path("/var/lib/gpuwarden")  # usable without root


def test_every_setting_has_an_entry_in_the_example() -> None:
    data = uncommented(EXAMPLE.read_text())
    paths = list(setting_paths(Settings))
    assert len(paths) > 40  # the walk found the nested sections
    missing = [".".join(p) for p in paths if not lookup(data, p)]
    assert missing == [], f"add these to config.example.toml (with a comment): {missing}"


def test_every_entry_has_a_comment_above_it() -> None:
    bare = []
    previous = ""
    for line in EXAMPLE.read_text().splitlines():
        stripped = line.strip()
        is_key = bool(re.match(r"^[a-z_][a-z0-9_]*\s*=", stripped))
        is_commented_key = bool(COMMENTED_KEY.match(stripped))
        if (is_key or is_commented_key) and not previous.startswith("#"):
            bare.append(stripped)
        previous = stripped
    assert bare == []


def test_commented_examples_are_valid_values() -> None:
    data = uncommented(EXAMPLE.read_text())
    Settings(**data)  # raises if an optional example value is not valid


def test_no_unknown_keys_in_the_example() -> None:
    known = {".".join(p) for p in setting_paths(Settings)}
    data = uncommented(EXAMPLE.read_text())

    def leaves(node: dict[str, Any], prefix: str = "") -> Iterator[str]:
        for key, value in node.items():
            if isinstance(value, dict):
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}"

    assert sorted(set(leaves(data)) - known) == []
