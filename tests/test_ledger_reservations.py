"""consume, reserve, commit and release: holds, final amounts, overage and lazy expiry."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

from ledger_support import assert_explained, snapshot
from metered import (
    ConsumeResult,
    InvalidInput,
    ManualClock,
    Plan,
    Reservation,
    ReservationError,
    ReservationExpired,
    ReservationNotFound,
    ReservationSettled,
)

# --------------------------------------------------------------------------- consume


def test_consume_until_quota_exhausted(ledger: Any) -> None:
    result = ledger.consume("user_1", 30, feature="api_calls", key="k1")
    assert isinstance(result, ConsumeResult)
    assert (result.ok, result.consumed, result.usage_remaining, result.replayed) == (
        True,
        30,
        70,
        False,
    )
    assert (result.reason, result.subject, result.feature, result.key) == (
        None,
        "user_1",
        "api_calls",
        "k1",
    )
    assert result.overage == 0
    [entry] = [e for e in ledger.history("user_1") if e.kind == "consume"]
    assert entry.id == result.entry_id
    assert (entry.state, entry.units, entry.charged, entry.from_allowance, entry.key) == (
        "committed",
        30,
        30,
        30,
        "k1",
    )
    assert ledger.consume("user_2", 60, feature="api_calls").ok
    result = ledger.consume("user_2", 40, feature="api_calls")
    assert result.ok and result.usage_remaining == 0
    denied = ledger.consume("user_2", 1, feature="api_calls")
    assert (denied.ok, denied.consumed, denied.reason, denied.usage_remaining) == (
        False,
        0,
        "quota_exhausted",
        0,
    )
    assert denied.entry_id is None


def test_denied_consume_charges_nothing_and_records_nothing(ledger: Any) -> None:
    ledger.consume("user_1", 70, feature="api_calls")
    history = ledger.history("user_1")
    denied = ledger.consume("user_1", 31, feature="api_calls", key="big")
    assert (denied.ok, denied.reason, denied.consumed, denied.usage_remaining) == (
        False,
        "insufficient_units",
        0,
        30,
    )
    assert ledger.history("user_1") == history
    assert ledger.balance("user_1", "api_calls").used == 70
    # a denied key was never used: the same key succeeds once there are units
    ledger.grant("user_1", 1, feature="api_calls")
    assert ledger.consume("user_1", 31, feature="api_calls", key="big").ok


def test_feature_default_when_one_metered_feature(ledger_factory: Callable[..., Any]) -> None:
    ledger = ledger_factory(plans=[Plan("free", features={"api_calls": 5, "reports": True})])
    assert ledger.consume("user_1", 2).feature == "api_calls"
    reservation = ledger.reserve("user_1", 2)
    assert reservation.ok and reservation.feature == "api_calls"
    ledger.grant("user_1", 1)
    assert ledger.balance("user_1").usage_remaining == 2
    with pytest.raises(InvalidInput):  # the default catalog has two metered features
        ledger_factory().consume("user_1", 1)


# --------------------------------------------------------------------------- overage


def test_overage_past_allowance_is_recorded(ledger: Any, clock: ManualClock) -> None:
    ledger.assign_plan("user_1", "pro")
    first = ledger.consume("user_1", 800, feature="tokens")
    assert (first.ok, first.overage, first.usage_remaining) == (True, 0, 200)
    second = ledger.consume("user_1", 700, feature="tokens")
    assert (second.ok, second.consumed, second.overage, second.usage_remaining) == (
        True,
        700,
        500,
        0,
    )
    third = ledger.consume("user_1", 10, feature="tokens")
    assert (third.ok, third.overage) == (True, 10)
    balance = assert_explained(ledger, "user_1", "tokens")
    assert (balance.used, balance.overage, balance.usage_remaining) == (1_000, 510, 0)
    lines = [e for e in ledger.history("user_1", feature="tokens") if e.kind == "consume"]
    assert [(e.from_allowance, e.overage) for e in lines] == [(0, 10), (200, 500), (800, 0)]
    ledger.assign_plan("user_2", "pro")
    ledger.consume("user_2", 9_999, feature="api_calls")
    assert ledger.consume("user_2", 1_000, feature="tokens").ok
    assert ledger.balance("user_2", "api_calls").usage_remaining == 1
    assert ledger.balance("user_2", "tokens").usage_remaining == 0
    ledger.assign_plan("user_3", "pro")
    ledger.consume("user_3", 1_500, feature="tokens")
    clock.advance(days=31)
    balance = ledger.balance("user_3", "tokens")
    assert (balance.used, balance.overage, balance.usage_remaining) == (0, 0, 1_000)


def test_overage_spends_credits_before_overage(ledger: Any) -> None:
    ledger.assign_plan("user_1", "pro")
    ledger.grant("user_1", 100, feature="tokens", key="promo")
    result = ledger.consume("user_1", 1_150, feature="tokens")
    assert result.ok and result.overage == 50
    [line] = [e for e in ledger.history("user_1", feature="tokens") if e.kind == "consume"]
    assert (line.from_allowance, line.from_credit, line.overage) == (1_000, 100, 50)
    assert_explained(ledger, "user_1", "tokens")


# --------------------------------------------------------------------------- reserve


def test_reservation_fields(ledger: Any, clock: ManualClock) -> None:
    reservation = ledger.reserve("user_1", 25, feature="api_calls", key="req_1", ttl=90)
    assert isinstance(reservation, Reservation)
    assert reservation.ok and reservation.id is not None and reservation.reason is None
    assert (reservation.subject, reservation.feature, reservation.units, reservation.key) == (
        "user_1",
        "api_calls",
        25,
        "req_1",
    )
    assert reservation.expires_at == clock.now() + timedelta(seconds=90)
    assert reservation.usage_remaining == 75
    assert not reservation.replayed
    [line] = [e for e in ledger.history("user_1") if e.kind == "reserve"]
    assert (line.id, line.state, line.units, line.charged, line.key) == (
        reservation.id,
        "held",
        25,
        None,
        "req_1",
    )
    assert line.expires_at == reservation.expires_at


def test_in_flight_reservations_count_against_the_balance(ledger: Any) -> None:
    first = ledger.reserve("user_1", 60, feature="api_calls")
    assert first.ok
    balance = ledger.balance("user_1", "api_calls")
    assert (balance.held, balance.used, balance.usage_remaining) == (60, 0, 40)
    assert ledger.check("user_1", "api_calls").usage_remaining == 40
    denied = ledger.consume("user_1", 41, feature="api_calls")
    assert (denied.ok, denied.reason, denied.usage_remaining) == (False, "insufficient_units", 40)
    refused = ledger.reserve("user_1", 41, feature="api_calls")
    assert (refused.ok, refused.reason, refused.id, refused.usage_remaining) == (
        False,
        "insufficient_units",
        None,
        40,
    )
    assert ledger.reserve("user_1", 40, feature="api_calls").ok
    exhausted = ledger.reserve("user_1", 1, feature="api_calls")
    assert (exhausted.ok, exhausted.reason) == (False, "quota_exhausted")
    assert ledger.consume("user_1", 1, feature="api_calls").reason == "quota_exhausted"
    assert ledger.balance("user_1", "api_calls").held == 100
    assert_explained(ledger, "user_1")


def test_commit_the_reserved_amount(ledger: Any) -> None:
    reservation = ledger.reserve("user_1", 30, feature="api_calls", key="job")
    result = ledger.commit(reservation)
    assert (result.ok, result.consumed, result.usage_remaining, result.replayed) == (
        True,
        30,
        70,
        False,
    )
    assert (result.entry_id, result.key) == (reservation.id, "job")
    balance = assert_explained(ledger, "user_1")
    assert (balance.used, balance.held) == (30, 0)
    [line] = [e for e in ledger.history("user_1") if e.kind == "reserve"]
    assert (line.state, line.units, line.charged, line.from_allowance) == (
        "committed",
        30,
        30,
        30,
    )
    assert line.settled_at is not None


def test_commit_fewer_units_returns_the_rest(ledger: Any) -> None:
    reservation = ledger.reserve("user_1", 60, feature="api_calls")
    result = ledger.commit(reservation, units=45)
    assert (result.ok, result.consumed, result.usage_remaining) == (True, 45, 55)
    balance = assert_explained(ledger, "user_1")
    assert (balance.used, balance.held, balance.usage_remaining) == (45, 0, 55)
    [line] = [e for e in ledger.history("user_1") if e.kind == "reserve"]
    assert (line.units, line.charged) == (60, 45)
    reservation = ledger.reserve("user_2", 60, feature="api_calls")
    result = ledger.commit(reservation, units=0)
    assert (result.ok, result.consumed, result.usage_remaining) == (True, 0, 100)
    balance = assert_explained(ledger, "user_2")
    assert (balance.used, balance.held) == (0, 0)


def test_commit_more_than_reserved_when_the_balance_allows(ledger: Any) -> None:
    reservation = ledger.reserve("user_1", 30, feature="api_calls")
    result = ledger.commit(reservation, units=80)
    assert (result.ok, result.consumed, result.usage_remaining) == (True, 80, 20)
    balance = assert_explained(ledger, "user_1")
    assert (balance.used, balance.held) == (80, 0)


def test_commit_more_than_the_balance_allows_is_refused(ledger: Any) -> None:
    other = ledger.reserve("user_1", 50, feature="api_calls")
    reservation = ledger.reserve("user_1", 30, feature="api_calls")
    refused = ledger.commit(reservation, units=51)  # 100 - 50 held by the other hold
    assert (refused.ok, refused.reason, refused.consumed, refused.usage_remaining) == (
        False,
        "insufficient_units",
        0,
        50,
    )
    balance = assert_explained(ledger, "user_1")
    assert (balance.used, balance.held) == (0, 80), "the reservation is still held"
    [line] = [e for e in ledger.history("user_1") if e.id == reservation.id]
    assert line.state == "held"
    assert ledger.commit(reservation, units=50).ok  # exactly what is available
    assert ledger.commit(other).ok
    balance = assert_explained(ledger, "user_1")
    assert (balance.used, balance.held, balance.usage_remaining) == (100, 0, 0)
    ledger.consume("user_2", 60, feature="api_calls")
    reservation = ledger.reserve("user_2", 30, feature="api_calls")
    assert ledger.commit(reservation, units=41).reason == "insufficient_units"
    result = ledger.commit(reservation)
    assert (result.ok, result.consumed, result.usage_remaining) == (True, 30, 10)
    assert_explained(ledger, "user_2")


def test_overage_feature_holds_and_commits_past_the_allowance(ledger: Any) -> None:
    ledger.assign_plan("user_1", "pro")
    reservation = ledger.reserve("user_1", 100, feature="tokens")
    result = ledger.commit(reservation, units=1_500)
    assert (result.ok, result.consumed, result.overage, result.usage_remaining) == (
        True,
        1_500,
        500,
        0,
    )
    balance = assert_explained(ledger, "user_1", "tokens")
    assert (balance.used, balance.overage, balance.held) == (1_000, 500, 0)
    ledger.assign_plan("user_2", "pro")
    reservation = ledger.reserve("user_2", 1_200, feature="tokens")
    assert reservation.ok and reservation.usage_remaining == 0
    result = ledger.commit(reservation)
    assert result.ok and result.overage == 200
    assert_explained(ledger, "user_2", "tokens")


def test_release_gives_units_back_once(ledger: Any, ledger_factory: Callable[..., Any]) -> None:
    reservation = ledger.reserve("user_1", 70, feature="api_calls", key="req")
    assert ledger.release(reservation) is True
    balance = assert_explained(ledger, "user_1")
    assert (balance.used, balance.held, balance.usage_remaining) == (0, 0, 100)
    [line] = [e for e in ledger.history("user_1") if e.kind == "reserve"]
    assert (line.state, line.charged, line.key) == ("released", None, "req")
    assert line.settled_at is not None
    reservation = ledger.reserve("user_2", 70, feature="api_calls")
    assert ledger.release(reservation) is True
    before = snapshot(ledger_factory.url)
    assert ledger.release(reservation) is False
    assert snapshot(ledger_factory.url) == before
    assert ledger.balance("user_2", "api_calls").usage_remaining == 100


def test_settled_reservations_cannot_settle_again(
    ledger: Any, ledger_factory: Callable[..., Any]
) -> None:
    reservation = ledger.reserve("user_1", 10, feature="api_calls")
    ledger.commit(reservation)
    before = snapshot(ledger_factory.url)
    with pytest.raises(ReservationSettled) as raised:
        ledger.commit(reservation)
    assert raised.value.state == "committed"
    with pytest.raises(ReservationSettled):
        ledger.commit(reservation, units=5)
    with pytest.raises(ReservationSettled):  # releasing a committed reservation
        ledger.release(reservation)
    assert snapshot(ledger_factory.url) == before
    assert ledger.balance("user_1", "api_calls").used == 10
    reservation = ledger.reserve("user_2", 10, feature="api_calls")
    ledger.release(reservation)
    before = snapshot(ledger_factory.url)
    with pytest.raises(ReservationSettled) as raised:
        ledger.commit(reservation)
    assert raised.value.state == "released"
    assert snapshot(ledger_factory.url) == before
    assert ledger.balance("user_2", "api_calls").used == 0


def test_expired_reservation_gives_units_back_without_a_job(
    ledger: Any, ledger_factory: Callable[..., Any], clock: ManualClock
) -> None:
    reservation = ledger.reserve("user_1", 60, feature="api_calls", ttl=30)
    clock.advance(seconds=29)
    assert ledger.balance("user_1", "api_calls").usage_remaining == 40
    clock.advance(seconds=1)  # expires_at reached
    assert ledger.check("user_1", "api_calls").usage_remaining == 100
    balance = ledger.balance("user_1", "api_calls")
    assert (balance.held, balance.used, balance.usage_remaining) == (0, 0, 100)
    before = snapshot(ledger_factory.url)
    with pytest.raises(ReservationExpired):
        ledger.commit(reservation)
    with pytest.raises(ReservationExpired):
        ledger.commit(reservation, units=1)
    assert ledger.release(reservation) is False
    assert snapshot(ledger_factory.url) == before
    # the units really are spendable again, and the next write settles the line lazily
    assert ledger.consume("user_1", 100, feature="api_calls").ok
    [line] = [e for e in ledger.history("user_1") if e.kind == "reserve"]
    assert (line.state, line.charged) == ("expired", None)
    with pytest.raises(ReservationExpired):
        ledger.commit(reservation)
    assert assert_explained(ledger, "user_1").used == 100


def test_default_and_configured_ttl(ledger_factory: Callable[..., Any], clock: ManualClock) -> None:
    ledger = ledger_factory()
    reservation = ledger.reserve("user_1", 10, feature="api_calls")
    assert reservation.expires_at == clock.now() + timedelta(minutes=5)
    short = ledger_factory(reservation_ttl=timedelta(seconds=5))
    held = short.reserve("user_2", 10, feature="api_calls")
    assert held.expires_at == clock.now() + timedelta(seconds=5)
    clock.advance(seconds=5)
    assert short.balance("user_2", "api_calls").held == 0
    assert ledger.balance("user_1", "api_calls").held == 10
    with pytest.raises(ReservationExpired):
        short.commit(held)
    assert ledger.commit(reservation).ok


def test_nothing_to_settle(ledger: Any) -> None:
    refused = ledger.reserve("user_1", 101, feature="api_calls")
    assert not refused.ok
    with pytest.raises(ReservationError):
        ledger.commit(refused)
    assert ledger.release(refused) is False
    assert ledger.balance("user_1", "api_calls").usage_remaining == 100
    with pytest.raises(InvalidInput):
        ledger.commit({"id": 1, "subject": "user_1"})
    with pytest.raises(InvalidInput):
        ledger.release(None)


def test_reservation_of_another_subject_is_not_found(
    ledger: Any, ledger_factory: Callable[..., Any]
) -> None:
    reservation = ledger.reserve("user_1", 10, feature="api_calls")
    ledger.consume("user_2", 1, feature="api_calls")
    before = snapshot(ledger_factory.url)
    for forged in (
        reservation.model_copy(update={"subject": "user_2"}),  # user_2 has an account
        reservation.model_copy(update={"subject": "user_3"}),  # user_3 has none
        reservation.model_copy(update={"id": reservation.id + 1}),  # type: ignore[operator]
    ):
        with pytest.raises(ReservationNotFound):
            ledger.commit(forged)
        with pytest.raises(ReservationNotFound):
            ledger.release(forged)
    assert snapshot(ledger_factory.url) == before
    assert ledger.commit(reservation).ok


def test_hold_from_the_last_period_commits_into_the_new_one(
    ledger: Any, clock: ManualClock
) -> None:
    ledger.assign_plan("user_1", "free")
    ledger.consume("user_1", 80, feature="api_calls")
    clock.advance(days=31, minutes=-1)  # one minute before the period ends
    reservation = ledger.reserve("user_1", 20, feature="api_calls", ttl=600)
    assert reservation.ok
    clock.advance(minutes=2)  # the new period: allowance back, the hold still counts
    balance = ledger.balance("user_1", "api_calls")
    assert (balance.used, balance.held, balance.usage_remaining) == (0, 20, 80)
    assert ledger.commit(reservation).ok
    balance = assert_explained(ledger, "user_1")
    assert (balance.used, balance.held, balance.usage_remaining) == (20, 0, 80)
