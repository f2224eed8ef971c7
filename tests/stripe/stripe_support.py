"""Helpers for the Stripe tests (imported by ``test_*.py`` here; not a test module).

* :class:`FakeStripe` is a ``stripe.HTTPClient`` injected into a real ``StripeClient``: it
  records every request (method, path, decoded form parameters, headers) and answers from
  routes the test registers. No network.
* ``subscription()``, ``invoice()``, ... build Stripe objects shaped like Stripe's own
  fixtures, in either payload generation (``basil``: 2025-03-31 and later; ``acacia``: before).
* :class:`Env` is one app under test: a ledger, a billing object and a webhook endpoint
  (Flask test client, or Starlette through httpx's ASGI transport), all driven synchronously.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import stripe

from metered import AsyncLedger, Feature, Ledger, Plan
from metered.clock import ManualClock
from metered.stripe import AsyncStripeBilling, CreditPack, StripeBilling
from metered.testing import StripeEventFactory, sign_stripe_payload

SECRET = "whsec_test_primary"
API_KEY = "sk_test_metered"
START = datetime(2026, 1, 15, 12, 0, tzinfo=timezone.utc)
T0 = int(START.timestamp())
DAY = 86_400
MONTH = 31 * DAY  # test periods are 31 days: 2026-01-15 -> 2026-02-15
GENERATIONS = {"basil": "2025-03-31.basil", "acacia": "2025-02-24.acacia"}

PLANS = [
    Plan("free", features={"api_calls": 100}),
    Plan(
        "pro",
        prices=["price_pro_monthly", "pro_monthly"],
        features={
            "api_calls": 1000,
            "reports": True,
            "tokens": Feature(units=1000, overage=True, meter="tokens_used"),
        },
    ),
    Plan(
        "team",
        prices=["price_team_monthly"],
        features={
            "api_calls": 5000,
            "reports": True,
            "tokens": Feature(units=5000, overage=True, meter="tokens_used"),
        },
    ),
]
PACK = CreditPack(price="price_credits_1k", feature="api_calls", units=1000, name="credits_1k")


# --------------------------------------------------------------------------- fake Stripe API


@dataclass
class Request:
    method: str
    path: str
    params: dict[str, str]
    headers: dict[str, str]


Handler = Callable[[Request, "re.Match[str]"], tuple[int, Any]]


class FakeStripe(stripe.HTTPClient):
    """Answers ``StripeClient`` requests from registered routes and records them."""

    name = "metered-fake"

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Request] = []
        self._routes: list[tuple[str, re.Pattern[str], Handler]] = []

    def route(self, method: str, path: str, handler: Handler | Any) -> None:
        """Answer ``method path`` (a regex) with ``handler(request, match)`` or a fixed body."""
        if not callable(handler):
            body = handler
            handler = lambda request, match: (200, body)  # noqa: E731
        self._routes.append((method.lower(), re.compile(path + "$"), handler))

    def request(
        self,
        method: str,
        url: str,
        headers: Any,
        post_data: Any = None,
        *,
        _usage: Any = None,
    ) -> tuple[str, int, dict[str, str]]:
        parts = urlsplit(url)
        raw = post_data.decode() if isinstance(post_data, bytes) else post_data or parts.query
        request = Request(method.lower(), parts.path, dict(parse_qsl(raw)), dict(headers or {}))
        self.requests.append(request)
        for route_method, pattern, handler in self._routes:
            match = pattern.match(parts.path)
            if route_method == request.method and match:
                status, body = handler(request, match)
                return json.dumps(body), status, {"request-id": "req_fake"}
        error = {"error": {"type": "invalid_request_error", "message": f"no route {parts.path}"}}
        return json.dumps(error), 404, {}

    async def request_async(
        self, method: str, url: str, headers: Any, post_data: Any = None
    ) -> tuple[bytes, int, dict[str, str]]:
        body, status, response_headers = self.request(method, url, headers, post_data)
        return body.encode(), status, response_headers

    def close(self) -> None:
        pass

    async def close_async(self) -> None:
        pass

    def calls(self, method: str, path: str) -> list[Request]:
        return [r for r in self.requests if r.method == method and re.fullmatch(path, r.path)]


def stripe_client(fake: FakeStripe, key: str = API_KEY) -> stripe.StripeClient:
    return stripe.StripeClient(key, http_client=fake, max_network_retries=0)


def api_error(status: int, message: str, kind: str = "invalid_request_error") -> tuple[int, Any]:
    return status, {"error": {"type": kind, "message": message}}


# --------------------------------------------------------------------------- Stripe objects

_ids = itertools.count(1)


def new_id(prefix: str) -> str:
    return f"{prefix}_{next(_ids):06d}"


def price(price_id: str, lookup_key: str | None = None) -> dict[str, Any]:
    return {
        "id": price_id,
        "object": "price",
        "active": True,
        "currency": "usd",
        "lookup_key": lookup_key,
        "product": "prod_QXg1hqf4jFNsqG",
        "recurring": {"interval": "month", "interval_count": 1, "usage_type": "licensed"},
        "type": "recurring",
        "unit_amount": 2000,
        "livemode": False,
    }


def subscription(
    sub_id: str,
    customer: str,
    price_id: str,
    *,
    period: tuple[int, int],
    generation: str = "basil",
    status: str = "active",
    subject: str | None = None,
    cancel_at_period_end: bool = False,
    lookup_key: str | None = None,
) -> dict[str, Any]:
    """A subscription; ``basil`` puts the period on the item, ``acacia`` on the subscription."""
    item: dict[str, Any] = {
        "id": f"si_{sub_id}",
        "object": "subscription_item",
        "price": price(price_id, lookup_key),
        "quantity": 1,
        "subscription": sub_id,
        "metadata": {},
    }
    sub: dict[str, Any] = {
        "id": sub_id,
        "object": "subscription",
        "customer": customer,
        "status": status,
        "cancel_at_period_end": cancel_at_period_end,
        "collection_method": "charge_automatically",
        "created": period[0],
        "start_date": period[0],
        "billing_cycle_anchor": period[0],
        "currency": "usd",
        "items": {"object": "list", "data": [item], "has_more": False},
        "metadata": {"metered_subject": subject} if subject else {},
        "livemode": False,
    }
    if generation == "basil":
        item["current_period_start"], item["current_period_end"] = period
    else:
        item["plan"] = {"id": price_id, "object": "plan", "interval": "month"}
        sub["current_period_start"], sub["current_period_end"] = period
    return sub


def invoice(
    sub_id: str,
    customer: str,
    price_id: str,
    *,
    period: tuple[int, int],
    generation: str = "basil",
    status: str = "paid",
    billing_reason: str = "subscription_cycle",
    subject: str | None = None,
) -> dict[str, Any]:
    """A subscription invoice; the line's period is the one paid for."""
    inv_id = new_id("in")
    meta = {"metered_subject": subject} if subject else {}
    line: dict[str, Any] = {
        "id": new_id("il"),
        "object": "line_item",
        "amount": 2000,
        "currency": "usd",
        "invoice": inv_id,
        "period": {"start": period[0], "end": period[1]},
        "quantity": 1,
    }
    inv: dict[str, Any] = {
        "id": inv_id,
        "object": "invoice",
        "customer": customer,
        "status": status,
        "billing_reason": billing_reason,
        "amount_due": 2000,
        "amount_paid": 2000 if status == "paid" else 0,
        "currency": "usd",
        # The previous period on renewal invoices: metered must not read these.
        "period_start": period[0] - MONTH,
        "period_end": period[0],
        "lines": {"object": "list", "data": [line], "has_more": False},
        "livemode": False,
    }
    if generation == "basil":
        line["parent"] = {
            "type": "subscription_item_details",
            "subscription_item_details": {
                "subscription": sub_id,
                "subscription_item": f"si_{sub_id}",
                "proration": False,
            },
        }
        line["pricing"] = {"type": "price_details", "price_details": {"price": price_id}}
        inv["parent"] = {
            "type": "subscription_details",
            "subscription_details": {"subscription": sub_id, "metadata": meta},
        }
    else:
        line.update(type="subscription", subscription=sub_id, proration=False)
        line["price"] = price(price_id)
        inv["subscription"] = sub_id
        inv["subscription_details"] = {"metadata": meta}
    return inv


def checkout_session(
    mode: str,
    *,
    subject: str | None,
    customer: str | None,
    subscription_id: str | None = None,
    payment_status: str = "paid",
    payment_intent: str | None = None,
    pack: CreditPack | None = None,
    quantity: int = 1,
    session_id: str | None = None,
    status: str = "complete",
) -> dict[str, Any]:
    """A checkout session as metered creates it (subject in client_reference_id + metadata)."""
    metadata = {"metered_subject": subject} if subject else {}
    if pack is not None:
        metadata.update(metered_pack=pack.key, metered_quantity=str(quantity))
    return {
        "id": session_id or new_id("cs_test"),
        "object": "checkout.session",
        "mode": mode,
        "status": status,
        "payment_status": payment_status,
        "client_reference_id": subject,
        "customer": customer,
        "subscription": subscription_id,
        "payment_intent": payment_intent,
        "metadata": metadata,
        "amount_total": 1000 * quantity,
        "currency": "usd",
        "created": T0,
        "livemode": False,
        "success_url": "https://example.com/success",
        "cancel_url": "https://example.com/cancel",
        "url": None,
    }


def charge(
    payment_intent: str,
    *,
    amount: int,
    amount_refunded: int,
    metadata: dict[str, str] | None = None,
) -> dict[str, Any]:
    return {
        "id": new_id("ch"),
        "object": "charge",
        "amount": amount,
        "amount_captured": amount,
        "amount_refunded": amount_refunded,
        "refunded": amount_refunded >= amount,
        "currency": "usd",
        "paid": True,
        "status": "succeeded",
        "payment_intent": payment_intent,
        "metadata": metadata or {},
        "livemode": False,
    }


def deleted_customer(customer: str) -> dict[str, Any]:
    return {"id": customer, "object": "customer", "deleted": True, "livemode": False}


def entitlement_summary(customer: str, lookup_keys: list[str]) -> dict[str, Any]:
    return {
        "object": "entitlements.active_entitlement_summary",
        "customer": customer,
        "livemode": False,
        "entitlements": {
            "object": "list",
            "has_more": False,
            "url": "/v1/customer/entitlements",
            "data": [
                {
                    "id": new_id("ent"),
                    "object": "entitlements.active_entitlement",
                    "lookup_key": key,
                    "feature": {
                        "id": new_id("feat"),
                        "object": "entitlements.feature",
                        "lookup_key": key,
                        "name": key,
                        "active": True,
                    },
                    "livemode": False,
                }
                for key in lookup_keys
            ],
        },
    }


# --------------------------------------------------------------------------- apps under test


@dataclass
class Response:
    status: int
    body: Any
    content_type: str


class _OnLoop:
    """Runs an async object's coroutine methods to completion on the env's event loop."""

    def __init__(self, target: Any, runner: asyncio.Runner) -> None:
        self._target, self._runner = target, runner

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if not asyncio.iscoroutinefunction(attr):
            return attr
        return lambda *args, **kwargs: self._runner.run(attr(*args, **kwargs))


@dataclass
class Env:
    """An app with a Stripe webhook endpoint, its ledger and billing, driven synchronously.

    ``kind``: ``flask`` (StripeBilling behind the blueprint), ``starlette-async``
    (AsyncStripeBilling on an AsyncLedger, asyncpg on PostgreSQL) or ``starlette-sync``
    (StripeBilling behind the route, run in the thread pool).
    """

    kind: str
    url: str
    clock: ManualClock
    options: dict[str, Any] = field(default_factory=dict)
    generation: str = "basil"
    fake: FakeStripe = field(default_factory=FakeStripe)

    def __post_init__(self) -> None:
        self.options.setdefault("credit_packs", [PACK])
        self.options.setdefault("sleep", lambda seconds: None)
        self.events = StripeEventFactory(SECRET, api_version=GENERATIONS[self.generation])
        self._last_created = 0
        self._engine: Any = None
        client = stripe_client(self.fake)
        self._runner = asyncio.Runner()
        ledger_options: dict[str, Any] = {
            "plans": PLANS,
            "default_plan": "free",
            "clock": self.clock,
        }
        if self.kind == "starlette-async":
            # On PostgreSQL the async app runs on asyncpg ($n parameters, strict types); the
            # sync apps cover psycopg, whose async driver takes the same statements.
            async_url = self.url.replace("postgresql://", "postgresql+asyncpg://", 1)
            raw_ledger = AsyncLedger(async_url, **ledger_options)
            self._runner.run(raw_ledger.create_schema())
            raw_billing: Any = AsyncStripeBilling(
                raw_ledger,
                client=client,
                webhook_secret=self.options.pop("webhook_secret", SECRET),
                **{**self.options, "sleep": _async_noop},
            )
            self.ledger: Any = _OnLoop(raw_ledger, self._runner)
            self.billing: Any = _OnLoop(raw_billing, self._runner)
        else:
            raw_ledger = Ledger(self.url, **ledger_options)
            raw_ledger.create_schema()
            raw_billing = StripeBilling(
                raw_ledger,
                client=client,
                webhook_secret=self.options.pop("webhook_secret", SECRET),
                **self.options,
            )
            self.ledger = raw_ledger
            self.billing = raw_billing
        self._raw_ledger = raw_ledger
        self.raw_billing = raw_billing
        if self.kind == "flask":
            from flask import Flask

            from metered.integrations._stripe_flask import stripe_webhook_blueprint

            app = Flask(__name__)
            app.register_blueprint(stripe_webhook_blueprint(raw_billing))
            self._flask = app.test_client()
        else:
            import httpx
            from starlette.applications import Starlette

            from metered.integrations._stripe_starlette import stripe_webhook_route

            app = Starlette(routes=[stripe_webhook_route(raw_billing)])
            self._http = httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://testserver"
            )

    # -- posting events

    def post_raw(self, body: bytes, headers: dict[str, str]) -> Response:
        if self.kind == "flask":
            r = self._flask.post("/stripe/webhook", data=body, headers=headers)
            return Response(r.status_code, r.get_json(silent=True), r.content_type)
        response = self._runner.run(
            self._http.post("/stripe/webhook", content=body, headers=headers)
        )
        return Response(response.status_code, response.json(), response.headers["content-type"])

    def event(
        self, type: str, obj: dict[str, Any], *, created: int | None = None, **options: Any
    ) -> dict[str, Any]:
        """An event envelope; ``created`` defaults to the clock, strictly increasing per env
        (Stripe stamps seconds; tests that want ties or reordering pass ``created``)."""
        if created is None:
            created = max(self.clock.now_us() // 1_000_000, self._last_created + 1)
            self._last_created = created
        return self.events.event(type, obj, created=created, **options)

    def body(
        self, event: dict[str, Any], *, secret: str = SECRET, timestamp: int | None = None
    ) -> tuple[bytes, dict[str, str]]:
        payload = json.dumps(event).encode()
        ts = self.clock.now_us() // 1_000_000 if timestamp is None else timestamp
        return payload, {
            "Stripe-Signature": sign_stripe_payload(payload, secret, timestamp=ts),
            "Content-Type": "application/json",
        }

    def send(self, event: dict[str, Any], **sign: Any) -> Response:
        return self.post_raw(*self.body(event, **sign))

    def post(
        self, type: str, obj: dict[str, Any], *, created: int | None = None, **options: Any
    ) -> Response:
        """Post one correctly signed event; returns the endpoint's response."""
        return self.send(self.event(type, obj, created=created, **options))

    def ok(
        self, type: str, obj: dict[str, Any], *, created: int | None = None, **options: Any
    ) -> str:
        """Post an event that must be accepted (HTTP 200); returns its outcome."""
        response = self.post(type, obj, created=created, **options)
        assert response.status == 200, (response.status, response.body)
        return str(response.body["outcome"])

    # -- helpers

    def subscription(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return subscription(*args, generation=self.generation, **kwargs)

    def invoice(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return invoice(*args, generation=self.generation, **kwargs)

    def rows(self, table: str) -> list[tuple[Any, ...]]:
        """Every row of a metered table, ordered by primary key (straight from the database)."""
        from sqlalchemy import create_engine, select

        from metered._drivers import resolve_url
        from metered.schema import metadata

        if self._engine is None:
            self._engine = create_engine(resolve_url(self.url, asynchronous=False).sqlalchemy_url)
        model = metadata.tables[table]
        with self._engine.connect() as conn:
            query = select(model).order_by(*model.primary_key.columns)
            return [tuple(row) for row in conn.execute(query)]

    def subject_row(self, subject: str) -> dict[str, Any]:
        """The subject's subscription state as stored (plan, status, period, cancel flag)."""
        from metered.schema import subjects

        names = [c.name for c in subjects.columns]
        rows = [dict(zip(names, row)) for row in self.rows("metered_subjects")]
        return next(row for row in rows if row["subject"] == subject)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
        if self.kind != "flask":
            self._runner.run(self._http.aclose())
        if self.kind == "starlette-async":
            self._runner.run(self._raw_ledger.close())
        else:
            self._raw_ledger.close()
        self._runner.close()


async def _async_noop(seconds: float) -> None:
    return None


__all__ = ["DAY", "MONTH", "T0", "timedelta"]
