"""Fault knobs of the simulated cloud, per simulated provider.

The starting values come from `providers.sim.faults` in the config; `POST /_sim/faults` changes
them at run time, either for both providers (a flat object) or for one
(`{"vast": {...}, "lambda": {...}}`). Rates are drawn from one seeded random.Random so that a
test run with a given seed sees the same sequence of failures.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any, Literal

from pydantic import ValidationError

from gpuwarden.config.settings import SimFaultSettings
from gpuwarden.sim.ledger import ProviderKind

KINDS: tuple[ProviderKind, ...] = ("vast", "lambda")
Roll = Literal["429", "5xx"] | None


class FaultError(ValueError):
    """A knob update that does not validate; the admin endpoint answers 400 with it."""


class FaultState:
    def __init__(self, base: SimFaultSettings) -> None:
        self._by_kind: dict[ProviderKind, SimFaultSettings] = dict.fromkeys(KINDS, base)
        self._rng = random.Random(base.seed)  # noqa: S311 - reproducible faults, not secrets
        self.injected: Counter[str] = Counter()  # "vast:5xx" -> how many were answered

    def get(self, kind: ProviderKind) -> SimFaultSettings:
        return self._by_kind[kind]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: v.model_dump(mode="json") for k, v in self._by_kind.items()}
        out["injected"] = dict(self.injected)
        return out

    def update(self, patch: dict[str, Any], kind: ProviderKind | None = None) -> None:
        """Apply `patch` (knob -> value) to one provider or both. All or nothing."""
        patch = dict(patch)
        if kind is None and any(k in patch for k in KINDS):
            nested = {k: patch.pop(k) for k in KINDS if k in patch}
            for k, sub in nested.items():
                if not isinstance(sub, dict):
                    raise FaultError(f"{k}: expected an object of knobs")
            updated = {k: self._merged(k, {**patch, **nested.get(k, {})}) for k in KINDS}
        else:
            kinds = KINDS if kind is None else (kind,)
            updated = {k: self._merged(k, patch) for k in kinds}
        self._by_kind.update(updated)
        if "seed" in patch:
            self._rng.seed(int(patch["seed"]))

    def _merged(self, kind: ProviderKind, patch: dict[str, Any]) -> SimFaultSettings:
        data = self._by_kind[kind].model_dump()
        data.update(patch)
        try:
            return SimFaultSettings.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
            )
            raise FaultError(problems) from None

    def roll(self, kind: ProviderKind) -> Roll:
        """Whether this API call fails before it is handled: 429, 5xx, or not at all."""
        f = self._by_kind[kind]
        rolled: Roll = None
        if f.rate_429 and self._rng.random() < f.rate_429:
            rolled = "429"
        elif f.rate_5xx and self._rng.random() < f.rate_5xx:
            rolled = "5xx"
        if rolled:
            self.injected[f"{kind}:{rolled}"] += 1
        return rolled

    def chance(self, p: float) -> bool:
        """True with probability `p` (from the seeded draws)."""
        return p > 0 and self._rng.random() < p

    def choice(self, options: tuple[int, ...]) -> int:
        return self._rng.choice(options)

    def take(
        self, kind: ProviderKind, knob: Literal["create_error_exists", "destroy_noop"]
    ) -> bool:
        """Use up one of a counted knob; True if one was left."""
        f = self._by_kind[kind]
        left: int = getattr(f, knob)
        if left <= 0:
            return False
        self._by_kind[kind] = f.model_copy(update={knob: left - 1})
        self.injected[f"{kind}:{knob}"] += 1
        return True
