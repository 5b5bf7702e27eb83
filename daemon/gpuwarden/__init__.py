"""gpuwarden: rents cloud GPUs, runs diffusion jobs, and never lets one bill past its deadline."""

__version__ = "0.1.0"
