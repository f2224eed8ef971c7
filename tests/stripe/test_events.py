"""Every Stripe event metered acts on, posted signed to the real webhook endpoints (Flask,
Starlette async, Starlette sync) on SQLite and PostgreSQL, in both payload generations: the
lifecycle test runs each generation on every endpoint; the others alternate generations by
endpoint (see ``make_env``)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from stripe_support import (
    DAY,
    MONTH,
    PACK,
    T0,
    Env,
    charge,
    checkout_session,
    deleted_customer,
    entitlement_summary,
    new_id,
)

from metered.clock import from_us

GENERATION = pytest.mark.parametrize("generation", ["basil", "acacia"])
MakeEnv = Callable[..., Env]


def _at(seconds: int) -> Any:
    return from_us(seconds * 1_000_000)


def _ids() -> tuple[str, str, str]:
    return new_id("user"), new_id("cus"), new_id("sub")


@GENERATION
def test_subscription_lifecycle(make_env: MakeEnv, generation: str) -> None:
    env = make_env(generation)
    subject, cus, sub = _ids()
    p1 = (T0 - DAY, T0 - DAY + MONTH)

    def subscription(**changes: Any) -> dict[str, Any]:
        changes.setdefault("period", p1)
        return env.subscription(sub, cus, "price_pro_monthly", subject=subject, **changes)

    def invoice(period: tuple[int, int], **changes: Any) -> dict[str, Any]:
        return env.invoice(sub, cus, "price_pro_monthly", period=period, subject=subject, **changes)

    # Checkout completes: the customer is linked, but access waits for the subscription.
    session = checkout_session("subscription", subject=subject, customer=cus, subscription_id=sub)
    assert env.ok("checkout.session.completed", session) == "applied"
    assert env.billing.stripe_customer(subject) == cus
    assert not env.ledger.check(subject, "reports").allowed

    assert env.ok("customer.subscription.created", subscription()) == "applied"
    check = env.ledger.check(subject, "reports")
    assert (check.allowed, check.plan, check.status) == (True, "pro", "active")
    balance = env.ledger.balance(subject, "api_calls")
    assert (balance.allowance, balance.period_start, balance.period_end) == (
        1000,
        _at(p1[0]),
        _at(p1[1]),
    )
    assert env.ok("invoice.paid", invoice(p1, billing_reason="subscription_create")) == "applied"
    assert env.ledger.consume(subject, 300, feature="api_calls").ok

    assert env.ok("customer.subscription.updated", subscription(cancel_at_period_end=True))
    assert env.subject_row(subject)["cancel_at_period_end"]
    assert env.ok("customer.subscription.updated", subscription()) == "applied"
    assert not env.subject_row(subject)["cancel_at_period_end"]

    # Renewal: invoice.paid for the next period resets the allowance.
    p2 = (p1[1], p1[1] + MONTH)
    env.clock.set(_at(p2[0] + 30))
    assert env.ok("invoice.paid", invoice(p2)) == "applied"
    balance = env.ledger.balance(subject, "api_calls")
    assert (balance.used, balance.usage_remaining, balance.period_start) == (0, 1000, _at(p2[0]))

    # Payment fails at the next renewal: past_due keeps access for the grace period only.
    p3 = (p2[1], p2[1] + MONTH)
    env.clock.set(_at(p3[0] + 30))
    assert env.ok("invoice.payment_failed", invoice(p3, status="open")) == "applied"
    check = env.ledger.check(subject, "reports")
    assert (check.allowed, check.status) == (True, "past_due")
    env.clock.advance(days=4)
    assert env.ledger.check(subject, "reports").reason == "subscription_inactive"

    # Paused: no access on pro, so the subject falls back to the default plan; resumed: pro.
    assert env.ok("customer.subscription.paused", subscription(status="paused", period=p3))
    check = env.ledger.check(subject, "api_calls")
    assert (check.plan, check.status, check.allowed) == ("free", "active", True)
    assert env.ok("customer.subscription.resumed", subscription(period=p3)) == "applied"
    assert env.ledger.check(subject, "reports").plan == "pro"

    # Deleted: back to the default plan; an older .updated arriving late changes nothing,
    # and neither does a newer one: a canceled subscription never comes back.
    deleted = env.event("customer.subscription.deleted", subscription(status="canceled", period=p3))
    assert env.send(deleted).body["outcome"] == "applied"
    assert env.ledger.check(subject, "reports").plan == "free"
    late = subscription(period=p3)
    assert env.ok("customer.subscription.updated", late, created=deleted["created"] - 5) == "stale"
    assert env.ok("customer.subscription.updated", late) == "stale"
    assert env.ok("invoice.paid", invoice(p3)) == "stale"
    assert env.ledger.check(subject, "reports").plan == "free"


def test_deleted_keeps_plan_with_status_when_configured(make_env: MakeEnv) -> None:
    env = make_env(on_inactive="status")
    subject, cus, sub = _ids()
    period = (T0 - DAY, T0 - DAY + MONTH)
    obj = env.subscription(sub, cus, "price_team_monthly", period=period, subject=subject)
    env.ok("customer.subscription.created", obj)
    env.ok("customer.subscription.deleted", {**obj, "status": "canceled"})
    check = env.ledger.check(subject, "reports")
    assert (check.plan, check.status, check.reason) == ("team", "canceled", "subscription_inactive")


def test_created_after_updated_is_stale(env: Env) -> None:
    subject, cus, sub = _ids()
    period = (T0 - DAY, T0 - DAY + MONTH)
    created = env.event(
        "customer.subscription.created",
        env.subscription(sub, cus, "price_pro_monthly", period=period, subject=subject),
    )
    updated = env.event(
        "customer.subscription.updated",
        env.subscription(sub, cus, "price_team_monthly", period=period, subject=subject),
    )
    assert env.send(updated).body["outcome"] == "applied"
    assert env.send(created).body["outcome"] == "stale"
    assert env.ledger.check(subject, "reports").plan == "team"
    # Same second: .created still loses to .updated (precedence within a second).
    tie = env.event(
        "customer.subscription.created",
        env.subscription(sub, cus, "price_pro_monthly", period=period, subject=subject),
        created=updated["created"],
    )
    assert env.send(tie).body["outcome"] == "stale"


def test_plan_by_lookup_key_and_unknown_price(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    subject, cus, sub = _ids()
    period = (T0 - DAY, T0 - DAY + MONTH)
    by_key = env.subscription(
        sub, cus, "price_1NewId", period=period, subject=subject, lookup_key="pro_monthly"
    )
    env.ok("customer.subscription.created", by_key)
    assert env.ledger.check(subject, "reports").plan == "pro"

    caplog.set_level(logging.WARNING, logger="metered.stripe")
    unknown = env.subscription(sub, cus, "price_enterprise", period=period, subject=subject)
    assert env.post("customer.subscription.updated", unknown).status == 200
    assert env.ledger.check(subject, "reports").plan == "pro"  # unknown price: plan kept
    assert "price_enterprise" in caplog.text

    other = new_id("user")
    fresh = env.subscription(new_id("sub"), new_id("cus"), "price_x", period=period, subject=other)
    assert env.post("customer.subscription.created", fresh).status == 200
    assert env.ledger.check(other, "api_calls").plan == "free"


def test_unknown_and_irrelevant_events_are_acknowledged(env: Env) -> None:
    before = env.rows("metered_stripe_events")
    assert env.ok("product.created", {"id": "prod_1", "object": "product"}) == "ignored"
    assert env.rows("metered_stripe_events") == before
    one_off = {"id": "in_1", "object": "invoice", "customer": "cus_x", "lines": {"data": []}}
    assert env.ok("invoice.paid", one_off) == "ignored"  # not a subscription invoice


def test_duplicate_delivery_changes_nothing(env: Env) -> None:
    subject, cus, _ = _ids()
    pi = new_id("pi")
    session = checkout_session(
        "payment", subject=subject, customer=cus, payment_intent=pi, pack=PACK
    )
    event = env.event("checkout.session.completed", session)
    assert env.send(event).body["outcome"] == "applied"
    snapshot = {t: env.rows(t) for t in ("metered_operations", "metered_stripe_events")}
    for _ in range(3):
        response = env.send(event)
        assert (response.status, response.body["outcome"]) == (200, "duplicate")
    assert {t: env.rows(t) for t in snapshot} == snapshot
    assert env.ledger.balance(subject, "api_calls").credits == 1000
    # Processed ids are kept well past Stripe's 3 days of retries, then pruned.
    env.clock.advance(days=29)
    env.billing.prune_events()
    assert len(env.rows("metered_stripe_events")) == 1
    env.clock.advance(days=2)
    env.billing.prune_events()
    assert env.rows("metered_stripe_events") == []


def test_credit_pack_purchase_and_refunds(make_env: MakeEnv) -> None:
    env = make_env()
    subject, cus, _ = _ids()
    pi = new_id("pi")
    session = checkout_session(
        "payment", subject=subject, customer=cus, payment_intent=pi, pack=PACK, quantity=2
    )
    assert env.ok("checkout.session.completed", session) == "applied"
    assert env.ledger.balance(subject, "api_calls").credits == 2000
    history = env.ledger.history(subject)
    assert [(e.kind, e.units, e.key) for e in history if e.kind == "grant"] == [
        ("grant", 2000, f"stripe-checkout-{session['id']}")
    ]
    # The same session again (e.g. a success-page sync raced the webhook): no second grant.
    assert env.ok("checkout.session.async_payment_succeeded", session) == "ignored"
    assert env.ledger.balance(subject, "api_calls").credits == 2000

    assert env.ledger.consume(subject, 100 + 1500, feature="api_calls").ok  # allowance, then 1500
    assert env.ledger.balance(subject, "api_calls").credits == 500
    # 25% refunded: 500 credits to take back, all still unspent.
    assert env.ok("charge.refunded", charge(pi, amount=2000, amount_refunded=500)) == "applied"
    assert env.ledger.balance(subject, "api_calls").credits == 0
    # Fully refunded: 1500 more, but they were spent; never below zero.
    assert env.ok("charge.refunded", charge(pi, amount=2000, amount_refunded=2000)) == "applied"
    balance = env.ledger.balance(subject, "api_calls")
    assert (balance.credits, balance.used) == (0, 100)
    # An older refund event (smaller cumulative amount) arriving late changes nothing.
    assert env.ok("charge.refunded", charge(pi, amount=2000, amount_refunded=500)) == "stale"
    # A refund of something that is not a pack is ignored.
    assert env.ok("charge.refunded", charge(new_id("pi"), amount=900, amount_refunded=900)) == (
        "ignored"
    )


def test_refund_before_purchase_fails_and_is_retried(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    subject, cus, _ = _ids()
    pi = new_id("pi")
    refund = env.event(
        "charge.refunded",
        charge(pi, amount=1000, amount_refunded=1000, metadata={"metered_subject": subject}),
    )
    failed = env.send(refund)
    assert failed.status == 500 and failed.content_type.startswith("application/problem+json")
    assert refund["id"] in failed.body["detail"]
    assert refund["id"] in caplog.text  # the failure is logged with the event id
    assert env.rows("metered_stripe_events") == []  # not marked processed
    session = checkout_session(
        "payment", subject=subject, customer=cus, payment_intent=pi, pack=PACK
    )
    env.ok("checkout.session.completed", session)
    assert env.ledger.balance(subject, "api_calls").credits == 1000
    assert env.send(refund).body["outcome"] == "applied"  # Stripe's retry
    assert env.ledger.balance(subject, "api_calls").credits == 0


def test_async_payment_succeeded_and_failed(env: Env) -> None:
    subject, cus, _ = _ids()
    pending = checkout_session(
        "payment",
        subject=subject,
        customer=cus,
        payment_intent=new_id("pi"),
        pack=PACK,
        payment_status="unpaid",
    )
    assert env.ok("checkout.session.completed", pending) == "applied"
    assert env.ledger.balance(subject, "api_calls").credits == 0
    paid = {**pending, "payment_status": "paid"}
    assert env.ok("checkout.session.async_payment_succeeded", paid) == "applied"
    assert env.ledger.balance(subject, "api_calls").credits == 1000

    other = checkout_session(
        "payment", subject=subject, customer=cus, pack=PACK, payment_status="unpaid"
    )
    env.ok("checkout.session.completed", other)
    assert env.ok("checkout.session.async_payment_failed", other) == "applied"
    assert env.ledger.balance(subject, "api_calls").credits == 1000
    statuses = {row[0]: row[5] for row in env.rows("metered_stripe_purchases")}
    assert statuses[pending["id"]] == "paid" and statuses[other["id"]] == "failed"


def test_customer_deleted(make_env: MakeEnv) -> None:
    env = make_env()
    subject, cus, sub = _ids()
    env.ok(
        "checkout.session.completed",
        checkout_session("subscription", subject=subject, customer=cus, subscription_id=sub),
    )
    period = (T0 - DAY, T0 - DAY + MONTH)
    env.ok(
        "customer.subscription.created",
        env.subscription(sub, cus, "price_pro_monthly", period=period),
    )
    assert env.ledger.check(subject, "reports").plan == "pro"  # subject via the customer link
    assert env.ok("customer.deleted", deleted_customer(cus)) == "applied"
    assert env.billing.stripe_customer(subject) is None
    assert env.ledger.check(subject, "reports").plan == "free"
    assert env.ok("customer.deleted", deleted_customer("cus_unknown")) == "ignored"


def test_entitlement_summary_maps_lookup_keys_to_plans(make_env: MakeEnv) -> None:
    env = make_env(entitlement_plans={"team_seats": "team", "pro_reports": "pro"})
    subject, cus, _ = _ids()
    env.ok(
        "checkout.session.completed",
        checkout_session("subscription", subject=subject, customer=cus, subscription_id=None),
    )
    summary = entitlement_summary(cus, ["pro_reports", "unrelated"])
    event = "entitlements.active_entitlement_summary.updated"
    assert env.ok(event, summary) == "applied"
    assert env.ledger.check(subject, "reports").plan == "pro"
    assert env.ok(event, entitlement_summary(cus, ["pro_reports", "team_seats"])) == "applied"
    assert env.ledger.check(subject, "reports").plan == "team"  # first mapped key wins
    assert env.ok(event, entitlement_summary(cus, [])) == "applied"
    assert env.ledger.check(subject, "reports").plan == "free"


def test_entitlement_summary_ignored_without_mapping(env: Env) -> None:
    summary = entitlement_summary("cus_1", ["pro_reports"])
    assert env.ok("entitlements.active_entitlement_summary.updated", summary) == "ignored"


def test_unresolved_subject_is_applied_once_linked(make_env: MakeEnv) -> None:
    env = make_env()
    subject, cus, sub = _ids()
    period = (T0 - DAY, T0 - DAY + MONTH)
    anonymous = env.subscription(sub, cus, "price_pro_monthly", period=period)  # no metadata
    assert env.ok("customer.subscription.created", anonymous) == "unresolved"
    assert (
        env.ok("invoice.paid", env.invoice(sub, cus, "price_pro_monthly", period=period))
        == "unresolved"
    )
    session = checkout_session("subscription", subject=subject, customer=cus, subscription_id=sub)
    assert env.ok("checkout.session.completed", session) == "applied"
    check = env.ledger.check(subject, "reports")
    assert (check.plan, check.status) == ("pro", "active")
    orphan = checkout_session("payment", subject=None, customer=None, pack=PACK)
    assert env.ok("checkout.session.completed", orphan) == "unresolved"


def test_livemode_mismatch_is_refused(make_env: MakeEnv) -> None:
    env = make_env()
    subject, cus, sub = _ids()
    obj = env.subscription(sub, cus, "price_pro_monthly", period=(T0, T0 + MONTH), subject=subject)
    response = env.send(env.event("customer.subscription.created", obj) | {"livemode": True})
    assert response.status == 400 and "live" in response.body["detail"]
    assert env.rows("metered_stripe_events") == []
    assert env.ledger.check(subject, "reports").plan == "free"


def test_pack_credits_can_expire(make_env: MakeEnv) -> None:
    from metered.stripe import CreditPack

    pack = CreditPack(
        price="price_trial", feature="api_calls", units=50, expires_after=timedelta(days=7)
    )
    env = make_env(credit_packs=[pack])
    subject = new_id("user")
    session = checkout_session("payment", subject=subject, customer=new_id("cus"), pack=pack)
    env.ok("checkout.session.completed", session)
    assert env.ledger.balance(subject, "api_calls").credits == 50
    env.clock.advance(days=8)
    assert env.ledger.balance(subject, "api_calls").credits == 0
