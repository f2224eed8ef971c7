"""The ASGI apps the server tests run under uvicorn (``apps.asgi_server:<factory> --factory``).

The ledger URL comes from ``METERED_TEST_APP_DB`` (the schema must already exist); the subject
is the ``X-Subject`` header. ``/stream`` streams ``chunks`` chunks, sleeping ``delay`` seconds
between them, and raises before chunk ``fail_at``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

from fastapi import Depends, FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from metered import AsyncLedger, Plan
from metered.integrations import fastapi as mfastapi
from metered.integrations import starlette as mstarlette

PLANS = [Plan("free", features={"api_calls": 100})]
STREAM_UNITS = 5


def _ledger() -> AsyncLedger:
    return AsyncLedger(os.environ["METERED_TEST_APP_DB"], plans=PLANS, default_plan="free")


def _stream(request: Request) -> StreamingResponse:
    chunks = int(request.query_params.get("chunks", "10"))
    delay = float(request.query_params.get("delay", "0"))
    fail_at = int(request.query_params.get("fail_at", "-1"))

    async def generate() -> AsyncIterator[bytes]:
        for i in range(chunks):
            if i == fail_at:
                raise RuntimeError("boom while streaming")
            yield f"chunk {i:04d}\n".encode() + b"." * 1000 + b"\n"
            if delay:
                await asyncio.sleep(delay)

    return StreamingResponse(generate(), media_type="text/plain")


def subject(request: Request) -> str | None:
    return request.headers.get("x-subject")


def starlette_app() -> Starlette:
    """Decorated Starlette endpoints."""

    async def health(request: Request) -> Response:
        return PlainTextResponse("ok")

    @mstarlette.consumes(1, feature="api_calls")
    async def charge(request: Request) -> Response:
        return PlainTextResponse("charged")

    @mstarlette.consumes(STREAM_UNITS, feature="api_calls")
    async def stream(request: Request) -> Response:
        return _stream(request)

    app = Starlette(
        routes=[
            Route("/health", health),
            Route("/charge", charge, methods=["POST"]),
            Route("/stream", stream),
        ]
    )
    mstarlette.Metered(app, ledger=_ledger(), subject=subject)
    return app


def fastapi_app() -> FastAPI:
    """A FastAPI decorator route and a dependency route."""
    app = FastAPI()
    mfastapi.Metered(app, ledger=_ledger(), subject=subject)

    @app.get("/health")
    async def health() -> str:
        return "ok"

    @app.post("/charge")
    @mfastapi.consumes(1, feature="api_calls")
    async def charge() -> dict[str, bool]:
        return {"ok": True}

    @app.get(
        "/stream", dependencies=[Depends(mfastapi.Consumes(STREAM_UNITS, feature="api_calls"))]
    )
    async def stream(request: Request) -> Response:
        return _stream(request)

    return app
