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

from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest

from metered._stripe_events import (  # re-exported: users sign events in their own tests
    DEFAULT_WEBHOOK_SECRET,
    StripeEventFactory,
    sign_stripe_payload,
)
from metered.clock import ManualClock
from metered.ledger import AsyncLedger, Ledger
from metered.plans import Plan

__all__ = [  # the fixtures register themselves; these are for users' own helpers
    "DEFAULT_WEBHOOK_SECRET",
    "StripeEventFactory",
    "sign_stripe_payload",
]


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
