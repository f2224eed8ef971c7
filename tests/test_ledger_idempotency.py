"""Idempotency keys: scoped per subject, replayed once committed, in progress while held."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from ledger_support import assert_explained, snapshot
from metered import (
    IdempotencyKeyMismatch,
    InvalidKey,
    ManualClock,
    OperationInProgress,
)


def test_keys_are_scoped_per_subject(ledger: Any) -> None:
    a = ledger.consume("user_a", 10, feature="api_calls", key="request-1")
    b = ledger.consume("user_b", 10, feature="api_calls", key="request-1")
    assert a.ok and b.ok and not a.replayed and not b.replayed
    assert ledger.balance("user_a", "api_calls").used == 10
    assert ledger.balance("user_b", "api_calls").used == 10
    ra = ledger.reserve("user_a", 5, feature="api_calls", key="job-1")
    rb = ledger.reserve("user_b", 5, feature="api_calls", key="job-1")
    assert ra.ok and rb.ok and ra.id != rb.id
    assert ledger.commit(ra).ok and ledger.commit(rb).ok
    ga = ledger.grant("user_a", 7, feature="api_calls", key="promo")
    gb = ledger.grant("user_b", 7, feature="api_calls", key="promo")
    assert not ga.replayed and not gb.replayed
    for subject in ("user_a", "user_b"):
        balance = assert_explained(ledger, subject)
        assert (balance.used, balance.credits) == (15, 7)


def test_committed_key_replays_the_original_result(
    ledger: Any, ledger_factory: Callable[..., Any], clock: ManualClock
) -> None:
    first = ledger.consume("user_1", 30, feature="api_calls", key="usage-1")
    ledger.consume("user_1", 5, feature="api_calls")  # the balance moves on
    clock.advance(minutes=10)
    before = snapshot(ledger_factory.url)
    again = ledger.consume("user_1", 30, feature="api_calls", key="usage-1")
    assert again.replayed is True and again.ok
    assert (again.consumed, again.entry_id, again.key) == (30, first.entry_id, "usage-1")
    assert again.usage_remaining == first.usage_remaining == 70, "the original result"
    assert snapshot(ledger_factory.url) == before, "nothing charged or written again"
    assert ledger.balance("user_1", "api_calls").used == 35


def test_replays_when_empty_with_overage_and_after_a_new_period(
    ledger: Any, clock: ManualClock
) -> None:
    assert ledger.consume("user_1", 100, feature="api_calls", key="all").ok
    again = ledger.consume("user_1", 100, feature="api_calls", key="all")
    assert again.ok and again.replayed and again.consumed == 100
    ledger.assign_plan("user_2", "pro")
    first = ledger.consume("user_2", 1_300, feature="tokens", key="t")
    again = ledger.consume("user_2", 1_300, feature="tokens", key="t")
    assert again.replayed and (again.consumed, again.overage) == (1_300, first.overage) == (
        1_300,
        300,
    )
    assert ledger.balance("user_2", "tokens").overage == 300
    ledger.consume("user_3", 40, feature="api_calls", key="old")
    clock.advance(days=45)
    again = ledger.consume("user_3", 40, feature="api_calls", key="old")
    assert again.replayed and again.consumed == 40
    assert ledger.balance("user_3", "api_calls").used == 0


def test_committed_reservation_key_replays(ledger: Any, ledger_factory: Callable[..., Any]) -> None:
    reservation = ledger.reserve("user_1", 50, feature="api_calls", key="job")
    committed = ledger.commit(reservation, units=35)
    before = snapshot(ledger_factory.url)
    again = ledger.reserve("user_1", 50, feature="api_calls", key="job")
    assert again.ok and again.replayed
    assert (again.id, again.consumed) == (reservation.id, 35)
    replayed_commit = ledger.commit(again)
    assert replayed_commit.ok and replayed_commit.replayed
    assert replayed_commit.consumed == 35
    assert ledger.release(again) is False
    as_consume = ledger.consume("user_1", 50, feature="api_calls", key="job")
    assert as_consume.replayed and as_consume.consumed == 35
    assert as_consume.usage_remaining == committed.usage_remaining == 65
    assert snapshot(ledger_factory.url) == before
    assert ledger.balance("user_1", "api_calls").used == 35


def test_consumed_key_replays_as_a_reservation(ledger: Any) -> None:
    ledger.consume("user_1", 20, feature="api_calls", key="once")
    again = ledger.reserve("user_1", 20, feature="api_calls", key="once")
    assert again.ok and again.replayed and again.consumed == 20
    assert ledger.commit(again).replayed
    balance = ledger.balance("user_1", "api_calls")
    assert (balance.used, balance.held) == (20, 0)


def test_key_reused_with_different_units_or_feature(
    ledger: Any, ledger_factory: Callable[..., Any]
) -> None:
    ledger.assign_plan("user_1", "pro")
    ledger.consume("user_1", 10, feature="api_calls", key="k")
    ledger.reserve("user_1", 10, feature="api_calls", key="held")
    ledger.grant("user_1", 10, feature="api_calls", key="g")
    before = snapshot(ledger_factory.url)
    with pytest.raises(IdempotencyKeyMismatch):
        ledger.consume("user_1", 11, feature="api_calls", key="k")
    with pytest.raises(IdempotencyKeyMismatch):
        ledger.consume("user_1", 10, feature="tokens", key="k")
    with pytest.raises(IdempotencyKeyMismatch):
        ledger.reserve("user_1", 9, feature="api_calls", key="k")
    with pytest.raises(IdempotencyKeyMismatch):
        ledger.reserve("user_1", 10, feature="tokens", key="held")
    with pytest.raises(IdempotencyKeyMismatch):  # a grant's key is not a usage key
        ledger.consume("user_1", 10, feature="api_calls", key="g")
    with pytest.raises(IdempotencyKeyMismatch):  # nor the other way round
        ledger.grant("user_1", 10, feature="api_calls", key="k")
    with pytest.raises(IdempotencyKeyMismatch):
        ledger.grant("user_1", 11, feature="api_calls", key="g")
    with pytest.raises(IdempotencyKeyMismatch):
        ledger.grant("user_1", 10, feature="tokens", key="g")
    assert snapshot(ledger_factory.url) == before


def test_held_key_is_in_progress(ledger: Any, ledger_factory: Callable[..., Any]) -> None:
    reservation = ledger.reserve("user_1", 10, feature="api_calls", key="req")
    before = snapshot(ledger_factory.url)
    with pytest.raises(OperationInProgress):
        ledger.reserve("user_1", 10, feature="api_calls", key="req")
    with pytest.raises(OperationInProgress):
        ledger.consume("user_1", 10, feature="api_calls", key="req")
    assert snapshot(ledger_factory.url) == before
    assert ledger.balance("user_1", "api_calls").held == 10
    ledger.commit(reservation)
    assert ledger.consume("user_1", 10, feature="api_calls", key="req").replayed


def test_in_progress_is_not_a_mismatch() -> None:
    """The distinct error types let an HTTP adapter answer 409 for one and 422 for the other."""
    assert not issubclass(OperationInProgress, IdempotencyKeyMismatch)
    assert not issubclass(IdempotencyKeyMismatch, OperationInProgress)


def test_released_key_can_be_reserved_again(ledger: Any) -> None:
    first = ledger.reserve("user_1", 30, feature="api_calls", key="retry")
    assert ledger.release(first)
    second = ledger.reserve("user_1", 30, feature="api_calls", key="retry")
    assert second.ok and not second.replayed and second.id != first.id
    assert ledger.balance("user_1", "api_calls").held == 30
    assert ledger.release(second)
    # after a release the key is free for any amount, and for a consume too
    third = ledger.consume("user_1", 45, feature="api_calls", key="retry")
    assert third.ok and not third.replayed
    assert ledger.consume("user_1", 45, feature="api_calls", key="retry").replayed
    balance = assert_explained(ledger, "user_1")
    assert (balance.used, balance.held) == (45, 0)
    lines = [e for e in ledger.history("user_1") if e.kind == "reserve"]
    assert [line.state for line in lines] == ["released", "released"]
    assert all(line.key == "retry" for line in lines)


def test_expired_key_can_be_used_again(ledger: Any, clock: ManualClock) -> None:
    first = ledger.reserve("user_1", 30, feature="api_calls", key="crashed", ttl=10)
    clock.advance(seconds=11)
    second = ledger.reserve("user_1", 30, feature="api_calls", key="crashed")
    assert second.ok and not second.replayed and second.id != first.id
    result = ledger.commit(second)
    assert result.ok and result.usage_remaining == 70
    balance = assert_explained(ledger, "user_1")
    assert (balance.used, balance.held) == (30, 0)
    states = {e.id: e.state for e in ledger.history("user_1") if e.kind == "reserve"}
    assert states == {first.id: "expired", second.id: "committed"}
    ledger.reserve("user_2", 30, feature="api_calls", key="k", ttl=10)
    clock.advance(seconds=10)
    result = ledger.consume("user_2", 30, feature="api_calls", key="k")
    assert result.ok and not result.replayed
    assert assert_explained(ledger, "user_2").used == 30


def test_key_length_limits(ledger: Any, ledger_factory: Callable[..., Any]) -> None:
    longest = "k" * 255
    assert ledger.consume("user_1", 1, feature="api_calls", key=longest).ok
    assert ledger.consume("user_1", 1, feature="api_calls", key=longest).replayed
    assert ledger.reserve("user_1", 1, feature="api_calls", key="r" * 255).ok
    assert not ledger.grant("user_1", 1, feature="api_calls", key="g" * 255).replayed
    before = snapshot(ledger_factory.url)
    for bad in ("k" * 256, "", "nul\x00key", 5, b"bytes", ["k"]):
        with pytest.raises(InvalidKey):
            ledger.consume("user_1", 1, feature="api_calls", key=bad)
        with pytest.raises(InvalidKey):
            ledger.reserve("user_1", 1, feature="api_calls", key=bad)
        with pytest.raises(InvalidKey):
            ledger.grant("user_1", 1, feature="api_calls", key=bad)
    assert snapshot(ledger_factory.url) == before


def test_unicode_keys_and_no_keys(ledger: Any) -> None:
    key = "заказ-№42-🚀" * 10
    assert len(key) <= 255
    assert ledger.consume("user_1", 3, feature="api_calls", key=key).ok
    again = ledger.consume("user_1", 3, feature="api_calls", key=key)
    assert again.replayed and again.key == key
    assert ledger.balance("user_1", "api_calls").used == 3
    for _ in range(3):
        assert not ledger.consume("user_2", 10, feature="api_calls").replayed
    assert ledger.balance("user_2", "api_calls").used == 30
