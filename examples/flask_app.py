"""A metered Flask API: ``python examples/flask_app.py`` serves it on http://127.0.0.1:5000.

``PORT`` changes the port. The ledger is the embedded default (``$METERED_DATABASE_URL``,
else ``sqlite:///metered.db`` in the working directory). API keys map to subjects; try::

    curl -X POST -H 'X-API-Key: demo-free' localhost:5000/v1/generate
    curl -X POST -H 'X-API-Key: demo-free' -H 'Idempotency-Key: job-1' localhost:5000/v1/generate
    curl -H 'X-API-Key: demo-free' localhost:5000/v1/reports/usage         # 403: free plan
    curl -H 'X-API-Key: demo-pro' localhost:5000/v1/reports/usage
    curl -N -X POST -H 'X-API-Key: demo-pro' localhost:5000/v1/chat         # streamed tokens
    curl -H 'X-API-Key: demo-free' localhost:5000/v1/balance

Importing this module builds the app and touches no database (``create_schema`` runs in
:func:`main`), so tests and WSGI servers can import ``app`` or call :func:`create_app`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from flask import Flask, Response, abort, g, request, stream_with_context

from metered import Ledger, Plan
from metered.integrations.flask import (
    Metered,
    PaymentRequired,
    consumes,
    current_ticket,
    requires_entitlement,
    settle,
)

PLANS = [
    Plan("free", features={"api_calls": 100, "tokens": 1_000}),
    Plan(
        "pro",
        prices=["price_pro_monthly"],
        features={"api_calls": 10_000, "tokens": 100_000, "reports": True},
    ),
]

API_KEYS = {"demo-free": "user_free", "demo-pro": "user_pro"}
"""In a real app: a table of hashed API keys."""


def create_app(ledger: Ledger | None = None) -> Flask:
    """The example app on ``ledger`` (default: the embedded SQLite ledger)."""
    app = Flask(__name__)
    ledger = ledger or Ledger(plans=PLANS, default_plan="free")
    metered = Metered(app, ledger=ledger, subject=lambda: g.get("subject"))

    @app.before_request
    def authenticate() -> None:
        g.subject = API_KEYS.get(request.headers.get("X-API-Key", ""))

    @app.errorhandler(402)
    def upgrade(error: PaymentRequired) -> tuple[dict[str, Any], int]:
        # The default body is already problem+json; this adds a link to the pricing page.
        return {**error.problem(), "upgrade_url": "https://example.com/pricing"}, 402

    @app.post("/v1/generate")
    @consumes(1, feature="api_calls")
    def generate() -> dict[str, Any]:
        ticket = current_ticket()
        replayed = ticket is not None and ticket.replayed
        return {"result": "generated", "replayed": replayed}

    @app.get("/v1/reports/usage")
    @requires_entitlement("reports")
    @consumes(5, feature="api_calls")
    def usage_report() -> dict[str, Any]:
        history = metered.ledger.history(g.subject, feature="api_calls", limit=20)
        return {"entries": [entry.model_dump(mode="json") for entry in history]}

    @app.post("/v1/chat")
    @consumes(200, feature="tokens")  # hold the most a reply can cost, charge what it used
    def chat() -> Response:
        def reply() -> Iterator[str]:
            words = ["metered", "charges", "only", "for", "what", "was", "streamed", "to", "you"]
            for word in words:
                yield word + " "
            settle(len(words))  # one token per word, known once the reply is complete

        return Response(stream_with_context(reply()), mimetype="text/plain")

    @app.get("/v1/balance")
    def balance() -> dict[str, Any]:
        if g.subject is None:
            abort(401)
        result = metered.ledger.balance(g.subject, "api_calls")
        return result.model_dump(mode="json")

    return app


app = create_app()


def main() -> None:
    """Create the ledger's tables, give the demo subjects their plans, serve."""
    ledger = app.extensions["metered"].ledger
    ledger.create_schema()
    if ledger.check("user_pro", "reports").plan != "pro":
        ledger.assign_plan("user_pro", "pro")
    app.run(port=int(os.environ.get("PORT", "5000")))


if __name__ == "__main__":
    main()
