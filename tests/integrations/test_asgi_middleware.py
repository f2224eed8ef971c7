"""The pure ASGI middleware: rules, settlement from the ``send`` stream, disconnects, fail-open.

Most tests drive real Starlette apps in-process with httpx; the ``send``/``receive`` edge cases
(disconnects, ``pathsend``, trailers, a server whose ``send`` raises) drive the middleware with
hand-written ASGI callables, which is exactly what a server does.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from apps.asgi_support import (
    H,
    async_ledger,
    client,
    module_fixtures,
    spent,
)
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.types import Message, Receive, Scope, Send
from starlette.websockets import WebSocket

from metered import AsyncLedger
from metered.integrations.asgi import Metered, MeteredMiddleware, Rule, exempt_path
from metered.integrations.starlette import consumes, current_ticket, settle

db_url, ledger, subject = module_fixtures("asgi")


def by_header(request: Request) -> str | None:
    return request.headers.get("x-subject")


async def echo(request: Request) -> Response:
    ticket = current_ticket(request)
    if "settle" in request.query_params:
        settle(request, int(request.query_params["settle"]))
    return JSONResponse({"ticket": ticket is not None, "path": request.url.path})


async def fail(request: Request) -> Response:
    code = int(request.query_params.get("code", "500"))
    if code == 0:
        raise RuntimeError("handler failed")
    return PlainTextResponse("failed", status_code=code)


@consumes(3, feature="api_calls")
async def decorated(request: Request) -> Response:
    return PlainTextResponse("decorated")


@consumes(7, feature="tokens")
async def decorated_tokens(request: Request) -> Response:
    return PlainTextResponse("tokens")


RULES = [
    Rule("/v1/reports/*", units=0, requires="reports"),
    Rule(
        "/v1/sized",
        methods=["POST"],
        units=lambda r: int(r.headers["content-length"]),
        feature="api_calls",
    ),
    Rule("/v1/keyed", units=1, feature="api_calls", key=lambda r: r.query_params.get("op")),
    Rule(re.compile(r"/v1/items/\d+"), methods=["DELETE"], units=4, feature="api_calls"),
    Rule("/v1/*", methods=["POST"], units=2, feature="api_calls"),
]


def rules_app(ledger: AsyncLedger, **options: Any) -> Starlette:
    routes = [
        Route("/v1/{path:path}", echo, methods=["GET", "POST", "DELETE"]),
        Route("/fail", fail, methods=["POST"]),
        Route("/decorated", decorated, methods=["POST"]),
        Route("/decorated-tokens", decorated_tokens, methods=["POST"]),
        Route("/other", echo, methods=["POST"]),
    ]
    options.setdefault("subject", by_header)
    options.setdefault("rules", RULES)
    return Starlette(
        routes=routes, middleware=[Middleware(MeteredMiddleware, ledger=ledger, **options)]
    )


# --------------------------------------------------------------------------- rules


async def test_rules_by_method_and_path(ledger: AsyncLedger, subject: str) -> None:
    async with client(rules_app(ledger)) as c:
        r = await c.get("/v1/things", headers=H(subject))
        assert r.json() == {"ticket": False, "path": "/v1/things"}
        assert "metered-remaining" not in r.headers
        r = await c.post("/v1/things", headers=H(subject))
        assert r.json()["ticket"] is True and r.headers["metered-remaining"] == "8"
        assert (await c.post("/other", headers=H(subject))).json()["ticket"] is False
        r = await c.delete("/v1/items/12", headers=H(subject))
        assert r.headers["metered-remaining"] == "4"
        assert (await c.delete("/v1/items/abc", headers=H(subject))).json()["ticket"] is False
        r = await c.post("/v1/sized", headers=H(subject), content=b"abc")
        assert r.headers["metered-remaining"] == "1"
    assert await spent(ledger, subject) == (9, 0)


async def test_rule_denials_never_reach_the_app(ledger: AsyncLedger, subject: str) -> None:
    async with client(rules_app(ledger)) as c:
        r = await c.post("/v1/things")
        assert r.status_code == 401
        assert r.headers["content-type"] == "application/problem+json"
        r = await c.get("/v1/reports/q1", headers=H(subject))
        assert r.status_code == 403 and r.json()["feature"] == "reports"
        await ledger.assign_plan(subject, "pro")
        r = await c.get("/v1/reports/q1", headers=H(subject))
        assert r.status_code == 200 and r.json()["ticket"] is False  # entitlement-only rule
        r = await c.post("/v1/sized", headers=H(subject), content=b"x" * 1001)
        assert r.status_code == 402
        body = r.json()
        assert body["usage_remaining"] == 1000 and body["units_requested"] == 1001
    assert await spent(ledger, subject) == (0, 0)


async def test_rule_settle_and_keys(ledger: AsyncLedger, subject: str) -> None:
    async with client(rules_app(ledger)) as c:
        r = await c.post("/v1/things?settle=1", headers=H(subject))
        assert r.headers["metered-remaining"] == "9"
        assert (await c.post("/v1/keyed?op=a", headers=H(subject))).status_code == 200
        assert (await c.post("/v1/keyed?op=a", headers=H(subject))).status_code == 200
        headers = H(subject, idempotency_key="same")
        assert (await c.post("/v1/things", headers=headers)).status_code == 200
        assert (await c.post("/v1/things", headers=headers)).status_code == 200
    assert await spent(ledger, subject) == (4, 0)


@pytest.mark.parametrize("code", [0, 400, 404, 500, 503])
async def test_rule_failures_charge_nothing(ledger: AsyncLedger, subject: str, code: int) -> None:
    app = rules_app(ledger, rules=[Rule("/fail", units=2, feature="api_calls")])
    async with client(app, raise_app_exceptions=False) as c:
        r = await c.post(f"/fail?code={code}", headers=H(subject))
    assert r.status_code == (code or 500)
    assert await spent(ledger, subject) == (0, 0)


async def test_exempt_paths_are_never_metered(ledger: AsyncLedger, subject: str) -> None:
    exempt_path("/v1/stripe-webhook-test/")
    async with client(rules_app(ledger)) as c:
        r = await c.post("/v1/stripe-webhook-test", headers=H(None))
        assert r.status_code == 200 and r.json()["ticket"] is False


async def test_middleware_and_decorator_charge_once(ledger: AsyncLedger, subject: str) -> None:
    rules = [Rule("/decorated*", methods=["POST"], units=2, feature="api_calls")]
    async with client(rules_app(ledger, rules=rules)) as c:
        r = await c.post("/decorated", headers=H(subject))
        assert r.status_code == 200 and r.headers["metered-remaining"] == "8"
        assert await spent(ledger, subject) == (2, 0)
        # a decorator for another feature is another meter, charged on its own
        await ledger.assign_plan(subject, "pro")
        assert (await c.post("/decorated-tokens", headers=H(subject))).status_code == 200
        assert (await c.post("/decorated-tokens", headers=H(subject))).status_code == 200
    assert await spent(ledger, subject) == (4, 0)
    assert await spent(ledger, subject, "tokens") == (14, 0)


async def test_metered_plus_rules_middleware_charge_once(ledger: AsyncLedger, subject: str) -> None:
    """``Metered(app)`` and an explicit rules middleware nest; one charge per feature."""
    app = rules_app(ledger, rules=[Rule("/decorated", units=5, feature="api_calls")])
    Metered(app, ledger=ledger, subject=by_header)
    headers = H(subject, idempotency_key="nested")
    async with client(app) as c:
        assert (await c.post("/decorated", headers=headers)).status_code == 200
        assert (await c.post("/decorated", headers=headers)).status_code == 200
    assert await spent(ledger, subject) == (5, 0)


async def test_lifespan_and_websockets_pass_through(ledger: AsyncLedger, subject: str) -> None:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        yield {"greeting": "hello"}

    async def hello(request: Request) -> Response:
        return PlainTextResponse(request.state.greeting + " " + str(request.state.metered.units))

    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text("ws ok")
        await websocket.close()

    app = Starlette(
        routes=[Route("/hello", hello), WebSocketRoute("/ws", ws)],
        lifespan=lifespan,
        middleware=[
            Middleware(
                MeteredMiddleware,
                ledger=ledger,
                subject=by_header,
                rules=[Rule("/*", units=1, feature="api_calls")],
            )
        ],
    )
    # lifespan: what uvicorn does at start-up
    state: dict[str, Any] = {}
    sent: list[Message] = []
    started = asyncio.Event()
    inbox = [{"type": "lifespan.startup"}]

    async def lifespan_receive() -> Message:
        if inbox:
            return inbox.pop()
        await asyncio.Event().wait()
        raise AssertionError  # pragma: no cover

    async def lifespan_send(message: Message) -> None:
        sent.append(message)
        started.set()

    task = asyncio.ensure_future(
        app(
            {"type": "lifespan", "asgi": {"version": "3.0"}, "state": state},
            lifespan_receive,
            lifespan_send,
        )
    )
    await asyncio.wait_for(started.wait(), 10)
    assert sent == [{"type": "lifespan.startup.complete"}] and state == {"greeting": "hello"}
    task.cancel()

    server = Server()
    await server.run(app, "/hello", subject=subject, state=dict(state))
    assert server.messages[-1]["body"] == b"hello 1"
    assert await spent(ledger, subject) == (1, 0)

    # a websocket: no metering, no interference
    ws_sent: list[Message] = []
    ws_inbox = [{"type": "websocket.connect"}]

    async def ws_receive() -> Message:
        if ws_inbox:
            return ws_inbox.pop()
        return {"type": "websocket.disconnect", "code": 1000}

    async def ws_send(message: Message) -> None:
        ws_sent.append(message)

    scope = {
        "type": "websocket",
        "path": "/ws",
        "headers": [],
        "query_string": b"",
        "root_path": "",
    }
    await app(scope, ws_receive, ws_send)
    assert [m["type"] for m in ws_sent] == ["websocket.accept", "websocket.send", "websocket.close"]


# --------------------------------------------------------------------------- fail open / closed


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("sqlite:///{tmp}/no-schema.db", id="sqlite-no-schema"),
        pytest.param("sqlite:///{tmp}/no/such/dir/ledger.db", id="sqlite-missing-dir"),
        pytest.param("postgresql://postgres@127.0.0.1:{port}/test", id="pg-nobody-listens"),
    ],
)
@pytest.mark.parametrize("fail_open", [False, True])
async def test_ledger_unreachable(
    url: str, fail_open: bool, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from apps.asgi_support import free_port

    broken = async_ledger(url.format(tmp=tmp_path, port=free_port()), timeout=0.2)
    app = rules_app(broken, fail_open=fail_open)
    Metered(app, ledger=broken, subject=by_header, fail_open=fail_open)
    app.router.routes.append(Route("/report", _report, methods=["POST"]))
    async with client(app) as c:
        for path in ("/v1/things", "/decorated", "/report"):
            r = await c.post(path, headers=H("someone"))
            if fail_open:
                assert r.status_code == 200, r.text
                assert "metered-remaining" not in r.headers
            else:
                assert r.status_code == 503
                problem = r.json()
                assert problem["type"] == "urn:metered:problem:ledger-unavailable"
    await broken.close()
    logged = {record.getMessage() for record in caplog.records}
    assert ("metered.fail_open" if fail_open else "metered.unavailable") in logged


async def _report(request: Request) -> Response:
    from metered.integrations.asgi import check_entitlement

    await check_entitlement(request, "reports")
    return PlainTextResponse("report")


# --------------------------------------------------------------------------- the send stream


class Server:
    """A minimal ASGI server side: records what the app sends, scripts what it receives."""

    def __init__(self, *, disconnect_after_chunks: int | None = None, send_error_at: int = -1):
        self.messages: list[Message] = []
        self.disconnect_after = disconnect_after_chunks
        self.send_error_at = send_error_at
        self._chunk = asyncio.Event()
        self._requested = False

    async def receive(self) -> Message:
        if not self._requested:
            self._requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        if self.disconnect_after is None:
            await asyncio.Event().wait()  # never
        while self.chunks < (self.disconnect_after or 0):
            self._chunk.clear()
            await self._chunk.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        if len(self.messages) == self.send_error_at:
            raise OSError("connection reset by peer")
        self.messages.append(message)
        self._chunk.set()

    @property
    def chunks(self) -> int:
        return sum(1 for m in self.messages if m["type"] == "http.response.body")

    async def run(
        self, app: Any, path: str = "/", subject: str = "u", state: dict[str, Any] | None = None
    ) -> None:
        scope: Scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": b"",
            "headers": [(b"x-subject", subject.encode())],
            "client": ("127.0.0.1", 1234),
            "server": ("127.0.0.1", 80),
        }
        if state is not None:
            scope["state"] = state
        await app(scope, self.receive, self.send)


def metered_raw(ledger: AsyncLedger, inner: Any) -> MeteredMiddleware:
    return MeteredMiddleware(
        inner, ledger=ledger, subject=by_header, rules=[Rule("/*", units=3, feature="api_calls")]
    )


def streaming(chunks: int = 5, delay: float = 0.0) -> Any:
    async def body() -> AsyncIterator[bytes]:
        for i in range(chunks):
            yield b"chunk %d\n" % i
            await asyncio.sleep(delay)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await StreamingResponse(body())(scope, receive, send)

    return app


async def test_full_stream_commits_once_with_one_start(ledger: AsyncLedger, subject: str) -> None:
    server = Server()
    await server.run(metered_raw(ledger, streaming()), subject=subject)
    starts = [m for m in server.messages if m["type"] == "http.response.start"]
    assert len(starts) == 1
    assert (b"metered-remaining", b"7") in starts[0]["headers"]
    assert server.messages[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    assert await spent(ledger, subject) == (3, 0)


async def test_disconnect_mid_stream_releases(ledger: AsyncLedger, subject: str) -> None:
    server = Server(disconnect_after_chunks=2)
    await server.run(metered_raw(ledger, streaming(chunks=50, delay=0.01)), subject=subject)
    assert server.chunks < 50
    assert await spent(ledger, subject) == (0, 0)
    history = await ledger.history(subject, feature="api_calls")
    assert [e.state for e in history if e.kind == "reserve"] == ["released"]


async def test_send_error_mid_stream_releases(ledger: AsyncLedger, subject: str) -> None:
    server = Server(send_error_at=3)
    with pytest.raises(OSError, match="reset"):
        await server.run(metered_raw(ledger, streaming()), subject=subject)
    assert await spent(ledger, subject) == (0, 0)


async def test_app_that_never_finishes_the_body_is_not_charged(
    ledger: AsyncLedger, subject: str
) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})

    await Server().run(metered_raw(ledger, app), subject=subject)
    assert await spent(ledger, subject) == (0, 0)


async def test_pathsend_and_trailers_are_terminal(ledger: AsyncLedger, subject: str) -> None:
    async def pathsend(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.pathsend", "path": "/etc/hostname"})

    async def trailers(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [], "trailers": True})
        await send({"type": "http.response.body", "body": b"body", "more_body": False})
        assert await spent(ledger, subject) == (3, 3)  # not before the trailers
        await send({"type": "http.response.trailers", "headers": [], "more_trailers": False})

    await Server().run(metered_raw(ledger, pathsend), subject=subject)
    assert await spent(ledger, subject) == (3, 0)
    await Server().run(metered_raw(ledger, trailers), subject=subject)
    assert await spent(ledger, subject) == (6, 0)


async def test_error_after_the_body_was_sent_keeps_the_charge(
    ledger: AsyncLedger, subject: str
) -> None:
    """A background task failing after the response does not undo a delivered response."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done", "more_body": False})
        raise RuntimeError("background task failed")

    with pytest.raises(RuntimeError, match="background"):
        await Server().run(metered_raw(ledger, app), subject=subject)
    assert await spent(ledger, subject) == (3, 0)
