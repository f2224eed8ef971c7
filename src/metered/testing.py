"""pytest plugin: fixtures for testing your own app's metering (installed with metered).

Fixtures (all function-scoped):

``metered_plans``
    The plans your tests use. Override it in your ``conftest.py``; the default is one
    ``free`` plan with ``api_calls = 100``.
``metered_default_plan``
    The default plan name (default: the first plan). Override to change it.
``metered_clock``
    A :class:`metered.ManualClock` starting at 2026-01-01 UTC; move it with
    ``metered_clock.advance(days=31)`` to roll periods or expire reservations.
``metered_ledger``
    A fresh :class:`metered.Ledger` on SQLite in a temp dir, schema created, on that clock.
``metered_async_ledger``
    The same as an :class:`metered.AsyncLedger` (use from async tests).
``metered_stripe_events``
    A :class:`StripeEventFactory` that builds Stripe events and signs them like Stripe does,
    ready to post to your webhook endpoint through a test client.

Example::

    def test_generate_is_metered(client, metered_ledger, metered_clock):
        metered_ledger.assign_plan("user_1", "free")
        assert client.post("/generate", headers={"X-Api-Key": "user_1"}).status_code == 200
        assert metered_ledger.balance("user_1", "api_calls").used == 1
        metered_clock.advance(days=32)  # next period: the allowance is back
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from metered.clock import ManualClock
from metered.ledger import AsyncLedger, Ledger
from metered.plans import Plan

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


@pytest.fixture
def metered_plans() -> list[Plan]:
    """The plans of the test ledger. Override in your conftest.py."""
    return [Plan("free", features={"api_calls": 100})]


@pytest.fixture
def metered_default_plan(metered_plans: list[Plan]) -> str | None:
    """The default plan of the test ledger (the first plan). Override to change it."""
    return metered_plans[0].name if metered_plans else None


@pytest.fixture
def metered_clock() -> ManualClock:
    """A clock that moves only when the test says so."""
    return ManualClock(datetime(2026, 1, 1, tzinfo=timezone.utc))


@pytest.fixture
def metered_ledger(
    tmp_path: Path,
    metered_plans: list[Plan],
    metered_default_plan: str | None,
    metered_clock: ManualClock,
) -> Iterator[Ledger]:
    """A fresh SQLite-backed Ledger with its schema, on ``metered_clock``."""
    ledger = Ledger(
        f"sqlite:///{tmp_path / 'metered-test.db'}",
        plans=metered_plans,
        default_plan=metered_default_plan,
        clock=metered_clock,
    )
    ledger.create_schema()
    try:
        yield ledger
    finally:
        ledger.close()


@pytest.fixture
async def metered_async_ledger(
    tmp_path: Path,
    metered_plans: list[Plan],
    metered_default_plan: str | None,
    metered_clock: ManualClock,
) -> AsyncIterator[AsyncLedger]:
    """A fresh SQLite-backed AsyncLedger with its schema (needs an async test runner)."""
    ledger = AsyncLedger(
        f"sqlite:///{tmp_path / 'metered-test-async.db'}",
        plans=metered_plans,
        default_plan=metered_default_plan,
        clock=metered_clock,
    )
    await ledger.create_schema()
    try:
        yield ledger
    finally:
        await ledger.close()


@pytest.fixture
def metered_stripe_events() -> StripeEventFactory:
    """Builds and signs Stripe webhook events (secret: ``DEFAULT_WEBHOOK_SECRET``)."""
    return StripeEventFactory()
