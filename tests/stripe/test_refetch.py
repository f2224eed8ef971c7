"""``refetch=True``: each event's object is re-read from the Stripe API before it is applied,
so what counts is Stripe's current state, whatever the payload or the delivery order says."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from stripe_support import (
    DAY,
    MONTH,
    PACK,
    T0,
    Env,
    api_error,
    charge,
    checkout_session,
    entitlement_summary,
    new_id,
)

P1 = (T0 - DAY, T0 - DAY + MONTH)


@pytest.fixture(params=["flask", "starlette-async"], ids=["sync", "async"])
def endpoint(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def env(make_env: Callable[..., Env]) -> Env:
    return make_env(refetch=True, entitlement_plans={"team_seats": "team"})


def _serve(env: Env, path: str, obj: dict[str, Any]) -> None:
    env.fake._routes = [r for r in env.fake._routes if r[1].pattern != path + "$"]
    env.fake.route("get", path, obj)


def test_subscription_events_apply_the_current_object(env: Env) -> None:
    subject, cus, sub = new_id("user"), new_id("cus"), new_id("sub")
    current = env.subscription(sub, cus, "price_team_monthly", period=P1, subject=subject)
    _serve(env, f"/v1/subscriptions/{sub}", current)
    stale_payload = env.subscription(sub, cus, "price_pro_monthly", period=P1, subject=subject)
    event = env.event("customer.subscription.created", stale_payload)
    assert env.send(event).body["outcome"] == "applied"
    assert env.ledger.check(subject, "reports").plan == "team"  # the API's, not the payload's
    assert len(env.fake.calls("get", f"/v1/subscriptions/{sub}")) == 1
    assert env.send(event).body["outcome"] == "duplicate"
    assert len(env.fake.calls("get", f"/v1/subscriptions/{sub}")) == 1  # no second fetch

    # Deleted in Stripe: a late .updated (active in its payload) re-fetches and sees it.
    _serve(env, f"/v1/subscriptions/{sub}", {**current, "status": "canceled"})
    assert env.ok("customer.subscription.updated", stale_payload) == "applied"
    assert env.ledger.check(subject, "reports").plan == "free"
    # An invoice event re-fetches its subscription too.
    invoice = env.invoice(sub, cus, "price_team_monthly", period=P1, subject=subject)
    assert env.ok("invoice.paid", invoice) == "stale"
    assert env.ledger.check(subject, "reports").plan == "free"


def test_checkout_refund_and_entitlements_are_refetched(env: Env) -> None:
    subject, cus, sub = new_id("user"), new_id("cus"), new_id("sub")
    session = checkout_session("subscription", subject=subject, customer=cus, subscription_id=sub)
    expanded = env.subscription(sub, cus, "price_pro_monthly", period=P1)
    _serve(env, f"/v1/checkout/sessions/{session['id']}", {**session, "subscription": expanded})
    assert env.ok("checkout.session.completed", session) == "applied"
    assert env.ledger.check(subject, "reports").plan == "pro"  # no subscription event needed

    pi = new_id("pi")
    pack_session = checkout_session(
        "payment", subject=subject, customer=cus, payment_intent=pi, pack=PACK
    )
    _serve(env, f"/v1/checkout/sessions/{pack_session['id']}", pack_session)
    env.ok("checkout.session.completed", pack_session)
    refund = charge(pi, amount=1000, amount_refunded=100)
    _serve(
        env, f"/v1/charges/{refund['id']}", {**refund, "amount_refunded": 1000, "refunded": True}
    )
    assert env.ok("charge.refunded", refund) == "applied"
    assert env.ledger.balance(subject, "api_calls").credits == 0  # the full refund, as fetched

    # Entitlements (another customer, without a subscription in metered's view).
    other, other_cus = new_id("user"), new_id("cus")
    link = checkout_session(
        "payment", subject=other, customer=other_cus, pack=PACK, payment_status="unpaid"
    )
    _serve(env, f"/v1/checkout/sessions/{link['id']}", link)
    env.ok("checkout.session.completed", link)
    active = entitlement_summary(other_cus, ["team_seats"])["entitlements"]
    _serve(env, "/v1/entitlements/active_entitlements", active)
    summary = entitlement_summary(other_cus, [])  # the payload is out of date
    assert env.ok("entitlements.active_entitlement_summary.updated", summary) == "applied"
    [fetch] = env.fake.calls("get", "/v1/entitlements/active_entitlements")
    assert fetch.params == {"customer": other_cus, "limit": "100"}
    assert env.ledger.check(other, "reports").plan == "team"


def test_api_failure_while_refetching_is_retried_later(env: Env) -> None:
    subject, cus, sub = new_id("user"), new_id("cus"), new_id("sub")
    env.fake.route("get", f"/v1/subscriptions/{sub}", lambda r, m: api_error(500, "x", "api_error"))
    obj = env.subscription(sub, cus, "price_pro_monthly", period=P1, subject=subject)
    event = env.event("customer.subscription.created", obj)
    response = env.send(event)
    assert response.status == 500
    assert env.rows("metered_stripe_events") == []
    _serve(env, f"/v1/subscriptions/{sub}", obj)
    assert env.send(event).body["outcome"] == "applied"


def test_fetched_object_of_the_other_mode_is_refused(env: Env) -> None:
    sub = new_id("sub")
    obj = env.subscription(sub, new_id("cus"), "price_pro_monthly", period=P1, subject="u")
    _serve(env, f"/v1/subscriptions/{sub}", {**obj, "livemode": True})
    response = env.post("customer.subscription.created", obj)
    assert response.status == 400 and "live" in response.body["detail"]
