"""``/v1/checkout/session`` and ``/v1/webhooks/stripe``: with a duck-typed billing object, and
with the real :class:`metered.stripe.AsyncStripeBilling` over a stubbed Stripe API."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest
from server_support import PLANS, FakeBilling

from metered import AsyncLedger, Ledger, ManualClock
from metered.server import create_app
from metered.testing import StripeEventFactory

stripe = pytest.importorskip("stripe")  # the webhook bodies are metered.stripe's own
pytestmark = pytest.mark.slow
SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
CHECKOUT = {
    "subject_ref": "u1",
    "plan": "pro",
    "success_url": "https://app.example/done?session={CHECKOUT_SESSION_ID}",
    "cancel_url": "https://app.example/billing",
}
SIGNED = {"Stripe-Signature": "t=1,v1=good", "Content-Type": "application/json"}


def problem(response: httpx.Response, status: int, slug: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["type"] == f"urn:metered:problem:{slug}"
    return body


# --------------------------------------------------------------------------- duck-typed billing


@SQLITE_ONLY
async def test_checkout(client: httpx.AsyncClient, billing: FakeBilling) -> None:
    response = await client.post("/v1/checkout/session", json=CHECKOUT)
    assert response.status_code == 200
    assert response.json() == {
        "id": "cs_test_1",
        "url": "https://checkout.stripe.com/c/pay/cs_test_1",
    }
    assert billing.sessions == [
        {"subject": "u1", "plan": "pro", "success_url": CHECKOUT["success_url"]}
    ]


@SQLITE_ONLY
async def test_checkout_errors(client: httpx.AsyncClient) -> None:
    post = client.post
    body = problem(
        await post("/v1/checkout/session", json={**CHECKOUT, "plan": "nope"}),
        422,
        "invalid-request",
    )
    assert body["errors"][0]["loc"] == ["body", "plan"]
    problem(
        await post("/v1/checkout/session", json={**CHECKOUT, "plan": "free"}),
        400,
        "checkout-refused",
    )
    body = problem(
        await post("/v1/checkout/session", json={**CHECKOUT, "plan": "down"}),
        502,
        "payment-provider-error",
    )
    assert "ConnectionError" in body["detail"]
    missing = {k: v for k, v in CHECKOUT.items() if k != "cancel_url"}
    body = problem(await post("/v1/checkout/session", json=missing), 422, "invalid-request")
    assert body["errors"][0]["loc"] == ["body", "cancel_url"]
    del client.headers["Authorization"]
    problem(await post("/v1/checkout/session", json=CHECKOUT), 401, "api-key-required")


@SQLITE_ONLY
async def test_webhook(client: httpx.AsyncClient, billing: FakeBilling) -> None:
    del client.headers["Authorization"]  # Stripe sends no API key: the signature is the proof
    response = await client.post("/v1/webhooks/stripe", content=b'{"id": "evt_1"}', headers=SIGNED)
    assert response.status_code == 200
    assert response.json() == {"received": True, "event_id": "evt_1", "outcome": "ignored"}
    assert billing.deliveries == [(b'{"id": "evt_1"}', "t=1,v1=good")]  # the raw bytes

    headers = {**SIGNED, "Stripe-Signature": "t=1,v1=forged"}
    response = await client.post("/v1/webhooks/stripe", content=b"{}", headers=headers)
    assert problem(response, 400, "stripe-webhook-rejected")["detail"] == "bad signature"
    response = await client.post("/v1/webhooks/stripe", content=b"{}")
    problem(response, 400, "stripe-webhook-rejected")
    assert billing.deliveries[-1][1] is None
    headers = {**SIGNED, "Stripe-Signature": "fail"}
    response = await client.post("/v1/webhooks/stripe", content=b"{}", headers=headers)
    problem(response, 500, "stripe-event-failed")


@SQLITE_ONLY
async def test_billing_routes_without_billing_answer_501(
    ledger: AsyncLedger, keys: dict[str, str], make_client: Callable[..., httpx.AsyncClient]
) -> None:
    async with make_client(create_app(ledger), keys["test"]) as client:
        response = await client.post("/v1/checkout/session", json=CHECKOUT)
        problem(response, 501, "billing-not-configured")
        response = await client.post("/v1/webhooks/stripe", content=b"{}", headers=SIGNED)
        problem(response, 501, "billing-not-configured")


# --------------------------------------------------------------------------- AsyncStripeBilling

WEBHOOK_SECRET = "whsec_server_test"


class StubStripe(stripe.HTTPClient):  # type: ignore[misc]
    """Answers the Stripe API calls checkout makes; records them. No network."""

    name = "metered-server-stub"

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.fail = False

    def request(
        self, method: str, url: str, headers: Any, post_data: Any = None, *, _usage: Any = None
    ) -> tuple[str, int, dict[str, str]]:
        path = urlsplit(url).path
        raw = post_data.decode() if isinstance(post_data, bytes) else post_data or ""
        self.requests.append((method.lower(), path, dict(parse_qsl(raw))))
        if self.fail:
            error = {"error": {"type": "api_error", "message": "Stripe is having a bad day"}}
            return json.dumps(error), 500, {}
        if (method.lower(), path) == ("post", "/v1/checkout/sessions"):
            session = {
                "id": "cs_test_stub",
                "object": "checkout.session",
                "url": "https://checkout.stripe.com/c/pay/cs_test_stub",
                "livemode": False,
            }
            return json.dumps(session), 200, {"request-id": "req_stub"}
        return json.dumps({"error": {"type": "invalid_request_error", "message": path}}), 404, {}

    async def request_async(
        self, method: str, url: str, headers: Any, post_data: Any = None
    ) -> tuple[bytes, int, dict[str, str]]:
        body, status, response_headers = self.request(method, url, headers, post_data)
        return body.encode(), status, response_headers

    def close(self) -> None:
        pass

    async def close_async(self) -> None:
        pass


@pytest.fixture(params=["async", "sync"])
async def stripe_app(
    request: pytest.FixtureRequest,
    ledger: AsyncLedger,
    db_url: str,
    clock: ManualClock,
    keys: dict[str, str],
    make_client: Callable[..., httpx.AsyncClient],
) -> AsyncIterator[tuple[httpx.AsyncClient, StubStripe]]:
    """The app with ``AsyncStripeBilling`` on its AsyncLedger, or ``StripeBilling`` on a
    blocking Ledger of the same database (its calls then run on worker threads)."""
    from metered.stripe import AsyncStripeBilling, StripeBilling

    stub = StubStripe()
    client = stripe.StripeClient("sk_test_server", http_client=stub, max_network_retries=0)
    sync_ledger = None
    if request.param == "async":
        billing: Any = AsyncStripeBilling(ledger, client=client, webhook_secret=WEBHOOK_SECRET)
    else:
        sync_ledger = Ledger(db_url, plans=PLANS, default_plan="free", clock=clock)
        billing = StripeBilling(sync_ledger, client=client, webhook_secret=WEBHOOK_SECRET)
    app = create_app(ledger, billing=billing)  # mode from the key: test
    assert app.state.metered_mode == "test"
    try:
        async with make_client(app, keys["test"]) as http:
            yield http, stub
    finally:
        if sync_ledger is not None:
            sync_ledger.close()


def subscription_event(subject: str, start: int) -> tuple[bytes, dict[str, str]]:
    item = {
        "id": "si_1",
        "object": "subscription_item",
        "price": {"id": "price_pro_monthly", "object": "price", "livemode": False},
        "quantity": 1,
        "current_period_start": start,
        "current_period_end": start + 31 * 86_400,
    }
    subscription = {
        "id": "sub_1",
        "object": "subscription",
        "customer": "cus_1",
        "status": "active",
        "cancel_at_period_end": False,
        "created": start,
        "items": {"object": "list", "data": [item], "has_more": False},
        "metadata": {"metered_subject": subject},
        "livemode": False,
    }
    events = StripeEventFactory(WEBHOOK_SECRET)
    body = json.dumps(
        events.event("customer.subscription.created", subscription, created=start)
    ).encode()
    return body, events.sign(body, timestamp=start)


async def test_checkout_with_stripe_billing(
    stripe_app: tuple[httpx.AsyncClient, StubStripe],
) -> None:
    client, stub = stripe_app
    response = await client.post("/v1/checkout/session", json=CHECKOUT)
    assert response.status_code == 200, response.text
    assert response.json()["id"] == "cs_test_stub"
    [(method, path, params)] = stub.requests
    assert (method, path) == ("post", "/v1/checkout/sessions")
    assert params["client_reference_id"] == "u1"
    assert params["line_items[0][price]"] == "price_pro_monthly"

    response = await client.post("/v1/checkout/session", json={**CHECKOUT, "plan": "free"})
    problem(response, 400, "checkout-refused")
    response = await client.post("/v1/checkout/session", json={**CHECKOUT, "plan": "gold"})
    assert problem(response, 422, "invalid-request")["errors"][0]["loc"] == ["body", "plan"]
    stub.fail = True
    response = await client.post("/v1/checkout/session", json=CHECKOUT)
    problem(response, 502, "payment-provider-error")


async def test_webhook_with_stripe_billing(
    stripe_app: tuple[httpx.AsyncClient, StubStripe], ledger: AsyncLedger, clock: ManualClock
) -> None:
    client, _ = stripe_app
    check = {"subject_ref": "u7", "feature": "reports"}
    assert (await client.post("/v1/access/check", json=check)).json()["allowed"] is False

    body, headers = subscription_event("u7", int(clock.now().timestamp()))
    response = await client.post("/v1/webhooks/stripe", content=body, headers=headers)
    assert response.status_code == 200, response.text
    assert response.json()["outcome"] == "applied"
    again = await client.post("/v1/webhooks/stripe", content=body, headers=headers)
    assert again.json()["outcome"] == "duplicate"

    result = (await client.post("/v1/access/check", json=check)).json()
    assert result["allowed"] is True and result["plan"] == "pro"
    consumed = await client.post("/v1/usage/consume", json={"subject_ref": "u7", "units": 1})
    assert consumed.json()["usage_remaining"] == 999

    forged = {**headers, "Stripe-Signature": headers["Stripe-Signature"][:-4] + "0000"}
    response = await client.post("/v1/webhooks/stripe", content=body, headers=forged)
    problem(response, 400, "stripe-webhook-rejected")
    assert (await ledger.balance("u7", "api_calls")).allowance == 1000
