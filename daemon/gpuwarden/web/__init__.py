"""The HTTP listener: the local dashboard, its live event stream and /metrics."""
