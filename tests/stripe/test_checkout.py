"""Checkout: the exact parameters sent to Stripe through the injected HTTP client, and the
success-page sync that re-fetches a session and applies it like the webhook would."""

from __future__ import annotations

from typing import Any

import pytest
from stripe_support import (
    API_KEY,
    DAY,
    MONTH,
    PACK,
    T0,
    Env,
    Request,
    api_error,
    checkout_session,
    new_id,
    subscription,
)

from metered.errors import InvalidInput, InvalidSubject, UnknownPlan
from metered.stripe import CheckoutError, LivemodeMismatch

SUCCESS = "https://app.example/billing/done?session={CHECKOUT_SESSION_ID}"
CANCEL = "https://app.example/billing"
SESSIONS = "/v1/checkout/sessions"


@pytest.fixture(params=["flask", "starlette-async"], ids=["sync", "async"])
def endpoint(request: pytest.FixtureRequest) -> str:
    """Checkout has no endpoint: run it on StripeBilling and on AsyncStripeBilling."""
    return str(request.param)


def _created(request: Request, match: Any) -> tuple[int, dict[str, Any]]:
    session_id = new_id("cs_test")
    return 200, {
        "id": session_id,
        "object": "checkout.session",
        "mode": request.params["mode"],
        "status": "open",
        "url": f"https://checkout.stripe.com/c/pay/{session_id}",
        "livemode": False,
    }


@pytest.fixture
def checkout_env(env: Env) -> Env:
    env.fake.route("post", SESSIONS, _created)
    return env


def _link(env: Env, subject: str, customer: str) -> None:
    session = checkout_session(
        "payment", subject=subject, customer=customer, pack=PACK, payment_status="unpaid"
    )
    env.ok("checkout.session.completed", session)


def test_subscription_checkout_parameters(checkout_env: Env) -> None:
    env = checkout_env
    session = env.billing.create_checkout_session(
        "user_1", "pro", success_url=SUCCESS, cancel_url=CANCEL
    )
    assert session.url.startswith("https://checkout.stripe.com/") and session.mode == "subscription"
    [request] = env.fake.calls("post", SESSIONS)
    assert request.params == {
        "mode": "subscription",
        "line_items[0][price]": "price_pro_monthly",
        "line_items[0][quantity]": "1",
        "success_url": SUCCESS,
        "cancel_url": CANCEL,
        "client_reference_id": "user_1",
        "metadata[metered_subject]": "user_1",
        "subscription_data[metadata][metered_subject]": "user_1",
    }
    assert request.headers["Authorization"] == f"Bearer {API_KEY}"
    key = request.headers["Idempotency-Key"]
    assert key.startswith("metered-checkout-")
    env.billing.create_checkout_session("user_1", "pro", success_url=SUCCESS, cancel_url=CANCEL)
    assert env.fake.calls("post", SESSIONS)[1].headers["Idempotency-Key"] != key


def test_pack_checkout_parameters_and_customer_reuse(checkout_env: Env) -> None:
    env = checkout_env
    env.billing.create_checkout_session(
        "user_2",
        "credits_1k",
        success_url=SUCCESS,
        cancel_url=CANCEL,
        quantity=3,
        customer_email="ada@example.com",
        idempotency_key="order-77",
    )
    first = env.fake.calls("post", SESSIONS)[0]
    pack_params = {
        "mode": "payment",
        "line_items[0][price]": "price_credits_1k",
        "line_items[0][quantity]": "3",
        "success_url": SUCCESS,
        "cancel_url": CANCEL,
        "client_reference_id": "user_2",
        "metadata[metered_subject]": "user_2",
        "metadata[metered_pack]": "credits_1k",
        "metadata[metered_quantity]": "3",
        "payment_intent_data[metadata][metered_subject]": "user_2",
        "payment_intent_data[metadata][metered_pack]": "credits_1k",
    }
    assert first.params == {
        **pack_params,
        "customer_email": "ada@example.com",
        "customer_creation": "always",
    }
    assert first.headers["Idempotency-Key"] == "order-77"

    _link(env, "user_2", "cus_ada")  # the first purchase completed: the customer is known
    env.billing.create_checkout_session(
        "user_2",
        "price_credits_1k",
        success_url=SUCCESS,
        cancel_url=CANCEL,
        quantity=3,
        customer_email="ada@example.com",
    )
    second = env.fake.calls("post", SESSIONS)[1]
    assert second.params == {**pack_params, "customer": "cus_ada"}
    assert env.billing.stripe_customer("user_2") == "cus_ada"


def test_price_choice_lookup_keys_and_extra_params(checkout_env: Env) -> None:
    env = checkout_env
    env.fake.route("get", "/v1/prices", {"object": "list", "data": [{"id": "price_resolved"}]})
    env.billing.create_checkout_session(
        "user_3",
        "pro",
        price="pro_monthly",
        success_url=SUCCESS,
        cancel_url=CANCEL,
        params={
            "allow_promotion_codes": True,
            "metadata": {"campaign": "spring", "metered_subject": "someone_else"},
            "subscription_data": {"trial_period_days": 14},
        },
    )
    [lookup] = env.fake.calls("get", "/v1/prices")
    assert lookup.params == {"lookup_keys[0]": "pro_monthly", "active": "true", "limit": "1"}
    params = env.fake.calls("post", SESSIONS)[0].params
    assert params["line_items[0][price]"] == "price_resolved"
    assert params["allow_promotion_codes"] == "true"
    assert params["metadata[campaign]"] == "spring"
    assert params["metadata[metered_subject]"] == "user_3"  # extra params cannot move it
    assert params["subscription_data[trial_period_days]"] == "14"
    assert params["subscription_data[metadata][metered_subject]"] == "user_3"

    env.billing.create_checkout_session(
        "user_3", "price_team_monthly", success_url=SUCCESS, cancel_url=CANCEL
    )
    params = env.fake.calls("post", SESSIONS)[1].params
    assert (params["mode"], params["line_items[0][price]"]) == (
        "subscription",
        "price_team_monthly",
    )


def test_bad_checkout_requests_call_nobody(checkout_env: Env) -> None:
    env = checkout_env
    create = env.billing.create_checkout_session
    urls = {"success_url": SUCCESS, "cancel_url": CANCEL}
    with pytest.raises(UnknownPlan):
        create("user_4", "enterprise", **urls)
    with pytest.raises(CheckoutError):
        create("user_4", "free", **urls)  # no Stripe price
    with pytest.raises(CheckoutError):
        create("user_4", "pro", price="price_team_monthly", **urls)
    with pytest.raises(InvalidInput):
        create("user_4", "pro", quantity=0, **urls)
    with pytest.raises(InvalidSubject):
        create("", "pro", **urls)
    assert env.fake.requests == []
    env.fake.route("get", "/v1/prices", {"object": "list", "data": []})
    with pytest.raises(CheckoutError):
        create("user_4", "pro", price="pro_monthly", **urls)


def _serve_session(env: Env, session: dict[str, Any]) -> None:
    env.fake.route("get", f"{SESSIONS}/{session['id']}", session)


def test_sync_subscription_session(checkout_env: Env) -> None:
    env = checkout_env
    subject, cus, sub = "user_5", "cus_5", "sub_5"
    period = (T0 - DAY, T0 - DAY + MONTH)
    session = checkout_session("subscription", subject=subject, customer=cus, subscription_id=sub)
    sub_obj = subscription(sub, cus, "price_pro_monthly", period=period, subject=subject)
    _serve_session(env, {**session, "subscription": sub_obj})

    result = env.billing.sync_checkout_session(session["id"])
    assert (result.outcome, result.subject, result.status) == ("applied", subject, "complete")
    [fetch] = env.fake.calls("get", f"{SESSIONS}/{session['id']}")
    assert fetch.params == {"expand[0]": "subscription", "expand[1]": "line_items"}
    check = env.ledger.check(subject, "reports")
    assert (check.allowed, check.plan) == (True, "pro")
    # The webhooks arrive afterwards: nothing new, nothing older overrides the fetched state.
    assert env.ok("checkout.session.completed", session) == "ignored"
    assert env.ok("customer.subscription.created", sub_obj, created=T0 - 60) == "stale"
    assert env.ledger.check(subject, "reports").plan == "pro"


def test_sync_payment_session_grants_once(checkout_env: Env) -> None:
    env = checkout_env
    session = checkout_session(
        "payment", subject="user_6", customer="cus_6", pack=PACK, payment_intent="pi_6"
    )
    _serve_session(env, session)
    assert env.billing.sync_checkout_session(session["id"]).outcome == "applied"
    assert env.billing.sync_checkout_session(session["id"]).outcome == "ignored"
    assert env.ok("checkout.session.completed", session) == "ignored"
    assert env.ledger.balance("user_6", "api_calls").credits == 1000


def test_sync_pack_session_by_line_items(checkout_env: Env) -> None:
    """A session created outside metered: the pack is found from the expanded line items."""
    env = checkout_env
    session = checkout_session("payment", subject="user_7", customer="cus_7", pack=None)
    session["line_items"] = {
        "object": "list",
        "data": [
            {
                "id": "li_1",
                "object": "item",
                "quantity": 2,
                "price": {"id": "price_credits_1k", "object": "price", "lookup_key": None},
            }
        ],
    }
    _serve_session(env, session)
    assert env.billing.sync_checkout_session(session["id"]).outcome == "applied"
    assert env.ledger.balance("user_7", "api_calls").credits == 2000


def test_sync_refuses_what_is_not_paid_or_not_ours(checkout_env: Env) -> None:
    env = checkout_env
    open_session = checkout_session(
        "payment",
        subject="user_8",
        customer=None,
        pack=PACK,
        status="open",
        payment_status="unpaid",
    )
    _serve_session(env, open_session)
    result = env.billing.sync_checkout_session(open_session["id"])
    assert (result.outcome, result.status) == ("ignored", "open")
    assert env.ledger.balance("user_8", "api_calls").credits == 0

    live = checkout_session("payment", subject="user_8", customer=None, pack=PACK)
    _serve_session(env, {**live, "livemode": True})
    with pytest.raises(LivemodeMismatch):
        env.billing.sync_checkout_session(live["id"])
    with pytest.raises(CheckoutError):
        env.billing.sync_checkout_session("https://evil.example/?session=cs_1")
    env.fake.route("get", f"{SESSIONS}/cs_missing", lambda r, m: api_error(404, "No such session"))
    with pytest.raises(Exception, match="No such session"):
        env.billing.sync_checkout_session("cs_missing")
