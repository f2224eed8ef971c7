"""The README's Python examples run as written (in a temp directory, on the SQLite default)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(marker: str) -> list[str]:
    text = README.read_text()
    return [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if marker in b]


def test_ledger_section_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("METERED_DATABASE_URL", raising=False)
    (block,) = _blocks("ledger.create_schema()")
    namespace: dict[str, object] = {}
    exec(compile(block, "README.md", "exec"), namespace)
    ledger = namespace["ledger"]
    r = namespace["r"]
    assert (r.ok, r.consumed, r.usage_remaining, r.replayed) == (True, 100, 9900, False)  # type: ignore[attr-defined]
    balance = ledger.balance("user_123", "api_calls")  # type: ignore[attr-defined]
    assert (balance.used, balance.credits) == (100, 1000)
    assert ledger.balance("user_123", "tokens").used == 312  # type: ignore[attr-defined]
    ledger.close()  # type: ignore[attr-defined]
