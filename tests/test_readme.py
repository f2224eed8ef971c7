"""The README's Python examples run as written (in a temp directory, on the SQLite default)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _block(marker: str) -> str:
    text = README.read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if marker in b]
    return block


def _run(block: str) -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": "readme"}
    exec(compile(block, "README.md", "exec"), namespace)
    return namespace


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("METERED_DATABASE_URL", raising=False)


def test_ledger_section_runs() -> None:
    ns = _run(_block('ledger.consume("user_123", 100'))
    ledger, r = ns["ledger"], ns["r"]
    assert (r.ok, r.consumed, r.usage_remaining, r.replayed) == (True, 100, 9900, False)
    balance = ledger.balance("user_123", "api_calls")
    assert (balance.used, balance.credits) == (100, 1000)
    assert ledger.balance("user_123", "tokens").used == 312
    ledger.close()


def test_flask_quickstart_runs() -> None:
    ns = _run(_block("from metered.integrations.flask import Metered"))
    client = ns["app"].test_client()
    response = client.post("/generate", headers={"X-Api-Key": "user_1"})
    assert response.status_code == 200
    assert response.headers["Metered-Remaining"] == "93"
    assert ns["ledger"].balance("user_1", "api_calls").used == 7
    denied = client.get("/reports", headers={"X-Api-Key": "user_1"})
    assert denied.status_code == 403
    assert denied.json["type"] == "urn:metered:problem:no-entitlement"
    assert client.post("/generate").status_code == 401
    ns["ledger"].close()


async def test_fastapi_quickstart_runs() -> None:
    ns = _run(_block("from metered.integrations.fastapi import"))
    app = ns["app"]
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://test") as client,
    ):
        response = await client.post("/generate", headers={"x-api-key": "user_1"})
        assert response.status_code == 200
        assert (await client.get("/report", headers={"x-api-key": "user_1"})).status_code == 200
        schema = (await client.get("/openapi.json")).json()
        assert (await ns["ledger"].balance("user_1", "api_calls")).used == 12
    assert "402" in schema["paths"]["/generate"]["post"]["responses"]
