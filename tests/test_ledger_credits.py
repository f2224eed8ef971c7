"""grant(): credits spent after the allowance, soonest-expiring first; rollover of allowance."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from ledger_support import assert_explained, snapshot
from metered import GrantResult, IdempotencyKeyMismatch, InvalidInput, ManualClock

UTC = timezone.utc
START = datetime(2026, 1, 15, 12, 0, tzinfo=UTC)


def _lines(ledger: Any, subject: str, kind: str, feature: str = "api_calls") -> list[Any]:
    return [e for e in ledger.history(subject, feature=feature, limit=1000) if e.kind == kind]


def test_grant_result_and_history_line(ledger: Any) -> None:
    expires = START + timedelta(days=30)
    result = ledger.grant("user_1", 500, feature="api_calls", key="topup-cs_1", expires_at=expires)
    assert isinstance(result, GrantResult)
    assert (result.subject, result.feature, result.units, result.key, result.replayed) == (
        "user_1",
        "api_calls",
        500,
        "topup-cs_1",
        False,
    )
    assert result.expires_at == expires
    [line] = _lines(ledger, "user_1", "grant")
    assert (line.id, line.state, line.units, line.key, line.expires_at) == (
        result.entry_id,
        "applied",
        500,
        "topup-cs_1",
        expires,
    )
    balance = assert_explained(ledger, "user_1")
    assert (balance.credits, balance.usage_remaining) == (500, 600)


def test_grant_is_idempotent_by_key(ledger: Any, ledger_factory: Callable[..., Any]) -> None:
    first = ledger.grant("user_1", 50, feature="api_calls", key="promo")
    before = snapshot(ledger_factory.url)
    again = ledger.grant("user_1", 50, feature="api_calls", key="promo")
    assert again.replayed and again.entry_id == first.entry_id and again.units == 50
    assert snapshot(ledger_factory.url) == before
    assert ledger.balance("user_1", "api_calls").credits == 50
    assert len(_lines(ledger, "user_1", "grant")) == 1
    ledger.grant("user_2", 5, feature="api_calls")
    ledger.grant("user_2", 5, feature="api_calls")
    assert assert_explained(ledger, "user_2").credits == 10


def test_grant_key_reuse_with_other_terms_is_a_mismatch(
    ledger: Any, ledger_factory: Callable[..., Any]
) -> None:
    expires = START + timedelta(days=7)
    ledger.grant("user_1", 50, feature="api_calls", key="promo", expires_at=expires)
    before = snapshot(ledger_factory.url)
    with pytest.raises(IdempotencyKeyMismatch):
        ledger.grant("user_1", 60, feature="api_calls", key="promo", expires_at=expires)
    with pytest.raises(IdempotencyKeyMismatch):
        ledger.grant("user_1", 50, feature="api_calls", key="promo")
    with pytest.raises(IdempotencyKeyMismatch):
        ledger.grant(
            "user_1", 50, feature="api_calls", key="promo", expires_at=expires + timedelta(1)
        )
    with pytest.raises(IdempotencyKeyMismatch):
        ledger.grant("user_1", 50, feature="tokens", key="promo", expires_at=expires)
    assert snapshot(ledger_factory.url) == before
    assert ledger.grant("user_1", 50, feature="api_calls", key="promo", expires_at=expires).replayed


def test_credits_are_spent_after_the_allowance(ledger: Any) -> None:
    ledger.grant("user_1", 50, feature="api_calls", key="promo")
    first = ledger.consume("user_1", 30, feature="api_calls")
    assert first.usage_remaining == 120
    second = ledger.consume("user_1", 100, feature="api_calls")
    assert second.ok and second.usage_remaining == 20
    lines = _lines(ledger, "user_1", "consume")
    assert [(e.from_allowance, e.from_credit) for e in lines] == [(70, 30), (30, 0)]
    balance = assert_explained(ledger, "user_1")
    assert (balance.used, balance.credits, balance.usage_remaining) == (100, 20, 20)
    assert ledger.consume("user_1", 21, feature="api_calls").reason == "insufficient_units"
    assert ledger.consume("user_1", 20, feature="api_calls").ok
    assert ledger.check("user_1", "api_calls").reason == "quota_exhausted"
    ledger.grant("user_2", 50, feature="api_calls")
    ledger.assign_plan("user_2", "free", status="canceled")
    assert ledger.consume("user_2", 1, feature="api_calls").reason == "subscription_inactive"


def test_reservations_spend_credits_on_commit(ledger: Any) -> None:
    ledger.grant("user_1", 40, feature="api_calls")
    reservation = ledger.reserve("user_1", 130, feature="api_calls")
    assert reservation.ok and reservation.usage_remaining == 10
    ledger.commit(reservation, units=120)
    [line] = _lines(ledger, "user_1", "reserve")
    assert (line.charged, line.from_allowance, line.from_credit) == (120, 100, 20)
    assert assert_explained(ledger, "user_1").credits == 20


def test_soonest_expiring_credits_are_spent_first(ledger: Any, clock: ManualClock) -> None:
    # granted out of expiry order, so insertion order cannot pass for expiry order
    ledger.grant("user_1", 10, feature="api_calls", key="forever")
    ledger.grant("user_1", 10, feature="api_calls", key="ten", expires_at=START + timedelta(10))
    ledger.grant("user_1", 10, feature="api_calls", key="five", expires_at=START + timedelta(5))
    assert ledger.consume("user_1", 100, feature="api_calls").ok  # the allowance
    assert ledger.consume("user_1", 15, feature="api_calls").ok  # five: 10, ten: 5
    assert assert_explained(ledger, "user_1").credits == 15

    clock.advance(days=6)  # "five" expires, fully spent: nothing is lost
    balance = ledger.balance("user_1", "api_calls")
    assert (balance.credits, balance.usage_remaining) == (15, 15)
    ledger.consume("user_1", 1, feature="api_calls")  # a write settles expiries lazily
    assert _lines(ledger, "user_1", "credit_expired") == []
    assert assert_explained(ledger, "user_1").credits == 14

    clock.advance(days=5)  # "ten" expires with 4 unspent
    balance = ledger.balance("user_1", "api_calls")
    assert (balance.credits, balance.usage_remaining) == (10, 10)
    ledger.consume("user_1", 1, feature="api_calls")
    [expired] = _lines(ledger, "user_1", "credit_expired")
    assert expired.units == 4
    assert assert_explained(ledger, "user_1").credits == 9


def test_expiry_between_writes_uses_the_right_credit(ledger: Any, clock: ManualClock) -> None:
    """Spend, let the spent-from credit expire with no write in between, then look."""
    ledger.grant("user_1", 20, feature="api_calls", key="later", expires_at=START + timedelta(9))
    ledger.grant("user_1", 20, feature="api_calls", key="soon", expires_at=START + timedelta(2))
    ledger.consume("user_1", 105, feature="api_calls")  # 5 from "soon"
    clock.advance(days=3)  # "soon" expires with 15 unspent; "later" is untouched
    assert ledger.check("user_1", "api_calls").usage_remaining == 20
    assert ledger.balance("user_1", "api_calls").credits == 20
    assert ledger.consume("user_1", 20, feature="api_calls").ok
    assert ledger.consume("user_1", 1, feature="api_calls").reason == "quota_exhausted"
    [expired] = _lines(ledger, "user_1", "credit_expired")
    assert expired.units == 15
    assert assert_explained(ledger, "user_1").credits == 0


def test_expired_credits_leave_the_balance(ledger: Any, clock: ManualClock) -> None:
    ledger.consume("user_1", 100, feature="api_calls")
    ledger.grant("user_1", 50, feature="api_calls", expires_at=START + timedelta(days=2))
    assert ledger.check("user_1", "api_calls").usage_remaining == 50
    clock.advance(days=2, microseconds=-1)
    assert ledger.consume("user_1", 10, feature="api_calls").ok
    clock.advance(microseconds=1)  # expires_at reached
    check = ledger.check("user_1", "api_calls")
    assert (check.allowed, check.reason, check.usage_remaining) == (False, "quota_exhausted", 0)
    assert ledger.consume("user_1", 1, feature="api_calls").reason == "quota_exhausted"
    [expired] = _lines(ledger, "user_1", "credit_expired")
    assert expired.units == 40
    balance = assert_explained(ledger, "user_1")
    assert (balance.credits, balance.usage_remaining) == (0, 0)


def test_credits_survive_period_rollover_until_they_expire(ledger: Any, clock: ManualClock) -> None:
    ledger.grant("user_1", 50, feature="api_calls", key="forever")
    ledger.grant("user_1", 30, feature="api_calls", key="40d", expires_at=START + timedelta(40))
    ledger.consume("user_1", 120, feature="api_calls")  # 100 allowance + 20 from "40d"
    clock.advance(days=31)  # next period
    balance = ledger.balance("user_1", "api_calls")
    assert (balance.used, balance.credits, balance.usage_remaining) == (0, 60, 160)
    result = ledger.consume("user_1", 100, feature="api_calls")
    assert result.ok and result.usage_remaining == 60
    assert assert_explained(ledger, "user_1").credits == 60
    clock.advance(days=10)  # "40d" expires with 10 left
    balance = ledger.balance("user_1", "api_calls")
    assert (balance.credits, balance.usage_remaining) == (50, 50)
    assert ledger.consume("user_1", 50, feature="api_calls").ok
    assert ledger.consume("user_1", 1, feature="api_calls").reason == "quota_exhausted"
    assert assert_explained(ledger, "user_1").credits == 0


def test_grant_in_the_past_is_refused(ledger: Any, ledger_factory: Callable[..., Any]) -> None:
    ledger.consume("user_1", 1, feature="api_calls")
    before = snapshot(ledger_factory.url)
    for when in (START, START - timedelta(days=1)):
        with pytest.raises(InvalidInput):
            ledger.grant("user_1", 10, feature="api_calls", expires_at=when)
    with pytest.raises(InvalidInput):
        ledger.grant("user_1", 10, feature="api_calls", expires_at="2030-01-01")
    assert snapshot(ledger_factory.url) == before


# --------------------------------------------------------------------------- rollover plans


def test_rollover_carries_unused_allowance_one_period(ledger: Any, clock: ManualClock) -> None:
    ledger.assign_plan("user_1", "rollover")
    assert ledger.consume("user_1", 20, feature="api_calls").ok
    clock.advance(days=31)  # period 2: 30 unused units carried over
    period_2_end = datetime(2026, 3, 15, 12, tzinfo=UTC)
    balance = ledger.balance("user_1", "api_calls")
    assert (balance.allowance, balance.used, balance.credits, balance.usage_remaining) == (
        50,
        0,
        30,
        80,
    )
    result = ledger.consume("user_1", 60, feature="api_calls")  # 50 allowance + 10 carried
    assert result.ok and result.usage_remaining == 20
    [carried] = _lines(ledger, "user_1", "grant")
    assert (carried.units, carried.expires_at, carried.key) == (30, period_2_end, None)
    assert assert_explained(ledger, "user_1").credits == 20

    clock.set(period_2_end)  # period 3: the carried units expire; nothing new to carry
    balance = ledger.balance("user_1", "api_calls")
    assert (balance.credits, balance.usage_remaining) == (0, 50)
    assert ledger.consume("user_1", 10, feature="api_calls").ok
    [expired] = _lines(ledger, "user_1", "credit_expired")
    assert expired.units == 20
    assert len(_lines(ledger, "user_1", "grant")) == 1
    assert assert_explained(ledger, "user_1").usage_remaining == 40


def test_rollover_does_not_compound_nor_apply_without_it(ledger: Any, clock: ManualClock) -> None:
    ledger.assign_plan("user_1", "rollover")
    ledger.consume("user_1", 1, feature="api_calls")
    for months in range(1, 4):  # touch every period, spend nothing
        clock.set(datetime(2026, 1 + months, 15, 12, tzinfo=UTC))
        ledger.consume("user_1", 1, feature="api_calls")
        balance = assert_explained(ledger, "user_1")
        # at most one period's unused allowance is ever carried
        assert balance.credits <= 50, months
        assert balance.usage_remaining <= 99, months
    ledger.consume("user_2", 20, feature="api_calls")
    clock.advance(days=31)
    balance = ledger.balance("user_2", "api_calls")
    assert (balance.credits, balance.usage_remaining) == (0, 100)
    ledger.consume("user_2", 1, feature="api_calls")
    assert _lines(ledger, "user_2", "grant") == []


def test_rollover_after_an_untouched_period(ledger: Any, clock: ManualClock) -> None:
    """Nothing happened in period 2, so its whole allowance rolls into period 3."""
    ledger.assign_plan("user_1", "rollover")
    assert ledger.consume("user_1", 20, feature="api_calls").ok
    clock.set(datetime(2026, 3, 20, tzinfo=UTC))  # period 3 (Mar 15 - Apr 15)
    balance = ledger.balance("user_1", "api_calls")
    assert (balance.used, balance.credits, balance.usage_remaining) == (0, 50, 100)
    assert ledger.consume("user_1", 100, feature="api_calls").ok
    assert ledger.consume("user_1", 1, feature="api_calls").reason == "quota_exhausted"
    assert assert_explained(ledger, "user_1").credits == 0
