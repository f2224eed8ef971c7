"""check(): access and what is left, with machine-readable reasons; it never writes."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from ledger_support import snapshot
from metered import CheckResult, ManualClock, UnknownFeature, _core

UTC = timezone.utc


@pytest.fixture(autouse=True, params=["one-read", "full-path"])
def check_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test here runs twice: with check's one-read answer (``fresh_check``), and with
    it turned off so that the full path (``_check_result``) answers. The unrolled copy must
    agree with the rules it copies."""
    if request.param == "full-path":
        monkeypatch.setattr(_core, "fresh_check", lambda *args: None)


def test_check_fields(ledger: Any) -> None:
    ledger.assign_plan("user_1", "pro")
    ledger.consume("user_1", 250, feature="api_calls")
    check = ledger.check("user_1", "api_calls")
    assert isinstance(check, CheckResult)
    assert check.allowed is True and check.reason is None
    assert (check.subject, check.feature, check.plan, check.status) == (
        "user_1",
        "api_calls",
        "pro",
        "active",
    )
    assert check.metered is True
    assert (check.limit, check.usage_remaining) == (10_000, 9_750)
    assert check.overage_allowed is False
    assert check.period_end == datetime(2026, 2, 15, 12, tzinfo=UTC)
    boolean = ledger.check("user_1", "reports")
    assert boolean.allowed and boolean.reason is None
    assert boolean.metered is False
    assert boolean.usage_remaining is None and boolean.limit is None
    assert boolean.plan == "pro"


def test_no_entitlement_and_subscription_inactive(ledger: Any) -> None:
    for feature, metered in (("reports", False), ("tokens", True)):
        check = ledger.check("free_user", feature)
        assert (check.allowed, check.reason, check.plan) == (False, "no_entitlement", "free")
        assert check.metered is metered
    ledger.assign_plan("user_1", "pro", status="unpaid")
    for feature in ("reports", "api_calls"):
        check = ledger.check("user_1", feature)
        assert (check.allowed, check.reason, check.status) == (
            False,
            "subscription_inactive",
            "unpaid",
        )
    with pytest.raises(UnknownFeature):
        ledger.check("user_1", "storage")


def test_quota_exhausted(ledger: Any) -> None:
    ledger.consume("user_1", 99, feature="api_calls")
    check = ledger.check("user_1", "api_calls")
    assert check.allowed and check.usage_remaining == 1
    ledger.consume("user_1", 1, feature="api_calls")
    check = ledger.check("user_1", "api_calls")
    assert (check.allowed, check.reason, check.usage_remaining, check.limit) == (
        False,
        "quota_exhausted",
        0,
        100,
    )
    assert ledger.check("other", "api_calls").usage_remaining == 100  # subjects are separate
    ledger.grant("user_1", 30, feature="api_calls", key="topup")
    check = ledger.check("user_1", "api_calls")
    assert check.allowed and check.usage_remaining == 30 and check.limit == 100
    reservation = ledger.reserve("user_1", 30, feature="api_calls")  # holds count too
    check = ledger.check("user_1", "api_calls")
    assert (check.allowed, check.reason, check.usage_remaining) == (False, "quota_exhausted", 0)
    ledger.release(reservation)
    assert ledger.check("user_1", "api_calls").usage_remaining == 30


def test_overage_feature_stays_allowed(ledger: Any) -> None:
    ledger.assign_plan("user_1", "pro")
    assert ledger.consume("user_1", 1_200, feature="tokens").ok
    check = ledger.check("user_1", "tokens")
    assert check.allowed and check.reason is None
    assert (check.usage_remaining, check.limit, check.overage_allowed) == (0, 1_000, True)


def test_check_never_writes(
    ledger: Any, ledger_factory: Callable[..., Any], clock: ManualClock
) -> None:
    """Many checks in every lazy situation leave every table exactly as it was."""
    ledger.assign_plan("pro_user", "pro")
    ledger.consume("pro_user", 500, feature="api_calls")
    ledger.consume("pro_user", 1_100, feature="tokens")
    ledger.reserve("pro_user", 40, feature="api_calls", ttl=60)
    ledger.grant("pro_user", 70, feature="api_calls", expires_at=clock.now() + timedelta(days=2))
    ledger.assign_plan("late", "pro", status="past_due")
    ledger.consume("free_user", 10, feature="api_calls")

    def check_all() -> list[CheckResult]:
        return [
            ledger.check(subject, feature)
            for subject in ("pro_user", "late", "free_user", "never_seen")
            for feature in ("api_calls", "reports", "tokens")
        ]

    before = snapshot(ledger_factory.url)
    history_before = ledger.history("pro_user", limit=10_000)
    first = check_all()
    assert snapshot(ledger_factory.url) == before
    assert check_all() == first

    # the hold expires: check sees the units back, still without writing
    clock.advance(seconds=61)
    assert ledger.check("pro_user", "api_calls").usage_remaining == 10_000 - 500 + 70
    check_all()
    assert snapshot(ledger_factory.url) == before

    # the credit expires and the past_due grace runs out
    clock.advance(days=3)
    assert ledger.check("pro_user", "api_calls").usage_remaining == 10_000 - 500
    assert ledger.check("late", "reports").reason == "subscription_inactive"
    check_all()
    assert snapshot(ledger_factory.url) == before

    # a new period: check reports the fresh allowance, and still writes nothing
    clock.advance(days=40)
    rolled = ledger.check("pro_user", "api_calls")
    assert rolled.usage_remaining == 10_000
    assert rolled.period_end == datetime(2026, 3, 15, 12, tzinfo=UTC)
    assert ledger.check("free_user", "api_calls").usage_remaining == 100
    check_all()
    assert snapshot(ledger_factory.url) == before
    assert ledger.history("pro_user", limit=10_000) == history_before
