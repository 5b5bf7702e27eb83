"""The daemon's loops. Each is a Service: a name and `run()`, supervised in one TaskGroup."""

from gpuwarden.services.base import Service

__all__ = ["Service"]
