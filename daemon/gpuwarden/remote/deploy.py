"""The files that go onto instances: the probe, the dead-man switch and the job runner.

They live beside this module in assets/ (package data), so that a checkout, an editable
install and an installed wheel all read the same files, through deploy_file().
"""

from __future__ import annotations

import importlib.resources


def deploy_file(name: str) -> str:
    """The text of one of the instance files in gpuwarden/remote/assets/."""
    return (importlib.resources.files("gpuwarden.remote") / "assets" / name).read_text()
