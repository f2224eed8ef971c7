"""A metered FastAPI app: decorators, dependencies, settle, streaming, documented denials.

Runs on the embedded SQLite default (``sqlite:///metered.db`` in the working directory, or
``$METERED_DATABASE_URL``) on http://127.0.0.1:8000 (``$PORT`` to change it)::

    python examples/fastapi_app.py
    curl -s -X POST localhost:8000/generate -H 'X-API-Key: user_123' \\
         -H 'Content-Type: application/json' -d '{"prompt": "hello metered world"}' -i
    curl -s localhost:8000/balance -H 'X-API-Key: user_123'
    curl -s localhost:8000/report -H 'X-API-Key: user_123' -i     # 403: free plan
    open http://127.0.0.1:8000/docs                               # 401/402/403/409/503 documented

Importing this module has no side effects (``app`` is built, nothing is opened); the schema is
created when the server starts (lifespan).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from metered import AsyncLedger, Plan
from metered.integrations.fastapi import (
    Consumes,
    Metered,
    RequiresEntitlement,
    Ticket,
    consumes,
    metered_responses,
    settle,
)

PLANS = [
    Plan("free", features={"api_calls": 100}),
    Plan("pro", prices=["price_pro_monthly"], features={"api_calls": 10_000, "reports": True}),
]

reports = RequiresEntitlement("reports")
report_units = Consumes(5, feature="api_calls")
stream_units = Consumes(10, feature="api_calls")


class Prompt(BaseModel):
    prompt: str


class Generated(BaseModel):
    text: str
    charged: int


def api_key_subject(request: Request) -> str | None:
    """The subject is the API key's owner; here the key *is* the subject reference."""
    return request.headers.get("x-api-key")


def create_app(database_url: str | None = None) -> FastAPI:
    """The app, on ``database_url`` (default: ``$METERED_DATABASE_URL`` or metered.db)."""
    ledger = AsyncLedger(database_url, plans=PLANS, default_plan="free")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await ledger.create_schema()
        yield
        await ledger.close()

    app = FastAPI(title="metered FastAPI example", lifespan=lifespan)
    Metered(app, ledger=ledger, subject=api_key_subject)

    @app.post("/generate", response_model=Generated, responses=metered_responses())
    @consumes(20, feature="api_calls")  # reserve the worst case; Idempotency-Key honoured
    async def generate(body: Prompt, request: Request) -> Generated:
        words = body.prompt.split()
        charged = max(1, len(words))
        settle(request, charged)  # charge what the work actually cost (<= 20)
        return Generated(text=" ".join(reversed(words)), charged=charged)

    @app.get(
        "/report",
        dependencies=[Depends(reports)],
        responses={**reports.responses, **report_units.responses},
    )
    async def report(ticket: Annotated[Ticket, Depends(report_units)]) -> dict[str, Any]:
        return {"report": "quarterly numbers", "remaining": ticket.usage_remaining}

    @app.get("/stream", dependencies=[Depends(stream_units)], responses=stream_units.responses)
    async def stream() -> StreamingResponse:
        async def lines() -> AsyncIterator[bytes]:
            for i in range(5):
                yield f"line {i}\n".encode()
                await asyncio.sleep(0.05)

        # charged only once the last line was sent; a client that hangs up is not charged
        return StreamingResponse(lines(), media_type="text/plain")

    @app.get("/balance")
    async def balance(request: Request) -> dict[str, Any]:
        subject = api_key_subject(request) or "anonymous"
        return (await ledger.balance(subject, "api_calls")).model_dump(mode="json")

    return app


app = create_app()

if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
