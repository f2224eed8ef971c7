"""The webhook endpoints themselves: paths, methods, exemption from metering, bodies."""

from __future__ import annotations

import pytest
from stripe_support import Env

from metered.integrations._rules import is_exempt
from metered.integrations._stripe_flask import stripe_webhook_blueprint
from metered.integrations._stripe_starlette import stripe_webhook_route

SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


@SQLITE_ONLY
def test_paths_are_exempt_from_metering(env: Env) -> None:
    billing = env.raw_billing
    stripe_webhook_blueprint(billing, url_prefix="/hooks/stripe/", path="/in")
    assert is_exempt("/hooks/stripe/in") and is_exempt("/hooks/stripe/in/")
    route = stripe_webhook_route(billing, path="/billing/stripe-events")
    assert is_exempt("/billing/stripe-events") and route.methods == {"POST"}
    assert is_exempt("/stripe/webhook")  # the defaults the env's app uses


@SQLITE_ONLY
def test_only_post_is_routed(env: Env) -> None:
    if env.kind == "flask":
        response = env._flask.get("/stripe/webhook")
        assert response.status_code == 405
    else:
        response = env._runner.run(env._http.get("/stripe/webhook"))
        assert response.status_code == 405


def test_success_body(env: Env) -> None:
    event = env.event("product.created", {"id": "prod_1", "object": "product"})
    response = env.send(event)
    assert response.status == 200 and response.content_type.startswith("application/json")
    assert response.body == {"received": True, "event_id": event["id"], "outcome": "ignored"}
