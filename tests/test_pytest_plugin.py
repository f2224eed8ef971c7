"""The pytest plugin, exercised the way users meet it: through pytester in a fresh session."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]


def test_fixtures_work_in_a_users_suite(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
        import pytest
        from metered import Plan

        @pytest.fixture
        def metered_plans():
            free = Plan("free", features={"api_calls": 3})
            return [free, Plan("pro", features={"api_calls": 10})]
        """
    )
    pytester.makepyfile(
        """
        import hashlib, hmac, json

        def test_ledger_and_clock(metered_ledger, metered_clock):
            results = [metered_ledger.consume("u", 1).ok for _ in range(4)]
            assert results == [True, True, True, False]
            metered_clock.advance(days=32)
            assert metered_ledger.consume("u", 1).usage_remaining == 2

        def test_plans_override(metered_ledger):
            metered_ledger.assign_plan("u", "pro")
            assert metered_ledger.check("u", "api_calls").usage_remaining == 10

        def test_fresh_ledger_per_test(metered_ledger):
            assert metered_ledger.history("u") == []

        async def test_async_ledger(metered_async_ledger):
            assert (await metered_async_ledger.consume("u", 2)).usage_remaining == 1

        def test_stripe_events_are_signed(metered_stripe_events):
            body, headers = metered_stripe_events.signed("invoice.paid", {"id": "in_1"})
            event = json.loads(body)
            assert event["type"] == "invoice.paid" and event["data"]["object"]["id"] == "in_1"
            t, v1 = (part.split("=", 1)[1] for part in headers["Stripe-Signature"].split(","))
            expected = hmac.new(metered_stripe_events.secret.encode(), f"{t}.".encode() + body,
                                hashlib.sha256).hexdigest()
            assert v1 == expected
        """
    )
    result = pytester.runpytest(
        "-p",
        "no:cacheprovider",
        "-o",
        "asyncio_mode=auto",
        "-o",
        "asyncio_default_fixture_loop_scope=function",
    )
    result.assert_outcomes(passed=5)
