"""Pure decisions: deadlines, verdicts, lease math, cost math. No I/O, no clock reads:
every function takes `now` (or the times it needs) as an argument.
"""

from __future__ import annotations

import math
from datetime import datetime

from gpuwarden.model import Billing


def billed_seconds(start: datetime, end: datetime, billing: Billing) -> float:
    """Time a provider bills between start and end, at its granularity."""
    secs = max(0.0, (end - start).total_seconds())
    if billing is Billing.PER_MINUTE:
        return math.ceil(secs / 60.0) * 60.0
    return math.ceil(secs)


def cost(price_per_hour: float, start: datetime, end: datetime, billing: Billing) -> float:
    """USD billed for a machine at `price_per_hour` from start to end."""
    return price_per_hour * billed_seconds(start, end, billing) / 3600.0
