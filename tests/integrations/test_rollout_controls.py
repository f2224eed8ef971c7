"""Shadow mode, per-feature failure policy and event hooks, in every adapter."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from flask import Flask
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from werkzeug.test import Client

from metered import AsyncLedger, Ledger, Plan
from metered.integrations import flask as metered_flask
from metered.integrations import starlette as metered_starlette
from metered.integrations._rules import Rule
from metered.integrations.wsgi import MeteredWSGIMiddleware

PLANS = [Plan("free", features={"api_calls": 2, "exports": 1})]
UNREACHABLE = "sqlite:////nonexistent-dir/metered/ledger.db"


@pytest.fixture
def url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    with Ledger(url, plans=PLANS, default_plan="free") as ledger:
        ledger.create_schema()
    return url


@pytest.fixture
def ledger(url: str) -> Iterator[Ledger]:
    with Ledger(url, plans=PLANS, default_plan="free") as ledger:
        yield ledger


def flask_app(ledger: Ledger, **options: Any) -> Flask:
    app = Flask(__name__)
    metered_flask.Metered(app, ledger=ledger, subject=lambda: "user_1", **options)

    @app.post("/calls")
    @metered_flask.consumes(1, feature="api_calls")
    def calls() -> dict[str, bool]:
        return {"ok": True}

    @app.post("/exports")
    @metered_flask.consumes(1, feature="exports")
    def exports() -> dict[str, bool]:
        return {"ok": True}

    return app


def test_flask_shadow_mode_logs_denials_and_charges_nothing(
    ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    app = flask_app(ledger, shadow=True, on_event=lambda name, f: events.append((name, f)))
    client = app.test_client()
    with caplog.at_level(logging.INFO, logger="metered"):
        statuses = [client.post("/calls").status_code for _ in range(4)]
    assert statuses == [200, 200, 200, 200]  # never enforced
    assert ledger.balance("user_1", "api_calls").used == 0  # never charged
    assert ledger.history("user_1") == []
    # With 2 units and nothing charged, no call would have been denied yet ...
    assert not [e for e in events if e[0] == "metered.shadow_denied"]
    ledger.consume("user_1", 2, feature="api_calls")
    with caplog.at_level(logging.INFO, logger="metered"):
        assert client.post("/calls").status_code == 200
    # ... but once the balance is gone the would-be 402 is reported, with its reason.
    shadow = [f for name, f in events if name == "metered.shadow_denied"]
    assert shadow == [
        {
            "subject": "user_1",
            "feature": "api_calls",
            "status": 402,
            "reason": "quota_exhausted",
            "units_requested": 1,
            "usage_remaining": 0,
        }
    ]
    assert any(r.getMessage() == "metered.shadow_denied" for r in caplog.records)


def test_flask_shadow_mode_per_feature(ledger: Ledger) -> None:
    client = flask_app(ledger, shadow={"exports"}).test_client()
    assert [client.post("/exports").status_code for _ in range(3)] == [200, 200, 200]
    assert [client.post("/calls").status_code for _ in range(3)] == [200, 200, 402]
    assert ledger.balance("user_1", "exports").used == 0
    assert ledger.balance("user_1", "api_calls").used == 2


def test_flask_shadow_mode_from_config(ledger: Ledger) -> None:
    app = Flask(__name__)
    app.config["METERED_SHADOW"] = ["api_calls"]
    metered_flask.Metered(app, ledger=ledger, subject=lambda: "user_1")

    @app.post("/calls")
    @metered_flask.consumes(5, feature="api_calls")
    def calls() -> str:
        return "ok"

    assert app.test_client().post("/calls").status_code == 200  # 5 > 2 units, not enforced


def test_flask_fail_open_per_feature(caplog: pytest.LogCaptureFixture) -> None:
    events: list[str] = []
    with Ledger(UNREACHABLE, plans=PLANS, default_plan="free", timeout=0.5) as broken:
        app = flask_app(
            broken,
            fail_open={"api_calls": True, "*": False},
            on_event=lambda n, f: events.append(n),
        )
        client = app.test_client()
        assert client.post("/calls").status_code == 200  # fails open
        response = client.post("/exports")  # fails closed
        assert response.status_code == 503
        assert response.json["type"] == "urn:metered:problem:ledger-unavailable"  # type: ignore[index]
    assert events == ["metered.fail_open", "metered.unavailable"]


def test_hook_sees_commit_and_release_and_its_errors_never_break_requests(ledger: Ledger) -> None:
    seen: list[str] = []

    def hook(name: str, fields: dict[str, Any]) -> None:
        seen.append(name)
        raise RuntimeError("a broken metrics backend")

    app = flask_app(ledger, on_event=hook)

    @app.post("/fails")
    @metered_flask.consumes(1, feature="api_calls")
    def fails() -> tuple[str, int]:
        return "no", 500

    client = app.test_client()
    assert client.post("/calls").status_code == 200
    assert client.post("/fails").status_code == 500
    assert client.post("/calls").status_code == 200
    assert client.post("/calls").status_code == 402
    assert seen == ["metered.committed", "metered.released", "metered.committed", "metered.denied"]
    assert ledger.balance("user_1", "api_calls").used == 2


def test_wsgi_shadow_mode(ledger: Ledger) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    events: list[str] = []
    wrapped = MeteredWSGIMiddleware(
        app,
        ledger=ledger,
        subject=lambda environ: None,  # no subject: would be 401
        rules=[Rule("/v1/*", units=1, feature="api_calls")],
        shadow=True,
        on_event=lambda name, fields: events.append(f"{name}:{fields.get('status')}"),
    )
    assert Client(wrapped).get("/v1/anything").status_code == 200
    assert events == ["metered.shadow_denied:401"]


async def test_starlette_shadow_and_fail_open(url: str) -> None:
    events: list[str] = []

    async def endpoint(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    async with AsyncLedger(url, plans=PLANS, default_plan="free") as ledger:
        app = Starlette(routes=[Route("/calls", endpoint, methods=["POST"])])
        metered_starlette.Metered(
            app,
            ledger=ledger,
            subject=lambda request: "user_1",
            rules=[Rule("/calls", units=1, feature="api_calls")],
            shadow=["api_calls"],
            on_event=lambda name, fields: events.append(name),
        )
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            statuses = [(await client.post("/calls")).status_code for _ in range(4)]
        assert statuses == [200] * 4
        assert (await ledger.balance("user_1", "api_calls")).used == 0
        await ledger.consume("user_1", 2, feature="api_calls")
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.post("/calls")).status_code == 200
        assert events == ["metered.shadow_denied"]

    async with AsyncLedger(UNREACHABLE, plans=PLANS, default_plan="free", timeout=0.5) as broken:
        app = Starlette(routes=[Route("/calls", endpoint, methods=["POST"])])
        metered_starlette.Metered(
            app,
            ledger=broken,
            subject=lambda request: "user_1",
            rules=[Rule("/calls", units=1, feature="api_calls")],
            fail_open=["api_calls"],
        )
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.post("/calls")).status_code == 200
