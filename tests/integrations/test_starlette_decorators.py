"""Starlette decorators on real Starlette apps over SQLite and PostgreSQL (httpx in-process).

The ledger's own balance is the proof of what was charged.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from apps.asgi_support import (
    PLANS,
    H,
    client,
    eventually_held,
    module_fixtures,
    spent,
)
from starlette.applications import Starlette
from starlette.endpoints import HTTPEndpoint
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from metered import AsyncLedger, ConfigurationError
from metered.integrations.starlette import (
    Metered,
    MeteredMiddleware,
    PaymentRequired,
    Ticket,
    consumes,
    current_ticket,
    requires_entitlement,
    settle,
)

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


db_url, ledger, subject = module_fixtures("starlette")


gate: dict[str, asyncio.Event] = {}


def make_app(ledger: AsyncLedger, **options: Any) -> Starlette:
    @consumes(3, feature="api_calls")
    async def generate(request: Request) -> Response:
        ticket = request.state.metered
        assert isinstance(ticket, Ticket) and current_ticket(request) is ticket
        return JSONResponse({"replayed": ticket.replayed})

    @consumes(3, feature="api_calls")
    def generate_sync(request: Request) -> Response:
        return PlainTextResponse("sync")

    @consumes(3, feature="api_calls")
    async def raises(request: Request) -> Response:
        raise RuntimeError("handler failed")

    @consumes(3, feature="api_calls")
    async def status(request: Request) -> Response:
        code = int(request.path_params["code"])
        if code == 404:
            raise HTTPException(404)
        return PlainTextResponse("status", status_code=code)

    @consumes(100, feature="tokens")
    async def tokens(request: Request) -> Response:
        used = int(request.query_params.get("used", "100"))
        settle(request, used, feature="tokens")
        return JSONResponse({"used": used})

    @requires_entitlement("reports")
    @consumes(2, feature="api_calls")
    async def report(request: Request) -> Response:
        return PlainTextResponse("report")

    @consumes(lambda request: int(request.headers["content-length"]), feature="api_calls")
    async def sized(request: Request) -> Response:
        return PlainTextResponse(str(len(await request.body())))

    async def body_size(request: Request) -> int:
        return len(await request.body())

    @consumes(body_size, feature="api_calls")
    async def async_sized(request: Request) -> Response:
        return PlainTextResponse((await request.body()).decode())

    @consumes(1, feature="api_calls", key=lambda request: request.query_params.get("op"))
    async def keyed(request: Request) -> Response:
        return PlainTextResponse("keyed")

    @consumes(1, feature="api_calls")
    async def slow(request: Request) -> Response:
        await gate[request.headers["x-gate"]].wait()
        return PlainTextResponse("slow")

    @consumes(2, feature="api_calls", commit_on=lambda status: status < 500)
    async def lenient(request: Request) -> Response:
        return PlainTextResponse("gone", status_code=410)

    @consumes(4, feature="api_calls")
    async def stream(request: Request) -> Response:
        fail = request.query_params.get("fail") == "1"

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(3):
                if fail and i == 2:
                    raise RuntimeError("boom while streaming")
                yield b"chunk\n"

        return StreamingResponse(chunks(), media_type="text/plain")

    class Items(HTTPEndpoint):
        @consumes(2, feature="api_calls")
        async def post(self, request: Request) -> Response:
            return PlainTextResponse("created", status_code=201)

        @requires_entitlement("reports")
        def get(self, request: Request) -> Response:
            return PlainTextResponse("listed")

    routes = [
        Route("/generate", generate, methods=["POST"]),
        Route("/generate-sync", generate_sync, methods=["POST"]),
        Route("/raise", raises, methods=["POST"]),
        Route("/status/{code:int}", status, methods=["POST"]),
        Route("/tokens", tokens, methods=["POST"]),
        Route("/report", report),
        Route("/sized", sized, methods=["POST"]),
        Route("/async-sized", async_sized, methods=["POST"]),
        Route("/keyed", keyed, methods=["POST"]),
        Route("/slow", slow, methods=["POST"]),
        Route("/lenient", lenient, methods=["POST"]),
        Route("/stream", stream),
        Route("/items", Items),
    ]
    app = Starlette(routes=routes)
    options.setdefault("subject", lambda request: request.headers.get("x-subject"))
    Metered(app, ledger=ledger, **options)
    return app


async def test_success_charges_once_and_sends_the_balance_header(
    ledger: AsyncLedger, subject: str
) -> None:
    async with client(make_app(ledger)) as c:
        r = await c.post("/generate", headers=H(subject))
        assert r.status_code == 200 and r.json() == {"replayed": False}
        assert r.headers["metered-remaining"] == "7"
        assert await spent(ledger, subject) == (3, 0)
        r = await c.post("/generate-sync", headers=H(subject))
        assert r.status_code == 200 and r.text == "sync"
        assert r.headers["metered-remaining"] == "4"
    assert await spent(ledger, subject) == (6, 0)


@pytest.mark.parametrize(
    ("path", "status"),
    [("/raise", 500), ("/status/404", 404), ("/status/400", 400), ("/status/503", 503)],
)
async def test_failures_charge_nothing(
    ledger: AsyncLedger, subject: str, path: str, status: int
) -> None:
    async with client(make_app(ledger), raise_app_exceptions=False) as c:
        r = await c.post(path, headers=H(subject))
    assert r.status_code == status
    assert "metered-remaining" not in r.headers
    assert await spent(ledger, subject) == (0, 0)


async def test_commit_policy_per_decorator(ledger: AsyncLedger, subject: str) -> None:
    async with client(make_app(ledger)) as c:
        r = await c.post("/lenient", headers=H(subject))
    assert r.status_code == 410 and r.headers["metered-remaining"] == "8"
    assert await spent(ledger, subject) == (2, 0)


async def test_global_commit_policy(ledger: AsyncLedger, subject: str) -> None:
    app = make_app(ledger, commit_on=lambda status: status < 300)
    async with client(app) as c:
        assert (await c.post("/status/302", headers=H(subject))).status_code == 302
        assert (await c.post("/status/200", headers=H(subject))).status_code == 200
    assert await spent(ledger, subject) == (3, 0)


async def test_denials_are_problem_json(ledger: AsyncLedger, subject: str) -> None:
    async with client(make_app(ledger)) as c:
        r = await c.post("/generate")
        assert r.status_code == 401
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["type"] == "urn:metered:problem:subject-required"

        r = await c.get("/report", headers=H(subject))
        assert r.status_code == 403
        body = r.json()
        assert body["type"] == "urn:metered:problem:no-entitlement"
        assert body["feature"] == "reports" and body["status"] == 403

        for _ in range(3):
            assert (await c.post("/generate", headers=H(subject))).status_code == 200
        r = await c.post("/generate", headers=H(subject))
        assert r.status_code == 402
        assert r.headers["content-type"] == "application/problem+json"
        body = r.json()
        assert body["type"] == "urn:metered:problem:insufficient-units"
        assert body["feature"] == "api_calls"
        assert body["usage_remaining"] == 1 and body["units_requested"] == 3
        assert "metered-remaining" not in r.headers
    assert await spent(ledger, subject) == (9, 0)


async def test_idempotent_replay_and_conflicts(ledger: AsyncLedger, subject: str) -> None:
    async with client(make_app(ledger)) as c:
        first = await c.post("/generate", headers=H(subject, idempotency_key="k-1"))
        again = await c.post("/generate", headers=H(subject, idempotency_key="k-1"))
        assert first.json() == {"replayed": False} and again.json() == {"replayed": True}
        assert await spent(ledger, subject) == (3, 0)
        # the same key for a different operation (another amount)
        r = await c.post("/sized", headers=H(subject, idempotency_key="k-1"), content=b"12345")
        assert r.status_code == 422
        assert r.json()["type"] == "urn:metered:problem:idempotency-key-reused"
        r = await c.post("/generate", headers=H(subject, idempotency_key="k" * 300))
        assert r.status_code == 400
        assert r.json()["type"] == "urn:metered:problem:invalid-idempotency-key"
        # a callable key
        assert (await c.post("/keyed?op=a", headers=H(subject))).status_code == 200
        assert (await c.post("/keyed?op=a", headers=H(subject))).status_code == 200
    assert await spent(ledger, subject) == (4, 0)


async def test_same_key_in_flight_is_409(ledger: AsyncLedger, subject: str) -> None:
    gate[subject] = asyncio.Event()
    async with client(make_app(ledger)) as c:
        headers = H(subject, idempotency_key="dup", x_gate=subject)
        first = asyncio.ensure_future(c.post("/slow", headers=headers))
        await eventually_held(ledger, subject)
        second = await c.post("/slow", headers=headers)
        assert second.status_code == 409
        problem = second.json()
        assert problem["type"] == "urn:metered:problem:operation-in-progress"
        assert problem["key"] == "dup"
        gate[subject].set()
        assert (await first).status_code == 200
    assert await spent(ledger, subject) == (1, 0)


async def test_settle_with_fewer_units(ledger: AsyncLedger, subject: str) -> None:
    await ledger.assign_plan(subject, "pro")
    async with client(make_app(ledger)) as c:
        r = await c.post("/tokens?used=30", headers=H(subject))
    assert r.status_code == 200
    assert r.headers["metered-remaining"] == "470"
    assert await spent(ledger, subject, "tokens") == (30, 0)


async def test_stacking_entitlement_above_consumes(ledger: AsyncLedger, subject: str) -> None:
    async with client(make_app(ledger)) as c:
        assert (await c.get("/report", headers=H(subject))).status_code == 403
        assert await spent(ledger, subject) == (0, 0)
        await ledger.assign_plan(subject, "pro")
        r = await c.get("/report", headers=H(subject))
        assert r.status_code == 200 and r.headers["metered-remaining"] == "998"
    assert await spent(ledger, subject) == (2, 0)


async def test_http_endpoint_methods(ledger: AsyncLedger, subject: str) -> None:
    async with client(make_app(ledger)) as c:
        assert (await c.get("/items", headers=H(subject))).status_code == 403
        await ledger.assign_plan(subject, "pro")
        assert (await c.get("/items", headers=H(subject))).text == "listed"
        assert (await c.post("/items", headers=H(subject))).status_code == 201
    assert await spent(ledger, subject) == (2, 0)


async def test_units_from_the_request(ledger: AsyncLedger, subject: str) -> None:
    async with client(make_app(ledger)) as c:
        r = await c.post("/sized", headers=H(subject), content=b"12345")
        assert r.status_code == 200 and r.text == "5"
        r = await c.post("/async-sized", headers=H(subject), content=b"abc")
        assert r.status_code == 200 and r.text == "abc"  # the body is still readable
    assert await spent(ledger, subject) == (8, 0)


async def test_streaming_commits_after_the_last_chunk(ledger: AsyncLedger, subject: str) -> None:
    async with client(make_app(ledger)) as c:
        r = await c.get("/stream", headers=H(subject))
        assert r.status_code == 200 and r.text == "chunk\n" * 3
        assert await spent(ledger, subject) == (4, 0)
        with pytest.raises(RuntimeError, match="boom while streaming"):
            await c.get("/stream?fail=1", headers=H(subject))
    assert await spent(ledger, subject) == (4, 0)


async def test_custom_handler_renders_a_denial(ledger: AsyncLedger, subject: str) -> None:
    app = make_app(ledger)

    async def upgrade_page(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, PaymentRequired)
        return JSONResponse({"upgrade": exc.fields["usage_remaining"]}, status_code=402)

    app.add_exception_handler(PaymentRequired, upgrade_page)
    async with client(app) as c:
        for _ in range(3):
            await c.post("/generate", headers=H(subject))
        r = await c.post("/generate", headers=H(subject))
    assert r.status_code == 402 and r.json() == {"upgrade": 1}


async def test_bare_middleware_renders_decorator_denials(ledger: AsyncLedger, subject: str) -> None:
    @requires_entitlement("reports")
    async def report(request: Request) -> Response:
        return PlainTextResponse("report")

    app = Starlette(
        routes=[Route("/report", report)],
        middleware=[
            Middleware(
                MeteredMiddleware,
                ledger=ledger,
                subject=lambda request: request.headers.get("x-subject"),
            )
        ],
    )
    async with client(app) as c:
        r = await c.get("/report", headers=H(subject))
    assert r.status_code == 403
    assert r.headers["content-type"] == "application/problem+json"
    assert json.loads(r.content)["feature"] == "reports"


async def test_decorators_without_metered_raise_a_configuration_error(
    ledger: AsyncLedger,
) -> None:
    @consumes(1, feature="api_calls")
    async def endpoint(request: Request) -> Response:
        return PlainTextResponse("never")

    app = Starlette(routes=[Route("/x", endpoint)])
    async with client(app) as c:
        with pytest.raises(ConfigurationError, match="Metered"):
            await c.get("/x")


def test_decorator_misuse_fails_at_decoration_time() -> None:
    with pytest.raises(TypeError, match="generator"):

        @consumes(1)
        async def agen(request: Request) -> AsyncIterator[bytes]:
            yield b""

    with pytest.raises(ValueError):
        consumes(0)
    with pytest.raises(TypeError, match="callable"):
        consumes(1, key="constant")  # type: ignore[arg-type]


async def test_settle_without_a_ticket_is_an_error(ledger: AsyncLedger) -> None:
    async def endpoint(request: Request) -> Response:
        with pytest.raises(ConfigurationError, match="no metered ticket"):
            settle(request, 1)
        assert current_ticket(request) is None
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/x", endpoint)])
    Metered(app, ledger=ledger, subject=lambda request: "someone")
    async with client(app) as c:
        assert (await c.get("/x")).status_code == 200


def test_a_sync_ledger_is_refused(tmp_path: Path) -> None:
    from metered import Ledger

    with (
        Ledger(f"sqlite:///{tmp_path / 'l.db'}", plans=PLANS) as sync_ledger,
        pytest.raises(ConfigurationError, match="AsyncLedger"),
    ):
        Metered(Starlette(), ledger=sync_ledger)  # type: ignore[arg-type]


def test_decorators_keep_signature_and_coroutine_ness() -> None:
    async def handler(request: Request) -> Response:
        return PlainTextResponse("a")

    def sync_handler(request: Request) -> Response:
        return PlainTextResponse("s")

    for func in (handler, sync_handler):
        for decorator in (consumes(1, feature="api_calls"), requires_entitlement("reports")):
            wrapped = decorator(func)
            assert inspect.iscoroutinefunction(wrapped) is inspect.iscoroutinefunction(func)
            assert inspect.signature(wrapped) == inspect.signature(func)
            assert wrapped.__name__ == func.__name__ and inspect.unwrap(wrapped) is func
