"""balance() and history(): an append-only ledger that explains every balance line by line."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from ledger_support import assert_explained
from metered import Balance, HistoryEntry, ManualClock

UTC = timezone.utc
START = datetime(2026, 1, 15, 12, 0, tzinfo=UTC)


class Tracker:
    """Checks after every step that the balance is explained and the history only grows."""

    def __init__(self, ledger: Any, subject: str, features: tuple[str, ...]) -> None:
        self.ledger, self.subject, self.features = ledger, subject, features
        self.seen: dict[int, HistoryEntry] = {}

    def step(self) -> None:
        for feature in self.features:
            assert_explained(self.ledger, self.subject, feature)
        entries = self.ledger.history(self.subject, limit=10_000)
        ids = [e.id for e in entries]
        assert ids == sorted(ids, reverse=True), "newest first"
        assert len(set(ids)) == len(ids)
        current = {e.id: e for e in entries}
        assert set(self.seen) <= set(current), "history lines are never removed"
        for entry_id, old in self.seen.items():
            new = current[entry_id]
            # a line keeps what it recorded; only a held reservation gets its outcome filled in
            assert (new.kind, new.units, new.feature, new.created_at) == (
                old.kind,
                old.units,
                old.feature,
                old.created_at,
            )
            if old.state != "held":
                assert new == old
        self.seen = current


def test_balance_fields(ledger: Any, clock: ManualClock) -> None:
    ledger.assign_plan("user_1", "pro")
    ledger.consume("user_1", 900, feature="tokens")
    ledger.grant("user_1", 50, feature="tokens")
    ledger.reserve("user_1", 120, feature="tokens")
    balance = ledger.balance("user_1", "tokens")
    assert isinstance(balance, Balance)
    assert (balance.subject, balance.feature, balance.plan, balance.status) == (
        "user_1",
        "tokens",
        "pro",
        "active",
    )
    assert (
        balance.allowance,
        balance.used,
        balance.credits,
        balance.held,
        balance.overage,
        balance.usage_remaining,
    ) == (1_000, 900, 50, 120, 0, 30)
    assert balance.period_start == START
    assert balance.period_end == datetime(2026, 2, 15, 12, tzinfo=UTC)


def test_balance_of_an_unknown_subject(ledger: Any) -> None:
    balance = ledger.balance("nobody", "api_calls")
    assert (balance.plan, balance.allowance, balance.used, balance.usage_remaining) == (
        "free",
        100,
        0,
        100,
    )
    assert ledger.history("nobody") == []


def test_history_explains_the_balance_line_by_line(ledger: Any, clock: ManualClock) -> None:
    track = Tracker(ledger, "user_1", ("api_calls", "tokens"))
    ledger.assign_plan("user_1", "pro")
    track.step()
    ledger.consume("user_1", 9_000, feature="api_calls", key="c1")
    track.step()
    ledger.grant("user_1", 300, feature="api_calls", key="g1", expires_at=START + timedelta(3))
    ledger.grant("user_1", 200, feature="api_calls", key="g2")
    track.step()
    r1 = ledger.reserve("user_1", 800, feature="api_calls", key="r1", ttl=60)
    r2 = ledger.reserve("user_1", 500, feature="api_calls", key="r2", ttl=60)
    track.step()
    refused = ledger.commit(r1, units=1_100)  # r2 holds 500 of the 1500 available
    assert (refused.ok, refused.reason) == (False, "insufficient_units")
    track.step()
    assert ledger.release(r2)
    track.step()
    committed = ledger.commit(r1, units=1_100)  # more than held: 1000 allowance + 100 credit
    assert committed.ok and committed.usage_remaining == 400
    track.step()
    ledger.consume("user_1", 9_000, feature="api_calls")  # denied: nothing recorded
    ledger.reserve("user_1", 50, feature="api_calls", key="lost", ttl=30)
    track.step()
    clock.advance(seconds=31)  # the hold expires
    track.step()
    ledger.consume("user_1", 50, feature="api_calls", key="c2")
    track.step()
    ledger.consume("user_1", 1_400, feature="tokens", key="t1")  # 400 overage
    r3 = ledger.reserve("user_1", 10, feature="tokens")
    ledger.commit(r3, units=25)
    track.step()
    clock.advance(days=4)  # g1 expires with what is left of it
    track.step()
    ledger.consume("user_1", 1, feature="api_calls")
    track.step()
    clock.advance(days=30)  # a new period
    track.step()
    ledger.consume("user_1", 10_100, feature="api_calls")
    ledger.consume("user_1", 5, feature="tokens")
    track.step()

    kinds = {(e.kind, e.state) for e in ledger.history("user_1", limit=10_000)}
    assert kinds == {
        ("period", "applied"),
        ("consume", "committed"),
        ("grant", "applied"),
        ("reserve", "committed"),
        ("reserve", "released"),
        ("reserve", "expired"),
        ("credit_expired", "applied"),
    }
    api = ledger.balance("user_1", "api_calls")
    assert (api.used, api.credits, api.usage_remaining) == (10_000, 99, 99)
    [expired] = [e for e in ledger.history("user_1") if e.kind == "credit_expired"]
    assert expired.units == 150  # g1: 300 - 100 (commit) - 50 (c2), spent before g2
    tokens = ledger.balance("user_1", "tokens")
    assert (tokens.used, tokens.overage) == (5, 0)


def test_history_lines_carry_times_and_keys(ledger: Any, clock: ManualClock) -> None:
    ledger.consume("user_1", 3, feature="api_calls", key="first")
    clock.advance(seconds=10)
    reservation = ledger.reserve("user_1", 4, feature="api_calls", key="second", ttl=60)
    clock.advance(seconds=5)
    ledger.commit(reservation)
    lines = ledger.history("user_1")
    consume = next(e for e in lines if e.kind == "consume")
    reserve = next(e for e in lines if e.kind == "reserve")
    assert (consume.key, consume.created_at, consume.subject) == ("first", START, "user_1")
    assert reserve.key == "second"
    assert reserve.created_at == START + timedelta(seconds=10)
    assert reserve.expires_at == START + timedelta(seconds=70)
    assert reserve.settled_at == START + timedelta(seconds=15)


def test_history_paging_and_filters(ledger: Any, clock: ManualClock) -> None:
    ledger.assign_plan("user_1", "pro")
    for i in range(5):
        ledger.consume("user_1", 1, feature="api_calls", key=f"a{i}")
        ledger.consume("user_1", 1, feature="tokens", key=f"t{i}")
        clock.advance(seconds=1)
    ledger.consume("user_2", 1, feature="api_calls")
    everything = ledger.history("user_1", limit=1_000)
    assert len(everything) == 12  # 10 usage lines and one period line per feature
    assert all(e.subject == "user_1" for e in everything)
    assert [e.id for e in ledger.history("user_1")] == [e.id for e in everything]

    api = ledger.history("user_1", feature="api_calls")
    assert [e.key for e in api if e.kind == "consume"] == [f"a{i}" for i in reversed(range(5))]
    assert all(e.feature == "api_calls" for e in api)

    page1 = ledger.history("user_1", limit=4)
    page2 = ledger.history("user_1", limit=4, before=page1[-1].id)
    page3 = ledger.history("user_1", limit=4, before=page2[-1].id)
    assert [e.id for e in page1 + page2 + page3] == [e.id for e in everything]
    assert ledger.history("user_1", limit=4, before=page3[-1].id) == []
    filtered = ledger.history("user_1", feature="tokens", limit=2, before=page1[1].id)
    assert len(filtered) == 2
    assert all(e.feature == "tokens" and e.id < page1[1].id for e in filtered)
    assert [e.kind for e in ledger.history("user_2")] == ["consume", "period"]
