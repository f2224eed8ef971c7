"""The Stripe webhook endpoint as a Flask blueprint (re-exported by ``metered.integrations.flask``).

::

    app.register_blueprint(stripe_webhook_blueprint(billing))   # POST /stripe/webhook
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify, request

from metered.integrations._rules import exempt_path
from metered.stripe import StripeBilling, StripeBillingError
from metered.stripe._http import error_body, success_body


def stripe_webhook_blueprint(
    billing: StripeBilling,
    url_prefix: str = "/stripe",
    *,
    path: str = "/webhook",
    name: str = "metered_stripe",
) -> Blueprint:
    """A blueprint with ``POST <url_prefix><path>`` that feeds Stripe webhooks to ``billing``.

    Reads the raw body, answers 200 for applied, duplicate and ignored events, 400 for a bad
    signature or body (nothing stored), 500 when applying failed (Stripe retries). The path
    is exempt from metering middleware.
    """
    blueprint = Blueprint(name, __name__, url_prefix=url_prefix)
    exempt_path(url_prefix.rstrip("/") + path)

    @blueprint.post(path)
    def stripe_webhook() -> tuple[Response, int]:
        payload = request.get_data(cache=False)
        try:
            result = billing.handle_webhook(payload, request.headers.get("Stripe-Signature"))
        except StripeBillingError as exc:
            body, status, content_type = error_body(exc)
            response: Any = jsonify(body)
            response.content_type = content_type
            return response, status
        return jsonify(success_body(result)), 200

    return blueprint
