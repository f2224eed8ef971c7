"""Webhook authenticity: only correctly signed, fresh Stripe events get in; nothing else is
stored. Posted to the real endpoints (400 + problem+json), and checked on the billing API."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import stripe
from stripe_support import MONTH, SECRET, T0, Env, new_id

from metered import MeteredError
from metered.errors import ConfigurationError
from metered.stripe import (
    LivemodeMismatch,
    PayloadError,
    SignatureError,
    StripeBilling,
    WebhookRejected,
)
from metered.testing import sign_stripe_payload

OLD_SECRET = "whsec_test_old"
# Verification happens before any database work: most cases run on SQLite only; the wrong
# secret and the rotation run on every backend too.
SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
TABLES = ("metered_stripe_events", "metered_subjects", "metered_stripe_subscriptions")


def _event(env: Env) -> dict[str, object]:
    obj = env.subscription(
        new_id("sub"), new_id("cus"), "price_pro_monthly", period=(T0, T0 + MONTH), subject="u"
    )
    return env.event("customer.subscription.created", obj)


def _rejected(env: Env, body: bytes, headers: dict[str, str], needle: str) -> None:
    before = {table: env.rows(table) for table in TABLES}
    response = env.post_raw(body, headers)
    assert response.status == 400, response
    assert response.content_type.startswith("application/problem+json")
    assert response.body["status"] == 400 and needle in response.body["detail"]
    assert {table: env.rows(table) for table in TABLES} == before


def test_correct_signature_is_accepted(env: Env) -> None:
    body, headers = env.body(_event(env))
    response = env.post_raw(body, headers)
    assert (response.status, response.body["outcome"]) == (200, "applied")


def test_wrong_secret(env: Env) -> None:
    body, headers = env.body(_event(env), secret="whsec_someone_else")
    _rejected(env, body, headers, "no v1 signature matches")


@SQLITE_ONLY
def test_tampered_body(env: Env) -> None:
    body, headers = env.body(_event(env))
    tampered = body.replace(b'"price_pro_monthly"', b'"price_team_monthly"')
    assert tampered != body
    _rejected(env, tampered, headers, "no v1 signature matches")


@SQLITE_ONLY
def test_stale_and_future_timestamps(env: Env) -> None:
    now = env.clock.now_us() // 1_000_000
    for ts in (now - 301, now + 301):
        body, headers = env.body(_event(env), timestamp=ts)
        _rejected(env, body, headers, "tolerance")
    body, headers = env.body(_event(env), timestamp=now - 299)
    assert env.post_raw(body, headers).status == 200


@SQLITE_ONLY
def test_replayed_delivery_after_tolerance(env: Env) -> None:
    body, headers = env.body(_event(env))
    assert env.post_raw(body, headers).status == 200
    env.clock.advance(seconds=400)  # an attacker replays the captured request later
    _rejected(env, body, headers, "tolerance")


@SQLITE_ONLY
def test_missing_or_malformed_header(env: Env) -> None:
    headers_seen = (
        None,
        "",
        "garbage",
        "t=notanumber,v1=abc",
        "v1=abc",
        "t=1700000000",
        "t=1,v0=a",
    )
    for header in headers_seen:
        body, headers = env.body(_event(env))
        headers.pop("Stripe-Signature")
        if header is not None:
            headers["Stripe-Signature"] = header
        _rejected(env, body, headers, "Stripe-Signature" if not header else "")


def test_secret_rotation(make_env: Callable[..., Env]) -> None:
    env = make_env(webhook_secret=[SECRET, OLD_SECRET])
    for secret in (SECRET, OLD_SECRET):
        body, headers = env.body(_event(env), secret=secret)
        assert env.post_raw(body, headers).status == 200
    # During a roll Stripe signs with both secrets: any matching v1 is enough.
    body = json.dumps(_event(env)).encode()
    now = env.clock.now_us() // 1_000_000
    bogus = sign_stripe_payload(body, "whsec_unknown", timestamp=now)
    good = sign_stripe_payload(body, OLD_SECRET, timestamp=now)
    header = f"{bogus},{good.split(',')[1]}"
    assert env.post_raw(body, {"Stripe-Signature": header}).status == 200
    body, headers = env.body(_event(env), secret="whsec_retired_long_ago")
    _rejected(env, body, headers, "no v1 signature matches")


@SQLITE_ONLY
def test_signed_by_the_stripe_library(env: Env) -> None:
    body = json.dumps(_event(env)).encode()
    header = stripe.WebhookSignature.generate_signature_header(
        body.decode(), SECRET, timestamp=env.clock.now_us() // 1_000_000
    )
    assert env.post_raw(body, {"Stripe-Signature": header}).status == 200


NOT_EVENTS = [
    (b"{not json", "not JSON"),
    (b"\xff\xfe", "not JSON"),
    (b"[]", "not a Stripe event"),
    (b'{"object": "customer", "id": "cus_1"}', "not a Stripe event"),
    (b'{"object": "event", "id": "evt_1", "type": "x", "created": 1}', "data.object"),
    (b'{"object": "event", "type": "x", "created": 1, "data": {"object": {}}}', "id"),
]


@SQLITE_ONLY
def test_signed_but_not_an_event(env: Env) -> None:
    ts = env.clock.now_us() // 1_000_000
    for body, needle in NOT_EVENTS:
        headers = {"Stripe-Signature": sign_stripe_payload(body, SECRET, timestamp=ts)}
        _rejected(env, body, headers, needle)


@SQLITE_ONLY
def test_errors_are_metered_errors(env: Env) -> None:
    body, _headers = env.body(_event(env))
    with pytest.raises(SignatureError) as info:
        env.billing.handle_webhook(body, "t=1,v1=00")
    assert isinstance(info.value, WebhookRejected) and isinstance(info.value, MeteredError)
    assert info.value.http_status == 400
    with pytest.raises(PayloadError):
        payload = b"nope"
        ts = env.clock.now_us() // 1_000_000
        env.billing.handle_webhook(payload, sign_stripe_payload(payload, SECRET, timestamp=ts))
    live = {**json.loads(body), "livemode": True}
    with pytest.raises(LivemodeMismatch):
        env.billing.handle_webhook(*env.body(live)[:1], env.body(live)[1]["Stripe-Signature"])


@SQLITE_ONLY
def test_live_key_refuses_test_events(make_env: Callable[..., Env]) -> None:
    env = make_env(livemode=True)
    body, headers = env.body(_event(env))
    _rejected(env, body, headers, "test-mode")


@SQLITE_ONLY
def test_configuration_is_checked(env: Env) -> None:
    client = stripe.StripeClient("sk_test_x", http_client=env.fake)
    for secret in ("", [], ["  "]):
        with pytest.raises(ConfigurationError):
            StripeBilling(env.ledger, client=client, webhook_secret=secret)
    with pytest.raises(ConfigurationError):
        StripeBilling(env.ledger, client="sk_test_x", webhook_secret=SECRET)  # type: ignore[arg-type]
