"""The simulated cloud: Vast.ai- and Lambda-compatible HTTP APIs and real SSH hosts on
loopback, with a billing ledger and fault knobs. See server.SimCloud."""

from gpuwarden.sim.server import SimCloud, SimUrls

__all__ = ["SimCloud", "SimUrls"]
