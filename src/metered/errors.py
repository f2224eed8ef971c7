"""Exceptions raised by metered.

Every error derives from :class:`MeteredError`. Errors are for invalid input and misuse;
"not enough units" is a normal result (``ok=False``), not an exception.
"""

from __future__ import annotations


class MeteredError(Exception):
    """Base class of every error raised by metered."""


class InvalidInput(MeteredError, ValueError):
    """An argument is malformed; nothing was written."""


class InvalidUnits(InvalidInput):
    """Units must be a positive ``int`` within the range the ledger can store."""


class InvalidSubject(InvalidInput):
    """Subjects are non-empty strings of at most 255 characters."""


class InvalidKey(InvalidInput):
    """Idempotency keys are non-empty strings of at most 255 characters."""


class InvalidFeature(InvalidInput):
    """Feature names are non-empty strings of at most 100 characters."""


class ConfigurationError(MeteredError, ValueError):
    """Plans, URLs or options do not make sense together (also a ``ValueError``, like the
    pydantic ``ValidationError`` it wraps for plans that do not validate)."""


class UnknownPlan(MeteredError, LookupError):
    """The plan name is not among the configured plans."""


class UnknownFeature(MeteredError, LookupError):
    """The feature is not defined by any configured plan."""


class NotMeteredFeature(MeteredError):
    """A unit operation was asked of a boolean (access-only) feature."""


class IdempotencyKeyMismatch(MeteredError):
    """The key was already used for an operation with a different feature, amount or kind."""


class OperationInProgress(MeteredError):
    """The key belongs to a reservation that is still in flight (HTTP adapters answer 409)."""


class ReservationError(MeteredError):
    """Base class for misuse of a reservation."""


class ReservationNotFound(ReservationError, LookupError):
    """No reservation with this id exists for this subject."""


class ReservationExpired(ReservationError):
    """The reservation outlived its TTL; its units went back to the balance."""


class ReservationSettled(ReservationError):
    """The reservation was already committed or released."""

    def __init__(self, message: str, *, state: str) -> None:
        super().__init__(message)
        self.state = state


class LedgerUnavailable(MeteredError):
    """The database could not be reached or failed mid-operation; nothing was applied."""


__all__ = [
    "ConfigurationError",
    "IdempotencyKeyMismatch",
    "InvalidFeature",
    "InvalidInput",
    "InvalidKey",
    "InvalidSubject",
    "InvalidUnits",
    "LedgerUnavailable",
    "MeteredError",
    "NotMeteredFeature",
    "OperationInProgress",
    "ReservationError",
    "ReservationExpired",
    "ReservationNotFound",
    "ReservationSettled",
    "UnknownFeature",
    "UnknownPlan",
]
