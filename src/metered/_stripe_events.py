"""Building and signing Stripe webhook events the way Stripe does (no pytest, no stripe SDK).

Used by the pytest plugin (:mod:`metered.testing`), ``metered demo`` and ``metered webhooks
replay``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from typing import Any

DEFAULT_WEBHOOK_SECRET = "whsec_metered_test_secret"


def sign_stripe_payload(payload: bytes, secret: str, *, timestamp: int | None = None) -> str:
    """A ``Stripe-Signature`` header for ``payload``: ``t=<ts>,v1=<HMAC-SHA256>``."""
    ts = int(time.time()) if timestamp is None else timestamp
    signed = f"{ts}.".encode() + payload
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return f"t={ts},v1={digest}"


class StripeEventFactory:
    """Builds Stripe event envelopes and signs them with the webhook secret.

    >>> body, headers = events.signed("customer.subscription.updated", subscription_object)
    >>> client.post("/stripe/webhook", data=body, headers=headers)          # Flask
    >>> client.post("/stripe/webhook", content=body, headers=headers)       # httpx / Starlette
    """

    def __init__(
        self,
        secret: str = DEFAULT_WEBHOOK_SECRET,
        *,
        livemode: bool = False,
        api_version: str = "2025-03-31.basil",
    ) -> None:
        self.secret = secret
        self.livemode = livemode
        self.api_version = api_version

    def event(
        self,
        type: str,
        obj: dict[str, Any],
        *,
        created: int | None = None,
        event_id: str | None = None,
        previous_attributes: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """An event envelope around ``obj`` (a Stripe object as a dict)."""
        data: dict[str, Any] = {"object": obj}
        if previous_attributes is not None:
            data["previous_attributes"] = previous_attributes
        return {
            "id": event_id or f"evt_{secrets.token_hex(12)}",
            "object": "event",
            "api_version": self.api_version,
            "created": int(time.time()) if created is None else created,
            "livemode": self.livemode,
            "pending_webhooks": 1,
            "request": {"id": None, "idempotency_key": None},
            "type": type,
            "data": data,
        }

    def sign(self, payload: bytes, *, timestamp: int | None = None) -> dict[str, str]:
        """Headers for posting ``payload`` as Stripe would."""
        return {
            "Stripe-Signature": sign_stripe_payload(payload, self.secret, timestamp=timestamp),
            "Content-Type": "application/json",
        }

    def signed(
        self, type: str, obj: dict[str, Any], **event_options: Any
    ) -> tuple[bytes, dict[str, str]]:
        """``(body, headers)`` for an event, ready for a test client's post."""
        body = json.dumps(self.event(type, obj, **event_options)).encode()
        return body, self.sign(body)
