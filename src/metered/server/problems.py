"""Problem documents of the HTTP API.

Denials the framework adapters also produce (402, 403, 409, 503, ...) are the adapters' own
classes from :mod:`metered.integrations._policy`, so both render the same bodies. The API
adds authentication, validation, reservation and billing problems in the same RFC 9457 form.
"""

from __future__ import annotations

import logging
from typing import Any

from metered.errors import (
    IdempotencyKeyMismatch,
    InvalidFeature,
    InvalidInput,
    InvalidKey,
    InvalidSubject,
    InvalidUnits,
    LedgerUnavailable,
    MeteredError,
    NotMeteredFeature,
    OperationInProgress,
    ReservationError,
    ReservationExpired,
    ReservationNotFound,
    ReservationSettled,
    UnknownFeature,
    UnknownPlan,
)
from metered.integrations._policy import (
    Denial,
    IdempotencyKeyReused,
    InvalidIdempotencyKey,
    RequestInProgress,
    ServiceUnavailable,
    denial_for,
)
from metered.results import Reason

logger = logging.getLogger("metered.server")


class ApiKeyRequired(Denial):
    status, slug, title = 401, "api-key-required", "Authentication required"


class InvalidApiKey(Denial):
    status, slug, title = 401, "invalid-api-key", "Invalid API key"


class ApiKeyWrongMode(InvalidApiKey):
    slug, title = "api-key-wrong-mode", "API key of the other mode"


class InvalidRequest(Denial):
    """422 with field errors (``errors``), like a request body that does not validate."""

    status, slug, title = 422, "invalid-request", "Invalid request"

    def __init__(self, detail: str, errors: list[dict[str, Any]]) -> None:
        super().__init__(detail, errors=errors)


class NoSuchReservation(Denial):
    status, slug, title = 404, "reservation-not-found", "Reservation not found"


class ReservationGone(Denial):
    status, slug, title = 410, "reservation-expired", "Reservation expired"


class ReservationConflict(Denial):
    status, slug, title = 409, "reservation-settled", "Reservation already settled"


class BillingNotConfigured(Denial):
    status, slug, title = 501, "billing-not-configured", "Stripe billing is not configured"


class CheckoutRefused(Denial):
    status, slug, title = 400, "checkout-refused", "Checkout session refused"


class PaymentProviderError(Denial):
    status, slug, title = 502, "payment-provider-error", "Stripe request failed"


def field_error(field: str, message: str, kind: str, *, where: str = "body") -> InvalidRequest:
    return InvalidRequest(message, [{"loc": [where, field], "msg": message, "type": kind}])


def units_denied(reason: Reason | None, feature: str, usage_remaining: int, units: int) -> Denial:
    """402/403 for units not taken: the adapters' body plus ``ok: false, consumed: 0``."""
    denial = denial_for(reason, feature, usage_remaining=usage_remaining, units_requested=units)
    denial.fields.update(ok=False, consumed=0)
    return denial


_FIELDS: tuple[tuple[type[MeteredError], str, str], ...] = (
    (InvalidSubject, "subject_ref", "invalid_subject"),
    (InvalidFeature, "feature", "invalid_feature"),
    (UnknownFeature, "feature", "unknown_feature"),
    (NotMeteredFeature, "feature", "not_metered"),
    (UnknownPlan, "plan", "unknown_plan"),
    (InvalidUnits, "units", "invalid_units"),
)


def problem_for(exc: MeteredError, *, method: str, key: str | None) -> Denial:
    """The problem to answer for an error the ledger raised."""
    if isinstance(exc, Denial):
        return exc
    if isinstance(exc, LedgerUnavailable):
        logger.error("metered.unavailable", extra={"metered": {"error": str(exc)}})
        return ServiceUnavailable("The usage ledger is unreachable; try again shortly.")
    if isinstance(exc, OperationInProgress):
        return RequestInProgress(
            "A request with this idempotency key is still being processed.", key=key
        )
    if isinstance(exc, IdempotencyKeyMismatch):
        return IdempotencyKeyReused(str(exc), key=key)
    if isinstance(exc, InvalidKey):
        return InvalidIdempotencyKey(str(exc))
    if isinstance(exc, ReservationNotFound):
        return NoSuchReservation(str(exc))
    if isinstance(exc, ReservationExpired):
        return ReservationGone(str(exc))
    if isinstance(exc, ReservationSettled):
        return ReservationConflict(str(exc), state=exc.state)
    if isinstance(exc, ReservationError):
        return ReservationConflict(str(exc))
    for cls, field, kind in _FIELDS:
        if isinstance(exc, cls):
            where = "body" if method == "POST" else ("path" if field == "subject_ref" else "query")
            return field_error(field, str(exc), kind, where=where)
    if isinstance(exc, InvalidInput):
        return InvalidRequest(str(exc), [{"loc": ["body"], "msg": str(exc), "type": "invalid"}])
    logger.error("metered.server_error", exc_info=exc)
    return Denial(str(exc))  # an unexpected MeteredError: 400 with its message
