"""Meter a Starlette app without touching its handlers: ``MeteredMiddleware`` with rules.

The subject comes from Starlette's ``AuthenticationMiddleware`` (``request.user``), fed by an
API key backend. Runs on the embedded SQLite default (``sqlite:///metered.db``, or
``$METERED_DATABASE_URL``) on http://127.0.0.1:8000 (``$PORT`` to change it)::

    python examples/starlette_middleware.py
    curl -s -X POST localhost:8000/v1/search -H 'X-API-Key: key_alice' -i   # 1 unit
    curl -s -X POST localhost:8000/v1/export -H 'X-API-Key: key_alice' -d 'some rows' -i
    curl -s localhost:8000/v1/reports/q1 -H 'X-API-Key: key_alice' -i        # 403: free plan
    curl -s localhost:8000/health                                            # never metered

Importing this module has no side effects; the schema is created when the server starts.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.authentication import AuthCredentials, AuthenticationBackend, SimpleUser
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from metered import AsyncLedger, Plan
from metered.integrations.starlette import MeteredMiddleware, Rule, current_ticket

PLANS = [
    Plan("free", features={"api_calls": 100}),
    Plan("pro", prices=["price_pro_monthly"], features={"api_calls": 10_000, "reports": True}),
]
API_KEYS = {"key_alice": "user_alice", "key_bob": "user_bob"}
"""API key -> subject reference (use your own table)."""

RULES = [
    Rule("/v1/reports/*", units=0, requires="reports"),  # entitlement only
    Rule(  # priced by payload size: 1 unit per started KiB
        "/v1/export",
        methods=["POST"],
        units=lambda request: 1 + int(request.headers.get("content-length") or 0) // 1024,
        feature="api_calls",
    ),
    Rule("/v1/*", methods=["POST"], units=1, feature="api_calls"),  # everything else: 1 unit
]


class APIKeyBackend(AuthenticationBackend):
    """``X-API-Key`` -> ``request.user`` (SimpleUser named after the subject)."""

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, SimpleUser] | None:
        subject = API_KEYS.get(conn.headers.get("x-api-key", ""))
        return None if subject is None else (AuthCredentials(["api"]), SimpleUser(subject))


def user_subject(request: Request) -> str | None:
    """The Starlette ``request.user`` recipe."""
    return request.user.username if request.user.is_authenticated else None


async def search(request: Request) -> Response:
    return JSONResponse({"results": [], "metered": current_ticket(request) is not None})


async def export(request: Request) -> Response:
    rows = (await request.body()).count(b"\n") + 1
    return JSONResponse({"exported_rows": rows})


async def report(request: Request) -> Response:
    return JSONResponse({"report": request.path_params["name"]})


async def health(request: Request) -> Response:
    return PlainTextResponse("ok")


def create_app(database_url: str | None = None) -> Starlette:
    """The app, on ``database_url`` (default: ``$METERED_DATABASE_URL`` or metered.db)."""
    ledger = AsyncLedger(database_url, plans=PLANS, default_plan="free")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await ledger.create_schema()
        yield
        await ledger.close()

    app = Starlette(
        routes=[
            Route("/v1/search", search, methods=["POST"]),
            Route("/v1/export", export, methods=["POST"]),
            Route("/v1/reports/{name}", report),
            Route("/health", health),
        ],
        middleware=[
            Middleware(AuthenticationMiddleware, backend=APIKeyBackend()),  # before metering
            Middleware(MeteredMiddleware, ledger=ledger, subject=user_subject, rules=RULES),
        ],
        lifespan=lifespan,
    )
    app.state.ledger = ledger
    return app


app = create_app()

if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
