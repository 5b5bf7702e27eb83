"""Domain errors: what a user asked for cannot be done. Each has a stable string code that the
control socket puts in `error.data.code` and the CLI turns into exit code 1."""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    code = "error"

    def __init__(self, message: str, **data: Any) -> None:
        super().__init__(message)
        self.message = message
        self.data = data


class NotFound(DomainError):
    code = "not_found"


class Ambiguous(DomainError):
    """A short id that more than one instance starts with; `candidates` lists them."""

    code = "ambiguous"


class LeaseMaxExceeded(DomainError):
    code = "lease_max_exceeded"


class LeaseRefused(DomainError):
    """An extension after expiry or during termination."""

    code = "lease_refused"


class BudgetExceeded(DomainError):
    code = "budget_exceeded"


class PriceTooHigh(DomainError):
    code = "price_too_high"


class NoOffer(DomainError):
    code = "no_offer"


class QueuePaused(DomainError):
    code = "queue_paused"


class InvalidState(DomainError):
    code = "invalid_state"


class ProviderUnavailable(DomainError):
    code = "provider_error"


class InvalidInput(DomainError):
    """A request whose values are malformed (the dashboard's JSON bodies)."""

    code = "invalid_input"
