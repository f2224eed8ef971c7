"""``metered routes``, ``metered webhooks replay`` and ``metered export-usage`` as subprocesses."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest

from metered import Feature, Ledger, Plan
from test_cli import run

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PLANS_TOML = """
default_plan = "free"
[plans.free.features]
api_calls = 0
[plans.pro]
prices = ["price_pro"]
[plans.pro.features.api_calls]
units = 100
meter = "api_requests"
"""


def test_routes_lists_every_metered_route() -> None:
    flask = run("routes", "flask_app:app", "--json", cwd=EXAMPLES)
    assert flask.returncode == 0, flask.stderr
    rows = {(r["method"], r["path"], r["kind"], r["feature"]) for r in json.loads(flask.stdout)}
    assert ("POST", "/v1/generate", "consumes", "api_calls") in rows
    assert ("GET", "/v1/reports/usage", "requires_entitlement", "reports") in rows

    starlette = run("routes", "starlette_middleware:app", cwd=EXAMPLES)
    assert starlette.returncode == 0, starlette.stderr
    assert "POST    /v1/*" in starlette.stdout and "rule" in starlette.stdout

    fastapi = json.loads(run("routes", "fastapi_app:app", "--json", cwd=EXAMPLES).stdout)
    assert {r["source"] for r in fastapi} == {"decorator", "dependency"}

    missing = run("routes", "no_such_module:app", cwd=EXAMPLES)
    assert missing.returncode == 2 and "cannot import" in missing.stderr


class MeterEvents:
    """A local stand-in for POST /v1/billing/meter_events."""

    def __init__(self) -> None:
        self.events: list[dict[str, str]] = []
        received = self.events

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                form = {k: v[-1] for k, v in parse_qs(body).items()}
                received.append(form)
                data = json.dumps(
                    {
                        "object": "billing.meter_event",
                        "event_name": form.get("event_name"),
                        "identifier": form.get("identifier"),
                        "created": int(time.time()),
                        "livemode": False,
                        "payload": {},
                        "timestamp": int(form.get("timestamp", time.time())),
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"


@pytest.fixture
def meter_events() -> Iterator[MeterEvents]:
    stub = MeterEvents()
    thread = threading.Thread(target=stub.server.serve_forever, daemon=True)
    thread.start()
    yield stub
    stub.server.shutdown()
    stub.server.server_close()


@pytest.mark.parametrize("database_url", ["sqlite", "postgres"], indirect=True)
def test_replay_events_then_export_usage(
    database_url: str, tmp_path: Path, meter_events: MeterEvents
) -> None:
    plans = tmp_path / "plans.toml"
    plans.write_text(PLANS_TOML)
    env = {
        "METERED_DATABASE_URL": database_url,
        "METERED_PLANS": str(plans),
        "STRIPE_API_KEY": "sk_test_cli",
        "STRIPE_WEBHOOK_SECRET": "whsec_cli",
        "STRIPE_API_BASE": meter_events.url,
    }
    assert run("db", "upgrade", cwd=tmp_path, env=env).returncode == 0
    now = int(time.time())
    item = {
        "id": "si_1",
        "object": "subscription_item",
        "quantity": 1,
        "price": {"id": "price_pro", "object": "price", "type": "recurring"},
        "current_period_start": now - 60,
        "current_period_end": now + 30 * 86400,
    }
    events = [
        (
            "checkout.session.completed",
            {
                "id": "cs_1",
                "object": "checkout.session",
                "mode": "subscription",
                "status": "complete",
                "payment_status": "paid",
                "client_reference_id": "org_1",
                "metadata": {"metered_subject": "org_1"},
                "customer": "cus_1",
                "subscription": "sub_1",
                "livemode": False,
            },
        ),
        (
            "customer.subscription.created",
            {
                "id": "sub_1",
                "object": "subscription",
                "customer": "cus_1",
                "status": "active",
                "cancel_at_period_end": False,
                "created": now - 60,
                "livemode": False,
                "metadata": {"metered_subject": "org_1"},
                "items": {"object": "list", "data": [item], "has_more": False},
            },
        ),
    ]
    for n, (kind, obj) in enumerate(events):
        path = tmp_path / f"event{n}.json"
        path.write_text(
            json.dumps(
                {
                    "id": f"evt_{n}",
                    "object": "event",
                    "type": kind,
                    "created": now + n,
                    "livemode": False,
                    "api_version": "2025-03-31.basil",
                    "data": {"object": obj},
                }
            )
        )
        replayed = run("webhooks", "replay", str(path), "--json", cwd=tmp_path, env=env)
        assert replayed.returncode == 0, replayed.stderr
        assert json.loads(replayed.stdout)["outcome"] == "applied"
    again = run("webhooks", "replay", str(tmp_path / "event0.json"), cwd=tmp_path, env=env)
    assert "duplicate" in again.stdout

    plan_list = [
        Plan("free", features={"api_calls": 0}),
        Plan(
            "pro",
            prices=["price_pro"],
            features={"api_calls": Feature(units=100, meter="api_requests")},
        ),
    ]
    with Ledger(database_url, plans=plan_list, default_plan="free") as ledger:
        for n in range(3):
            assert ledger.consume("org_1", 5, feature="api_calls", key=f"req-{n}").ok

    exported = run("export-usage", "--json", cwd=tmp_path, env=env)
    assert exported.returncode == 0, exported.stderr
    assert json.loads(exported.stdout)["sent"] == 3
    assert sorted(e["payload[value]"] for e in meter_events.events) == ["5", "5", "5"]
    assert {e["payload[stripe_customer_id]"] for e in meter_events.events} == {"cus_1"}
    assert len({e["identifier"] for e in meter_events.events}) == 3
    nothing_left = run("export-usage", "--json", cwd=tmp_path, env=env)
    assert json.loads(nothing_left.stdout)["sent"] == 0
    assert len(meter_events.events) == 3
