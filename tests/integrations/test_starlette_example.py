"""``examples/starlette_middleware.py``: rules only, subject from ``request.user``; importable
without side effects, and ``python examples/starlette_middleware.py`` serves it."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from apps.asgi_support import TIMEOUT, client, is_empty, load_example, run_example

from metered import AsyncLedger


async def test_the_example_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    example = load_example("starlette_middleware")
    assert is_empty(tmp_path)

    app = example.create_app(f"sqlite:///{tmp_path / 'example.db'}")
    ledger: AsyncLedger = app.state.ledger
    await ledger.create_schema()
    alice = {"x-api-key": "key_alice"}
    async with client(app) as c:
        r = await c.post("/v1/search", headers=alice)
        assert r.status_code == 200 and r.json() == {"results": [], "metered": True}
        assert r.headers["metered-remaining"] == "99"
        r = await c.post("/v1/export", headers=alice, content=b"row\n" * 600)  # 2400 bytes
        assert r.status_code == 200 and r.headers["metered-remaining"] == "96"
        assert (await c.post("/v1/search")).status_code == 401
        assert (await c.post("/v1/search", headers={"x-api-key": "nope"})).status_code == 401
        r = await c.get("/v1/reports/q1", headers=alice)
        assert r.status_code == 403 and r.json()["feature"] == "reports"
        await ledger.assign_plan("user_alice", "pro")
        assert (await c.get("/v1/reports/q1", headers=alice)).json() == {"report": "q1"}
        assert (await c.get("/health")).text == "ok"
    balance = await ledger.balance("user_alice", "api_calls")
    assert balance.used == 0 and balance.allowance == 10_000  # the new pro period
    history = await ledger.history("user_alice", feature="api_calls")
    assert sorted(e.charged or 0 for e in history if e.kind == "reserve") == [1, 3]
    await ledger.close()


@pytest.mark.slow
def test_python_examples_starlette_middleware_runs(tmp_path: Path) -> None:
    with run_example("starlette_middleware", tmp_path) as base:
        r = httpx.post(f"{base}/v1/search", headers={"x-api-key": "key_bob"}, timeout=TIMEOUT)
        assert r.status_code == 200 and r.headers["metered-remaining"] == "99"
        assert httpx.post(f"{base}/v1/search", timeout=TIMEOUT).status_code == 401
    assert (tmp_path / "metered.db").exists()
