"""``metered demo``: the whole product working end to end, on this machine, in seconds.

It starts a small Flask app (``@consumes`` routes and the Stripe webhook blueprint) on a
free localhost port over the embedded SQLite default, and a local stand-in for Stripe's API
that the real ``stripe`` SDK talks to. Then it goes through what a customer's first minutes
look like: denied before paying, a Checkout Session, the signed webhooks Stripe would send
(including a duplicate delivery), metered calls until the quota runs out, a request whose
handler fails (not charged), a retried request (not charged twice), and the final balance
and history. Everything it starts is stopped before it returns, unless ``keep_running``.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

from metered._stripe_events import StripeEventFactory
from metered.ledger import Ledger
from metered.plans import Plan

PRICE = "price_demo_pro_monthly"
WEBHOOK_SECRET = "whsec_metered_demo"
PLANS = [
    Plan("free", features={}),
    Plan("pro", prices=[PRICE], features={"api_calls": 5, "reports": True}),
]
_MONTH = 30 * 24 * 3600


class StripeStandIn:
    """The two Checkout Session endpoints of Stripe's API, served locally.

    ``pay(session_id)`` plays the customer completing the payment page and returns the
    objects Stripe would then describe in its webhooks.
    """

    def __init__(self) -> None:
        self.sessions: dict[str, dict[str, Any]] = {}
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                if self.path != "/v1/checkout/sessions":
                    return self._reply(404, {"error": {"message": f"no route {self.path}"}})
                length = int(self.headers.get("Content-Length") or 0)
                form = {k: v[-1] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
                self._reply(200, stand_in._create_session(form))

            def do_GET(self) -> None:
                session = stand_in.sessions.get(self.path.rsplit("/", 1)[-1])
                if session is None:
                    return self._reply(404, {"error": {"message": "No such checkout.session"}})
                self._reply(200, session)

            def _reply(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def _create_session(self, form: dict[str, str]) -> dict[str, Any]:
        session_id = f"cs_test_demo_{secrets.token_hex(6)}"
        session = {
            "id": session_id,
            "object": "checkout.session",
            "mode": form.get("mode"),
            "status": "open",
            "payment_status": "unpaid",
            "client_reference_id": form.get("client_reference_id"),
            "metadata": {k[9:-1]: v for k, v in form.items() if k.startswith("metadata[")},
            "customer": form.get("customer"),
            "subscription": None,
            "livemode": False,
            "url": f"{self.url}/pay/{session_id}",
            "line_items_price": form.get("line_items[0][price]"),
        }
        self.sessions[session_id] = session
        return session

    def pay(self, session_id: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """Complete the session: its final state, the subscription and its first invoice."""
        session = self.sessions[session_id]
        now = int(time.time())
        customer = session["customer"] or f"cus_demo_{secrets.token_hex(5)}"
        sub_id = f"sub_demo_{secrets.token_hex(5)}"
        session.update(
            status="complete", payment_status="paid", customer=customer, subscription=sub_id
        )
        subject = session["client_reference_id"]
        period = {"current_period_start": now, "current_period_end": now + _MONTH}
        item = {
            "id": f"si_{sub_id}",
            "object": "subscription_item",
            "price": {"id": session["line_items_price"], "object": "price", "type": "recurring"},
            "quantity": 1,
            **period,
        }
        subscription = {
            "id": sub_id,
            "object": "subscription",
            "customer": customer,
            "status": "active",
            "cancel_at_period_end": False,
            "created": now,
            "items": {"object": "list", "data": [item], "has_more": False},
            "metadata": {"metered_subject": subject},
            "livemode": False,
        }
        invoice = {
            "id": f"in_demo_{secrets.token_hex(5)}",
            "object": "invoice",
            "customer": customer,
            "status": "paid",
            "billing_reason": "subscription_create",
            "amount_paid": 2000,
            "currency": "usd",
            "lines": {
                "object": "list",
                "has_more": False,
                "data": [
                    {
                        "id": "il_demo",
                        "object": "line_item",
                        "amount": 2000,
                        "period": {"start": now, "end": now + _MONTH},
                    }
                ],
            },
            "parent": {
                "type": "subscription_details",
                "subscription_details": {"subscription": sub_id, "metadata": {}},
            },
            "livemode": False,
        }
        return session, subscription, invoice

    def start(self) -> None:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def build_app(ledger: Ledger, billing: Any) -> Any:
    """The demo's Flask app: one metered route, one that fails, checkout and the webhook."""
    from flask import Flask, jsonify, request

    from metered.integrations.flask import (
        Metered,
        consumes,
        requires_entitlement,
        stripe_webhook_blueprint,
    )

    app = Flask("metered-demo")
    app.logger.disabled = True  # the failing route raises on purpose; the demo reports it
    Metered(app, ledger=ledger, subject=lambda: request.headers.get("X-Api-Key"))
    app.register_blueprint(stripe_webhook_blueprint(billing))

    @app.post("/generate")
    @consumes(1, feature="api_calls")
    def generate() -> Any:
        return jsonify(text="Here is your generated text.")

    @app.post("/generate-broken")
    @consumes(1, feature="api_calls")
    def generate_broken() -> Any:
        raise RuntimeError("the model crashed")

    @app.get("/reports")
    @requires_entitlement("reports")
    def reports() -> Any:
        return jsonify(report="monthly usage")

    @app.post("/billing/checkout")
    def checkout() -> Any:
        session = billing.create_checkout_session(
            request.headers["X-Api-Key"],
            "pro",
            success_url="http://localhost/billing/done?session={CHECKOUT_SESSION_ID}",
            cancel_url="http://localhost/billing",
        )
        return jsonify(id=session.id, url=session.url)

    return app


@contextmanager
def _serve(app: Any) -> Iterator[str]:
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _http(
    method: str, url: str, *, headers: dict[str, str] | None = None, body: bytes | None = None
) -> tuple[int, dict[str, str], Any]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, raw, got = response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as error:
        status, raw, got = error.code, error.read(), dict(error.headers)
    try:
        return status, got, json.loads(raw or b"null")
    except ValueError:
        return status, got, raw.decode(errors="replace")


def run(
    url: str | None = None,
    *,
    keep_running: bool = False,
    out: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the demo; returns a summary (used by the tests)."""
    import stripe

    from metered.cli import table
    from metered.stripe import StripeBilling

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log over the output
    stand_in = StripeStandIn()
    stand_in.start()
    summary: dict[str, Any] = {"statuses": []}
    ledger = Ledger(url, plans=PLANS, default_plan="free")
    try:
        ledger.create_schema()
        client = stripe.StripeClient("sk_test_metered_demo", base_addresses={"api": stand_in.url})
        billing = StripeBilling(ledger, client=client, webhook_secret=WEBHOOK_SECRET)
        events = StripeEventFactory(WEBHOOK_SECRET)
        subject = f"user_{secrets.token_hex(4)}"
        summary["subject"] = subject
        key = {"X-Api-Key": subject}
        with _serve(build_app(ledger, billing)) as app_url:
            out(f"metered demo: app on {app_url}, Stripe stand-in on {stand_in.url}")
            out(f"ledger: {ledger.url}; subject: {subject} (sent as X-Api-Key)\n")

            def call(step: str, method: str, path: str, **kw: Any) -> tuple[int, Any]:
                status, headers, body = _http(method, app_url + path, **kw)
                remaining = headers.get("Metered-Remaining")
                detail = ""
                if isinstance(body, dict):
                    detail = body.get("title", "") if status >= 400 else body.get("outcome", "")
                note = f"  remaining={remaining}" if remaining is not None else ""
                out(f"  {step:<44} {method} {path:<17} -> {status} {detail}{note}")
                summary["statuses"].append((step, status))
                return status, body

            out("1. Before paying, the free plan includes neither feature:")
            call("metered call", "POST", "/generate", headers=key)
            call("report", "GET", "/reports", headers=key)

            out("\n2. Checkout (through the Stripe SDK, against the stand-in):")
            _, session = call("create Checkout Session", "POST", "/billing/checkout", headers=key)
            out(f"     session {session['id']}: the customer pays at {session['url']}")
            paid, subscription, invoice = stand_in.pay(session["id"])

            out("\n3. Stripe delivers the signed webhooks; access follows them, never the URL:")
            deliveries = [
                ("checkout.session.completed", paid),
                ("customer.subscription.created", subscription),
                ("invoice.paid", invoice),
            ]
            first_body = b""
            for number, (event_type, obj) in enumerate(deliveries):
                body, headers = events.signed(event_type, obj, created=int(time.time()) + number)
                first_body = first_body or body
                call(event_type, "POST", "/stripe/webhook", headers=headers, body=body)
            call(
                "same event delivered again (duplicate)",
                "POST",
                "/stripe/webhook",
                headers=events.sign(first_body),
                body=first_body,
            )
            tampered = first_body.replace(b'"paid"', b'"free"')
            call(
                "tampered body (bad signature)",
                "POST",
                "/stripe/webhook",
                headers=events.sign(first_body),
                body=tampered,
            )
            call("report, now on pro", "GET", "/reports", headers=key)

            out("\n4. Metered calls: charged only when the handler succeeded:")
            call("handler raises: released, not charged", "POST", "/generate-broken", headers=key)
            for n in range(1, 7):
                call(
                    f"call {n} (Idempotency-Key req-{n})",
                    "POST",
                    "/generate",
                    headers={**key, "Idempotency-Key": f"req-{n}"},
                )
            call(
                "retry of call 1: replayed, not charged",
                "POST",
                "/generate",
                headers={**key, "Idempotency-Key": "req-1"},
            )

            balance = ledger.balance(subject, "api_calls")
            summary["balance"] = balance
            out("\n5. Balance and history, straight from the ledger:")
            out(
                table(
                    [balance.model_dump()],
                    [
                        "plan",
                        "status",
                        "allowance",
                        "used",
                        "held",
                        "usage_remaining",
                        "period_end",
                    ],
                )
            )
            out("")
            out(
                table(
                    [e.model_dump() for e in reversed(ledger.history(subject))],
                    ["created_at", "feature", "kind", "state", "units", "charged", "key"],
                )
            )
            if keep_running:
                out(
                    f"\nThe app keeps running on {app_url}. Try:\n"
                    f"  curl -i -X POST -H 'X-Api-Key: {subject}' {app_url}/generate\n"
                    f"  metered balance {subject} --url {ledger.url} --plans <plans file>\n"
                    "Press Ctrl-C to stop."
                )
                try:
                    while True:
                        time.sleep(3600)
                except KeyboardInterrupt:
                    out("stopping")
    finally:
        ledger.close()
        stand_in.stop()
    return summary
