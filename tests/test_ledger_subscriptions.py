"""assign_plan: subscription statuses, grace for past_due, billing periods and plan changes."""

from __future__ import annotations

from collections.abc import Callable
from datetime import date, datetime, timedelta, timezone
from typing import Any

import pytest

from ledger_support import assert_explained, snapshot
from metered import InvalidInput, InvalidSubject, ManualClock, Plan, Subscription, UnknownPlan

UTC = timezone.utc
START = datetime(2026, 1, 15, 12, 0, tzinfo=UTC)

GRANTING = ["active", "trialing"]
DENYING = ["canceled", "unpaid", "incomplete", "incomplete_expired", "paused"]


def test_default_plan_and_assigned_subscription(ledger: Any) -> None:
    check = ledger.check("nobody", "api_calls")
    assert check.allowed and check.reason is None
    assert (check.plan, check.status, check.limit, check.usage_remaining) == (
        "free",
        "active",
        100,
        100,
    )
    assert check.period_end == datetime(2026, 2, 15, 12, 0, tzinfo=UTC)
    sub = ledger.assign_plan("user_1", "pro", status="trialing", cancel_at_period_end=True)
    assert isinstance(sub, Subscription)
    assert (sub.subject, sub.plan, sub.status, sub.access) == ("user_1", "pro", "trialing", True)
    assert sub.cancel_at_period_end is True
    assert sub.period_start == START
    assert sub.period_end == datetime(2026, 2, 15, 12, 0, tzinfo=UTC)
    check = ledger.check("user_1", "reports")
    assert check.allowed and check.plan == "pro" and check.status == "trialing"


def test_without_default_plan_nothing_is_granted(ledger_factory: Callable[..., Any]) -> None:
    ledger = ledger_factory(default_plan=None)
    check = ledger.check("nobody", "api_calls")
    assert not check.allowed and check.reason == "no_entitlement"
    result = ledger.consume("nobody", 1, feature="api_calls")
    assert not result.ok and result.reason == "no_entitlement"
    reservation = ledger.reserve("nobody", 1, feature="api_calls")
    assert not reservation.ok and reservation.reason == "no_entitlement"
    assert ledger.history("nobody") == []
    ledger.assign_plan("nobody", "free")
    assert ledger.consume("nobody", 1, feature="api_calls").ok


def test_active_and_trialing_grant_access(ledger: Any) -> None:
    for status in GRANTING:
        subject = f"s_{status}"
        assert ledger.assign_plan(subject, "pro", status=status).access, status
        assert ledger.check(subject, "reports").allowed, status
        check = ledger.check(subject, "api_calls")
        assert check.allowed and check.usage_remaining == 10_000, status
        assert ledger.consume(subject, 10, feature="api_calls").ok, status
        assert ledger.reserve(subject, 10, feature="api_calls").ok, status


def test_other_statuses_deny(ledger: Any, clock: ManualClock) -> None:
    for status in DENYING:
        subject = f"user_{status}"
        ledger.consume(subject, 5, feature="api_calls")  # was a free user with some usage
        ledger.grant(subject, 50, feature="api_calls", key="promo")
    clock.advance(seconds=1)
    for status in DENYING:
        subject = f"user_{status}"
        sub = ledger.assign_plan(subject, "pro", status=status)
        assert sub.access is False and sub.status == status
        for feature in ("reports", "api_calls", "tokens"):
            check = ledger.check(subject, feature)
            assert not check.allowed, (status, feature)
            assert check.reason == "subscription_inactive", (status, feature)
        before = ledger.history(subject)
        result = ledger.consume(subject, 1, feature="api_calls")
        assert (result.ok, result.reason, result.consumed) == (
            False,
            "subscription_inactive",
            0,
        ), status
        tokens = ledger.consume(subject, 1, feature="tokens")  # overage does not bypass it
        assert (tokens.ok, tokens.reason) == (False, "subscription_inactive"), status
        reservation = ledger.reserve(subject, 1, feature="api_calls")
        assert (reservation.ok, reservation.reason, reservation.id) == (
            False,
            "subscription_inactive",
            None,
        ), status
        # only bookkeeping lines (a new period) may appear; no unit was spent or held
        after = ledger.history(subject)
        assert [e for e in after if e not in before and e.kind != "period"] == [], status
        # re-activating restores access, credits included
        ledger.assign_plan(subject, "pro", status="active")
        assert ledger.check(subject, "api_calls").usage_remaining == 10_000 + 50, status
        assert ledger.consume(subject, 1, feature="api_calls").ok, status
    ledger.assign_plan("user_x", "free", status="canceled")
    assert ledger.check("user_x", "reports").reason == "no_entitlement"
    assert ledger.check("user_x", "api_calls").reason == "subscription_inactive"


def test_past_due_grants_within_default_grace(ledger: Any, clock: ManualClock) -> None:
    sub = ledger.assign_plan("user_1", "pro", status="past_due")
    assert sub.access is True
    assert ledger.check("user_1", "reports").allowed
    clock.advance(days=2)
    assert ledger.consume("user_1", 10, feature="api_calls").ok
    clock.advance(days=1, seconds=-1)  # 3 days (the default grace) minus one second
    assert ledger.check("user_1", "api_calls").allowed
    assert ledger.reserve("user_1", 10, feature="api_calls").ok
    clock.advance(seconds=1)
    for feature in ("reports", "api_calls"):
        check = ledger.check("user_1", feature)
        assert not check.allowed and check.reason == "subscription_inactive", feature
    result = ledger.consume("user_1", 1, feature="api_calls")
    assert (result.ok, result.reason) == (False, "subscription_inactive")
    assert ledger.reserve("user_1", 1, feature="api_calls").reason == "subscription_inactive"
    assert ledger.balance("user_1", "api_calls").used == 10


def test_past_due_grace_is_configurable(
    ledger_factory: Callable[..., Any], clock: ManualClock
) -> None:
    ledger = ledger_factory(past_due_grace=timedelta(hours=1))
    ledger.assign_plan("user_1", "pro", status="past_due")
    clock.advance(minutes=59)
    assert ledger.consume("user_1", 1, feature="api_calls").ok
    clock.advance(minutes=1)
    assert ledger.consume("user_1", 1, feature="api_calls").reason == "subscription_inactive"
    assert ledger.check("user_1", "reports").reason == "subscription_inactive"
    ledger = ledger_factory(past_due_grace=timedelta(0))
    assert ledger.assign_plan("user_1", "pro", status="past_due").access is False
    assert ledger.check("user_1", "reports").reason == "subscription_inactive"


def test_past_due_grace_counts_from_the_first_past_due(ledger: Any, clock: ManualClock) -> None:
    """Stripe re-sends past_due on every retry; the grace must not restart each time."""
    ledger.assign_plan("user_1", "pro", status="past_due")
    clock.advance(days=2)
    assert ledger.assign_plan("user_1", "pro", status="past_due").access
    clock.advance(days=1, seconds=1)
    assert ledger.assign_plan("user_1", "pro", status="past_due").access is False
    assert ledger.check("user_1", "reports").reason == "subscription_inactive"
    # paid: access again; a later failure starts a new grace period
    assert ledger.assign_plan("user_1", "pro", status="active").access
    assert ledger.check("user_1", "reports").allowed
    clock.advance(days=10)
    assert ledger.assign_plan("user_1", "pro", status="past_due").access
    clock.advance(days=2)
    assert ledger.check("user_1", "reports").allowed


def test_explicit_period(ledger: Any, clock: ManualClock) -> None:
    start, end = datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 2, 1, tzinfo=UTC)
    sub = ledger.assign_plan("user_1", "pro", period_start=start, period_end=end)
    assert (sub.period_start, sub.period_end) == (start, end)
    assert ledger.check("user_1", "api_calls").period_end == end
    assert ledger.consume("user_1", 400, feature="api_calls").ok
    balance = ledger.balance("user_1", "api_calls")
    assert (balance.period_start, balance.period_end, balance.used) == (start, end, 400)
    clock.set(end - timedelta(microseconds=1))
    assert ledger.balance("user_1", "api_calls").used == 400
    clock.set(end)
    balance = ledger.balance("user_1", "api_calls")
    assert balance.used == 0 and balance.usage_remaining == 10_000
    assert balance.period_start == end
    assert balance.period_end == datetime(2026, 3, 1, tzinfo=UTC)
    assert ledger.consume("user_1", 7, feature="api_calls").ok
    assert assert_explained(ledger, "user_1").used == 7


def test_explicit_period_start_alone_and_naive_datetimes(ledger: Any) -> None:
    start = datetime(2026, 1, 10, tzinfo=UTC)
    sub = ledger.assign_plan("user_1", "pro", period_start=start)
    assert sub.period_end == datetime(2026, 2, 10, tzinfo=UTC)
    sub = ledger.assign_plan(
        "user_2", "pro", period_start=datetime(2026, 1, 1), period_end=datetime(2026, 2, 1)
    )
    assert sub.period_start == datetime(2026, 1, 1, tzinfo=UTC)
    assert sub.period_end == datetime(2026, 2, 1, tzinfo=UTC)


def test_short_explicit_period_is_followed_by_the_next_one(ledger: Any, clock: ManualClock) -> None:
    """A period that is not a whole month (a trial) is followed by a period starting at its end.

    When Stripe's renewal has not arrived yet, the ledger rolls over on its own; the new period
    must not overlap the one that just ended (else its usage would be counted twice).
    """
    start, end = START - timedelta(days=5), START + timedelta(days=9)  # a 14-day trial
    ledger.assign_plan("user_1", "pro", status="trialing", period_start=start, period_end=end)
    assert ledger.consume("user_1", 9_000, feature="api_calls").ok
    clock.set(end + timedelta(hours=1))
    balance = ledger.balance("user_1", "api_calls")
    assert balance.period_start == end
    assert balance.period_end == end + (datetime(2026, 2, 24) - datetime(2026, 1, 24))
    assert balance.used == 0 and balance.usage_remaining == 10_000
    assert ledger.consume("user_1", 2_000, feature="api_calls").ok
    assert assert_explained(ledger, "user_1").used == 2_000


def test_monthly_renewal_from_assignment(ledger: Any, clock: ManualClock) -> None:
    sub = ledger.assign_plan("user_1", "pro")
    assert (sub.period_start, sub.period_end) == (START, datetime(2026, 2, 15, 12, tzinfo=UTC))
    assert ledger.consume("user_1", 500, feature="api_calls").ok
    clock.advance(days=31, microseconds=-1)  # the last microsecond of the period
    assert ledger.balance("user_1", "api_calls").used == 500
    assert ledger.consume("user_1", 9_500, feature="api_calls").ok
    assert ledger.check("user_1", "api_calls").reason == "quota_exhausted"
    clock.advance(microseconds=1)  # Feb 15 12:00: the next period
    check = ledger.check("user_1", "api_calls")
    assert check.allowed and check.usage_remaining == 10_000
    assert check.period_end == datetime(2026, 3, 15, 12, tzinfo=UTC)
    assert ledger.consume("user_1", 1, feature="api_calls").ok
    balance = assert_explained(ledger, "user_1")
    assert balance.used == 1
    assert balance.period_start == datetime(2026, 2, 15, 12, tzinfo=UTC)
    periods = [e for e in ledger.history("user_1") if e.kind == "period"]
    assert [e.units for e in periods] == [10_000, 10_000]


def test_default_plan_renews_monthly_from_first_use(ledger: Any, clock: ManualClock) -> None:
    assert ledger.consume("user_1", 100, feature="api_calls").ok
    clock.advance(days=20)
    assert ledger.consume("user_1", 1, feature="api_calls").reason == "quota_exhausted"
    clock.advance(days=11)  # Feb 15 12:00
    result = ledger.consume("user_1", 1, feature="api_calls")
    assert result.ok and result.usage_remaining == 99


def test_skipped_periods_roll_to_the_current_one(ledger: Any, clock: ManualClock) -> None:
    ledger.assign_plan("user_1", "free")
    assert ledger.consume("user_1", 100, feature="api_calls").ok
    clock.set(datetime(2026, 6, 20, tzinfo=UTC))
    balance = ledger.balance("user_1", "api_calls")
    assert balance.period_start == datetime(2026, 6, 15, 12, tzinfo=UTC)
    assert balance.period_end == datetime(2026, 7, 15, 12, tzinfo=UTC)
    assert balance.used == 0
    assert ledger.consume("user_1", 100, feature="api_calls").ok
    assert ledger.consume("user_1", 1, feature="api_calls").reason == "quota_exhausted"


def test_month_end_anchor_does_not_drift(ledger: Any, clock: ManualClock) -> None:
    clock.set(datetime(2026, 1, 31, 9, 0, tzinfo=UTC))
    ledger.assign_plan("user_1", "free")
    ends = []
    for month_start in (
        datetime(2026, 2, 28, 10, tzinfo=UTC),
        datetime(2026, 3, 31, 10, tzinfo=UTC),
    ):
        clock.set(month_start)
        ends.append(ledger.check("user_1", "api_calls").period_end)
    assert ends == [datetime(2026, 3, 31, 9, tzinfo=UTC), datetime(2026, 4, 30, 9, tzinfo=UTC)]


def test_interval_months_sets_the_period_length(
    ledger_factory: Callable[..., Any], clock: ManualClock
) -> None:
    ledger = ledger_factory(
        plans=[Plan("yearly", interval_months=12, features={"api_calls": 1_000})],
        default_plan="yearly",
    )
    sub = ledger.assign_plan("user_1", "yearly")
    assert sub.period_end == datetime(2027, 1, 15, 12, tzinfo=UTC)
    assert ledger.consume("user_1", 1_000, feature="api_calls").ok
    clock.set(datetime(2026, 12, 31, tzinfo=UTC))
    assert ledger.check("user_1", "api_calls").reason == "quota_exhausted"
    clock.set(datetime(2027, 1, 15, 12, tzinfo=UTC))
    check = ledger.check("user_1", "api_calls")
    assert check.allowed and check.usage_remaining == 1_000
    assert check.period_end == datetime(2028, 1, 15, 12, tzinfo=UTC)


def test_plan_change_starts_a_new_period(ledger: Any, clock: ManualClock) -> None:
    ledger.assign_plan("user_1", "free")
    assert ledger.consume("user_1", 60, feature="api_calls").ok
    clock.advance(days=3)
    sub = ledger.assign_plan("user_1", "pro")
    assert sub.period_start == START + timedelta(days=3)
    balance = ledger.balance("user_1", "api_calls")
    assert (balance.plan, balance.allowance, balance.used) == ("pro", 10_000, 0)
    assert ledger.check("user_1", "reports").allowed
    assert ledger.consume("user_1", 10, feature="api_calls").ok
    assert_explained(ledger, "user_1")
    # downgrade: the feature the plan lacks is gone at once
    ledger.assign_plan("user_1", "free")
    assert ledger.check("user_1", "reports").reason == "no_entitlement"
    assert ledger.check("user_1", "tokens").reason == "no_entitlement"
    result = ledger.consume("user_1", 1, feature="tokens")
    assert (result.ok, result.reason) == (False, "no_entitlement")
    assert ledger.balance("user_1", "api_calls").allowance == 100


def test_reassigning_the_same_plan_keeps_period_and_usage(ledger: Any, clock: ManualClock) -> None:
    ledger.assign_plan("user_1", "pro", status="trialing")
    assert ledger.consume("user_1", 300, feature="api_calls").ok
    clock.advance(days=5)
    sub = ledger.assign_plan("user_1", "pro", status="active")
    assert sub.period_start == START
    balance = ledger.balance("user_1", "api_calls")
    assert (balance.used, balance.usage_remaining) == (300, 9_700)


def test_plan_change_within_the_same_explicit_period_keeps_usage(ledger: Any) -> None:
    """Stripe sends the current period with a plan change: usage so far still counts."""
    start, end = datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 2, 1, tzinfo=UTC)
    ledger.assign_plan("user_1", "pro", period_start=start, period_end=end)
    assert ledger.consume("user_1", 150, feature="api_calls").ok
    ledger.assign_plan("user_1", "free", period_start=start, period_end=end)
    balance = ledger.balance("user_1", "api_calls")
    assert (balance.allowance, balance.used, balance.usage_remaining) == (100, 150, 0)
    check = ledger.check("user_1", "api_calls")
    assert (check.allowed, check.reason, check.limit) == (False, "quota_exhausted", 100)
    assert ledger.consume("user_1", 1, feature="api_calls").reason == "quota_exhausted"


def test_payg_plan_has_no_allowance(ledger: Any) -> None:
    ledger.assign_plan("user_1", "payg")
    check = ledger.check("user_1", "api_calls")
    assert (check.allowed, check.reason, check.limit, check.usage_remaining) == (
        False,
        "quota_exhausted",
        0,
        0,
    )
    assert ledger.consume("user_1", 1, feature="api_calls").reason == "quota_exhausted"
    ledger.grant("user_1", 5, feature="api_calls", key="topup")
    assert ledger.consume("user_1", 5, feature="api_calls").ok
    assert ledger.consume("user_1", 1, feature="api_calls").reason == "quota_exhausted"


def test_unknown_plan_and_bad_assign_plan_arguments(
    ledger: Any, ledger_factory: Callable[..., Any]
) -> None:
    ledger.consume("user_1", 1, feature="api_calls")
    before = snapshot(ledger_factory.url)
    for plan in ("enterprise", "", "PRO", None, 3):
        with pytest.raises(UnknownPlan):
            ledger.assign_plan("user_1", plan)
    assert snapshot(ledger_factory.url) == before
    ledger.assign_plan("user_2", "pro")
    before = snapshot(ledger_factory.url)
    for status in ("Active", "deleted", "", None, "past due"):
        with pytest.raises(InvalidInput):
            ledger.assign_plan("user_2", "free", status=status)
    day = datetime(2026, 1, 1, tzinfo=UTC)
    with pytest.raises(InvalidInput):
        ledger.assign_plan("user_2", "free", period_end=day)
    with pytest.raises(InvalidInput):
        ledger.assign_plan("user_2", "free", period_start=day, period_end=day)
    with pytest.raises(InvalidInput):
        ledger.assign_plan("user_2", "free", period_start=day, period_end=day - timedelta(1))
    for bad in ("2026-01-01", date(2026, 1, 1), 1767225600):
        with pytest.raises(InvalidInput):
            ledger.assign_plan("user_2", "free", period_start=bad)
        with pytest.raises(InvalidInput):
            ledger.assign_plan("user_2", "free", period_start=day, period_end=bad)
    with pytest.raises(InvalidSubject):
        ledger.assign_plan("", "free")
    assert snapshot(ledger_factory.url) == before
    assert ledger.check("user_2", "reports").allowed
