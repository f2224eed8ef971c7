"""``examples/fastapi_app.py``: importable without side effects, metered as documented, and
``python examples/fastapi_app.py`` serves it on the embedded SQLite default."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import httpx
import pytest
from apps.asgi_support import (
    TIMEOUT,
    client,
    is_empty,
    load_example,
    new_subject,
    run_example,
    wait_until,
)

from metered import AsyncLedger


async def test_the_example_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    example = load_example("fastapi_app")
    assert is_empty(tmp_path)  # importing opened nothing

    app = example.create_app(f"sqlite:///{tmp_path / 'example.db'}")
    ledger: AsyncLedger = app.state.metered.ledger
    await ledger.create_schema()
    subject = new_subject()
    key = {"x-api-key": subject}
    async with client(app) as c:
        r = await c.post("/generate", json={"prompt": "one two three"}, headers=key)
        assert r.status_code == 200
        assert r.json() == {"text": "three two one", "charged": 3}
        assert r.headers["metered-remaining"] == "97"
        assert (await c.post("/generate", json={"prompt": "x"})).status_code == 401
        r = await c.get("/report", headers=key)
        assert r.status_code == 403 and r.headers["content-type"] == "application/problem+json"
        await ledger.assign_plan(subject, "pro")
        r = await c.get("/report", headers=key)
        assert r.status_code == 200 and r.json()["remaining"] == 9995
        r = await c.get("/stream", headers=key)
        assert r.text.count("line") == 5
        balance = (await c.get("/balance", headers=key)).json()
        assert balance["used"] == 15 and balance["held"] == 0
        responses = app.openapi()["paths"]["/generate"]["post"]["responses"]
        assert {"401", "402", "403", "409", "503"} <= set(responses)
    await ledger.close()


@pytest.mark.slow
def test_python_examples_fastapi_app_runs(tmp_path: Path) -> None:
    subject = new_subject()
    with run_example("fastapi_app", tmp_path) as base:
        r = httpx.post(
            f"{base}/generate",
            json={"prompt": "a b"},
            headers={"x-api-key": subject},
            timeout=TIMEOUT,
        )
        assert r.status_code == 200 and r.json()["charged"] == 2

        def used() -> int:
            return int(httpx.get(f"{base}/balance", headers={"x-api-key": subject}).json()["used"])

        assert wait_until(used) == 2
    with sqlite3.connect(tmp_path / "metered.db") as db:  # the embedded default
        assert db.execute("select count(*) from sqlite_master").fetchone()[0] > 0
