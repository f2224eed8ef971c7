"""Response bodies of the webhook endpoints, shared by the Flask and Starlette adapters."""

from __future__ import annotations

from typing import Any

from metered.integrations._policy import PROBLEM_BASE, PROBLEM_CONTENT_TYPE
from metered.stripe.errors import StripeBillingError, WebhookProcessingError
from metered.stripe.handlers import WebhookResult


def success_body(result: WebhookResult) -> dict[str, Any]:
    return {"received": True, "event_id": result.event_id, "outcome": result.outcome}


def error_body(exc: StripeBillingError) -> tuple[dict[str, Any], int, str]:
    """An RFC 9457 problem for a refused or failed delivery: ``(body, status, content type)``."""
    if isinstance(exc, WebhookProcessingError):
        # The cause stays in the server log; Stripe only needs to know to retry.
        slug, title = "stripe-event-failed", "Stripe event could not be applied"
        detail = f"event {exc.event_id} was not applied and will be retried"
    else:
        slug, title, detail = "stripe-webhook-rejected", "Invalid Stripe webhook", str(exc)
    body = {
        "type": PROBLEM_BASE + slug,
        "title": title,
        "status": exc.http_status,
        "detail": detail,
    }
    return body, exc.http_status, PROBLEM_CONTENT_TYPE
