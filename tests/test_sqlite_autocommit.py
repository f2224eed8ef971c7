"""Unit operations as one autocommit statement each (SQLite), and what that must not break.

A unit operation on SQLite is one statement whose account update comes from the ledger
connection's own triggers, and a refusal is explained by reads taken after it. These tests
pin the edges of that design: connections that are not metered's, refusals whose balance
changes before they are explained, and ids that two processes happen to draw alike.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from metered import Ledger, Plan

PLANS = [Plan("free", features={"api_calls": 100})]
BACKENDS = pytest.mark.parametrize(
    "database_url",
    ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)],
    indirect=True,
)


@pytest.fixture
def path(tmp_path: Path) -> Iterator[str]:
    path = str(tmp_path / "ledger.db")
    with Ledger(f"sqlite:///{path}", plans=PLANS, default_plan="free") as ledger:
        ledger.create_schema()
        assert ledger.consume("u", 1, feature="api_calls").ok  # the account exists: 99 left
    yield path


def test_the_account_triggers_belong_to_the_ledgers_connections(path: str) -> None:
    """Another connection writing an operation row (an older metered that updates accounts
    itself, a script) must not see metered's triggers, or its units would count twice."""
    other = sqlite3.connect(path, isolation_level=None)
    try:
        triggers = "SELECT count(*) FROM sqlite_master WHERE type = 'trigger'"
        assert other.execute(triggers).fetchone() == (0,)  # none in the file itself
        other.execute(
            "INSERT INTO metered_operations (subject, id, key, feature, kind, state, units,"
            " charged, from_allowance, from_credit, overage, created_at)"
            " VALUES ('u', 1, NULL, 'api_calls', 'consume', 'committed', 7, 7, 7, 0, 0, 0)"
        )
    finally:
        other.close()
    with Ledger(f"sqlite:///{path}", plans=PLANS, default_plan="free") as ledger:
        assert ledger.balance("u", "api_calls").used == 1  # the hand-written row moved nothing
        assert ledger.consume("u", 2, feature="api_calls").ok
        assert ledger.balance("u", "api_calls").used == 1 + 2  # metered's own, exactly once


@pytest.mark.parametrize("kind", ["consume", "reserve", "commit"])
def test_a_refusal_whose_balance_frees_up_before_it_is_explained_is_decided_again(
    path: str, kind: str
) -> None:
    """Another process holds every unit just before each of our writes and releases them just
    after: the re-read then says "go" for a write that was refused. Deciding again inside one
    transaction gives a consistent answer instead of retrying until LedgerUnavailable."""
    me = Ledger(f"sqlite:///{path}", plans=PLANS, default_plan="free")
    other = Ledger(f"sqlite:///{path}", plans=PLANS, default_plan="free")
    executor = me._executor
    take, end = executor._take_turn, executor._end_turn  # type: ignore[attr-defined]
    state: dict[str, Any] = {"on": False, "hold": None, "refused": 0}

    def take_after_the_other(turn: Any) -> None:
        if state["on"]:
            left = other.balance("u", "api_calls").usage_remaining
            state["hold"] = other.reserve("u", left, feature="api_calls")
        take(turn)

    def end_then_the_other_lets_go(turn: Any, *args: Any) -> None:
        end(turn, *args)
        if state["on"] and state["hold"] is not None:
            other.release(state["hold"])
            state["hold"] = None
            state["refused"] += 1

    executor._take_turn = take_after_the_other  # type: ignore[attr-defined]
    executor._end_turn = end_then_the_other_lets_go  # type: ignore[attr-defined]
    try:
        held = me.reserve("u", 1, feature="api_calls") if kind == "commit" else None
        state["on"] = True
        if kind == "consume":
            result: Any = me.consume("u", 5, feature="api_calls")
        elif kind == "reserve":
            result = me.reserve("u", 5, feature="api_calls")
        else:
            result = me.commit(held, 5)  # more than held: the rest must come from the balance
        state["on"] = False
        assert not result.ok
        assert result.reason in ("quota_exhausted", "insufficient_units")
        assert state["refused"] == 2  # the autocommit write, then the one transaction
        balance = me.balance("u", "api_calls")
        assert balance.used == 1 and balance.held == (1 if kind == "commit" else 0)
    finally:
        me.close()
        other.close()


@BACKENDS
def test_an_id_another_process_drew_for_the_same_subject_is_drawn_again(
    database_url: str,
) -> None:
    """Ids are unique within a process; two processes can, rarely, draw the same one for a
    subject in the same millisecond. The operation must retry with a new id, not fail."""
    with Ledger(database_url, plans=PLANS, default_plan="free") as ledger:
        ledger.create_schema()
        first = ledger.consume("u", 1, feature="api_calls")
        assert first.ok and first.entry_id is not None
        taken = first.entry_id
        ids = ledger._ctx.ids
        real_next: Callable[[int], int] = ids.next
        drawn: list[int] = []

        def collide_once(now_us: int) -> int:
            drawn.append(taken if not drawn else real_next(now_us))
            return drawn[-1]

        ids.next = collide_once  # type: ignore[method-assign]
        second = ledger.consume("u", 2, feature="api_calls", key="k")
        held = ledger.reserve("u", 3, feature="api_calls")
        drawn.clear()
        ids.next = collide_once  # type: ignore[method-assign]
        third = ledger.reserve("u", 4, feature="api_calls")
        assert second.ok and not second.replayed and second.entry_id != taken
        assert held.ok and third.ok and third.id != taken
        assert ledger.commit(held).ok and ledger.release(third)
        balance = ledger.balance("u", "api_calls")
        assert (balance.used, balance.held) == (1 + 2 + 3, 0)

        for key in ("topup", None):  # history lines (here grants) draw again too
            drawn.clear()
            ids.next = collide_once  # type: ignore[method-assign]
            granted = ledger.grant("u", 10, feature="api_calls", key=key)
            assert not granted.replayed and granted.entry_id != taken
        assert ledger.grant("u", 10, feature="api_calls", key="topup").replayed
        assert ledger.balance("u", "api_calls").credits == 20
