"""Errors of :mod:`metered.stripe`; each carries the HTTP status a webhook endpoint answers."""

from __future__ import annotations

from metered.errors import MeteredError


class StripeBillingError(MeteredError):
    """Base class of the Stripe integration's errors."""

    http_status = 400


class WebhookRejected(StripeBillingError):
    """The request is not a genuine, well-formed Stripe event (HTTP 400); nothing was stored."""


class SignatureError(WebhookRejected):
    """The ``Stripe-Signature`` header is missing, malformed, wrong or outside the tolerance."""


class PayloadError(WebhookRejected):
    """The signed body is not JSON, or not a Stripe event."""


class LivemodeMismatch(WebhookRejected):
    """An event or object is from the other mode (test vs live) than the configured API key."""


class WebhookProcessingError(StripeBillingError):
    """Applying a verified event failed (HTTP 500, so Stripe retries); it is not marked processed.

    The original exception is chained as ``__cause__``.
    """

    http_status = 500

    def __init__(self, message: str, *, event_id: str, event_type: str) -> None:
        super().__init__(message)
        self.event_id = event_id
        self.event_type = event_type


class CheckoutError(StripeBillingError):
    """A checkout session cannot be created for this plan or pack."""


__all__ = [
    "CheckoutError",
    "LivemodeMismatch",
    "PayloadError",
    "SignatureError",
    "StripeBillingError",
    "WebhookProcessingError",
    "WebhookRejected",
]
