"""Fixtures the integration tests share."""

from __future__ import annotations

from pathlib import Path

import pytest
from wheel_support import build_wheel


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package's wheel, built once per test run (about 6 s) for every test that installs
    or inspects it: the wheel tests and the install test's venv step."""
    return build_wheel(tmp_path_factory.mktemp("wheel"))
