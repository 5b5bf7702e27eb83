"""gpuwarden: rents cloud GPUs, runs diffusion jobs, and never lets one bill past its deadline."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType

__version__ = "0.1.0"


class _SkipOptionalExtras:
    """While structlog or httpx is being imported, their optional extras are reported
    missing, as both libraries allow (each imports them under `except ImportError`):
    structlog's rich tracebacks and greenlet-local context, httpx's command-line client
    (click, rich, pygments). The daemon renders its own plain tracebacks
    (system/logs.py), keeps context in contextvars and has no use for httpx's CLI, and
    these imports cost about a quarter of a second of every daemon start.

    Only the imports made from inside those two libraries' own first import are refused:
    the CLI still imports rich for its tables, and when rich was imported first, structlog
    finds it as before."""

    EXTRAS = frozenset({"rich", "click", "pygments", "greenlet"})
    HOSTS = ("structlog", "httpx")

    def find_spec(
        self, name: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if name.partition(".")[0] in self.EXTRAS and any(map(_importing, self.HOSTS)):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None  # every other import goes on to the usual finders


def _importing(name: str) -> bool:
    """True while the module's own first import runs (importlib marks its spec)."""
    spec = getattr(sys.modules.get(name), "__spec__", None)
    return bool(getattr(spec, "_initializing", False))


if not any(isinstance(f, _SkipOptionalExtras) for f in sys.meta_path):
    sys.meta_path.insert(0, _SkipOptionalExtras())
