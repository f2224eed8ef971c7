from __future__ import annotations

from typing import Any


def test_consume_until_exhausted(ledger: Any) -> None:
    results = [ledger.consume("user_1", 30, feature="api_calls") for _ in range(4)]
    assert [r.ok for r in results] == [True, True, True, False]
    assert [r.usage_remaining for r in results] == [70, 40, 10, 10]
    assert results[-1].reason == "insufficient_units"
    assert ledger.balance("user_1", "api_calls").used == 90
