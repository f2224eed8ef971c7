"""Helpers for the ledger rule tests (imported by ``test_ledger_*.py``; not a test module).

* :func:`snapshot` reads every metered table straight from the database, so a test can prove
  that an operation wrote nothing at all (bad input, reads, refused settlements).
* :func:`explain` recomputes a balance from the subject's history alone, and
  :func:`assert_explained` checks that the ledger's own balance agrees with it line by line:
  the history is the ledger's account of itself, and must add up.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import MetaData, create_engine, select
from sqlalchemy.pool import NullPool

from metered import Balance, HistoryEntry
from metered._drivers import resolve_url
from metered.clock import from_us

Snapshot = dict[str, list[tuple[Any, ...]]]
CORE_TABLES = {"metered_subjects", "metered_accounts", "metered_operations", "metered_credits"}


def snapshot(url: str) -> Snapshot:
    """Every row of every table in the database (reflected, not just the ones schema.py knows)."""
    target = resolve_url(url, asynchronous=True)  # accepts postgresql+asyncpg:// too
    engine = create_engine(target.sqlalchemy_url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            tables = MetaData()
            tables.reflect(conn)
            assert set(tables.tables) >= CORE_TABLES, "not a migrated ledger database"
            return {
                table.name: sorted((tuple(row) for row in conn.execute(select(table))), key=repr)
                for table in tables.sorted_tables
            }
    finally:
        engine.dispose()


def state(ledger: Any, subject: str, feature: str = "api_calls") -> tuple[Balance, list[Any]]:
    """What the public API says about one subject: its balance and its whole history."""
    return ledger.balance(subject, feature), ledger.history(subject, limit=10_000)


@dataclass(frozen=True)
class Explained:
    allowance: int
    used: int
    credits: int
    held: int
    overage: int
    usage_remaining: int


def _settled_at(entry: HistoryEntry) -> datetime:
    return entry.settled_at if entry.settled_at is not None else entry.created_at


def check_lines(entries: list[HistoryEntry]) -> None:
    """Each history line is self-consistent for its kind and state."""
    for e in entries:
        assert e.units > 0 or e.kind == "period", e
        if e.kind == "consume":
            assert e.state == "committed", e
            assert e.charged == e.units, e
        if e.kind in ("consume", "reserve") and e.state == "committed":
            assert e.charged is not None, e
            assert e.from_allowance + e.from_credit + e.overage == e.charged, e
            assert min(e.from_allowance, e.from_credit, e.overage) >= 0, e
        elif e.kind == "reserve":
            assert e.state in ("held", "released", "expired"), e
            assert e.charged is None, e
            assert (e.from_allowance, e.from_credit, e.overage) == (0, 0, 0), e
            assert e.expires_at is not None, e
        else:
            assert (e.from_allowance, e.from_credit, e.overage) == (0, 0, 0), e
        if e.kind in ("grant", "credit_expired", "period"):
            assert e.state == "applied", e


def simulate_credits(entries: list[HistoryEntry], now: datetime) -> int:
    """Replay the credit lines in time order and return the credits spendable at ``now``.

    Draws (``from_credit``) are taken from the live credits soonest-expiring first, and each
    ``credit_expired`` line must state exactly what its credit still held when it expired: so
    this checks the spending order, not only the totals. Expiry is lazy: a credit past its
    ``expires_at`` may not have its line yet, and is simply not spendable. (Events at the same
    instant are ordered by id; tests move the clock between a grant and a commit that could
    draw on it.)
    """
    buckets: list[dict[str, Any]] = []
    events: list[tuple[datetime, int, str, HistoryEntry]] = []
    for e in entries:
        if e.kind == "grant":
            events.append((e.created_at, e.id, "grant", e))
        elif e.kind == "credit_expired":
            events.append((e.created_at, e.id, "expired", e))
        elif e.kind == "revoke":
            raise AssertionError("revocations name no credit; not simulated here")
        elif e.kind in ("consume", "reserve") and e.state == "committed" and e.from_credit:
            events.append((_settled_at(e), e.id, "draw", e))
    events.sort(key=lambda event: (event[0], event[1]))
    unmatched: dict[datetime, list[int]] = {}
    for when, _, what, e in events:
        if what == "grant":
            buckets.append({"id": e.id, "expires_at": e.expires_at, "remaining": e.units})
        elif what == "draw":
            need = e.from_credit
            live = [b for b in buckets if b["expires_at"] is None or b["expires_at"] > when]
            live.sort(key=lambda b: (b["expires_at"] is None, b["expires_at"] or when, b["id"]))
            for bucket in live:
                take = min(need, bucket["remaining"])
                bucket["remaining"] -= take
                need -= take
            assert need == 0, f"{e} drew {e.from_credit} credits that did not exist"
        else:
            lines = unmatched.setdefault(when, [])
            lines.append(e.units)
            due = [
                b
                for b in buckets
                if b["expires_at"] is not None and b["expires_at"] <= when and b["remaining"]
            ]
            if len(lines) == len(due):  # every line of this expiry is in
                assert sorted(lines) == sorted(b["remaining"] for b in due), (
                    f"credits expired at {when}: lines say {lines}, soonest-expiring-first"
                    f" spending leaves {[b['remaining'] for b in due]}"
                )
                for bucket in due:
                    bucket["remaining"] = 0
                lines.clear()
    assert not any(unmatched.values()), f"credit_expired lines match no credit: {unmatched}"
    # the plain sums agree with the replay (granted - spent - expired = what credits still hold)
    spent = sum(
        e.from_credit
        for e in entries
        if e.kind in ("consume", "reserve") and e.state == "committed"
    )
    granted = sum(e.units for e in entries if e.kind == "grant")
    expired = sum(e.units for e in entries if e.kind == "credit_expired")
    assert granted - spent - expired == sum(b["remaining"] for b in buckets)
    return sum(b["remaining"] for b in buckets if b["expires_at"] is None or b["expires_at"] > now)


def explain(
    entries: list[HistoryEntry], *, now: datetime, period_start: datetime, allowance: int
) -> Explained:
    """Recompute a feature's balance from its history lines alone."""
    charged = [e for e in entries if e.kind in ("consume", "reserve") and e.state == "committed"]
    charged_now = [e for e in charged if _settled_at(e) >= period_start]
    used = sum(e.from_allowance for e in charged_now)
    overage = sum(e.overage for e in charged_now)
    credits = simulate_credits(entries, now)
    held = sum(
        e.units
        for e in entries
        if e.kind == "reserve"
        and e.state == "held"
        and e.expires_at is not None
        and e.expires_at > now
    )
    remaining = max(max(allowance - used, 0) + credits - held, 0)
    return Explained(allowance, used, credits, held, overage, remaining)


def assert_explained(ledger: Any, subject: str, feature: str = "api_calls") -> Balance:
    """The ledger's balance equals the one recomputed from its history; returns the balance."""
    balance: Balance = ledger.balance(subject, feature)
    entries: list[HistoryEntry] = ledger.history(subject, feature=feature, limit=10_000)
    check_lines(entries)
    assert all(e.feature == feature and e.subject == subject for e in entries)
    assert balance.period_start is not None
    plan = ledger.catalog.plans[balance.plan]
    spec = plan.features.get(feature)
    allowance = (spec.units or 0) if spec is not None else 0
    periods = [e for e in entries if e.kind == "period" and e.created_at >= balance.period_start]
    if periods:  # the newest period line states the allowance of the current period
        assert periods[0].units == allowance, (periods[0], allowance)
    now = from_us(ledger.clock.now_us())
    expected = explain(entries, now=now, period_start=balance.period_start, allowance=allowance)
    actual = Explained(
        balance.allowance,
        balance.used,
        balance.credits,
        balance.held,
        balance.overage,
        balance.usage_remaining,
    )
    assert actual == expected, f"balance {actual} but history says {expected}"
    return balance
