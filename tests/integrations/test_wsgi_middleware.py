"""``MeteredWSGIMiddleware`` around a plain WSGI app and around a Flask app, on SQLite and
PostgreSQL; plus a real werkzeug server with a client that hangs up mid-stream.

Most tests drive the middleware with a tiny WSGI "server" (:func:`serve`) that records every
``start_response`` call and lets the test decide how far to iterate the body and when to
close it, which is exactly what the middleware's settlement depends on.
"""

from __future__ import annotations

import json
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from apps.wsgi_support import (
    PLANS,
    hang_up,
    ledger_fixtures,
    raw_request,
    read_all,
    read_until,
    spent,
    wait_until,
    werkzeug_server,
)
from flask import Flask, request
from werkzeug.datastructures import Headers
from werkzeug.test import EnvironBuilder

from metered import Ledger
from metered.integrations._rules import Rule, exempt_path
from metered.integrations.flask import Metered, consumes, current_ticket
from metered.integrations.wsgi import ENVIRON_TICKET, MeteredWSGIMiddleware

WEBHOOK = f"/hooks/stripe-{uuid.uuid4().hex[:8]}"
exempt_path(WEBHOOK)


database_url, ledger = ledger_fixtures()


# --------------------------------------------------------------------------- a plain WSGI app


class Body:
    """A response iterable that records how it was consumed and closed."""

    def __init__(self, chunks: list[bytes], fail_at: int | None = None) -> None:
        self.chunks, self.fail_at = chunks, fail_at
        self.closed = 0

    def __iter__(self) -> Iterator[bytes]:
        for i, chunk in enumerate(self.chunks):
            if i == self.fail_at:
                raise RuntimeError("failed while iterating")
            yield chunk

    def close(self) -> None:
        self.closed += 1


BODIES: list[Body] = []


def plain_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """One behaviour per path."""
    path = environ["PATH_INFO"]
    text = [("Content-Type", "text/plain")]
    if path == "/raise":
        raise RuntimeError("app failed")
    if path.startswith("/status/"):
        code = int(path.rsplit("/", 1)[1])
        start_response(f"{code} Whatever", text)
        return [b"status"]
    if path == "/exc-info":
        start_response("200 OK", text)
        try:
            raise ValueError("late failure")
        except ValueError:
            start_response("500 Internal Server Error", text, sys.exc_info())
        return [b"error page"]
    if path == "/settle":
        environ[ENVIRON_TICKET].settle(1)
    fail_at = 1 if environ.get("QUERY_STRING") == "fail" else None
    body = Body([b"one ", b"two ", b"three"], fail_at=fail_at)
    BODIES.append(body)
    start_response("200 OK", text)
    return body


@dataclass
class Served:
    """What the fake server saw."""

    calls: list[tuple[str, list[tuple[str, str]], Any]] = field(default_factory=list)
    body: bytes = b""
    error: BaseException | None = None

    @property
    def status(self) -> int:
        return int(self.calls[-1][0][:3])

    @property
    def headers(self) -> dict[str, str]:
        return dict(self.calls[-1][1])

    def json(self) -> Any:
        return json.loads(self.body)


def serve(
    app: Any,
    path: str,
    *,
    method: str = "POST",
    headers: dict[str, str] | None = None,
    chunks: int | None = None,
) -> Served:
    """Call ``app`` as a WSGI server would; read ``chunks`` body chunks (all when None), close."""
    environ = EnvironBuilder(path=path, method=method, headers=Headers(headers)).get_environ()
    served = Served()

    def start_response(status: str, hdrs: list[tuple[str, str]], exc_info: Any = None) -> Any:
        served.calls.append((status, list(hdrs), exc_info))
        return lambda data: None

    try:
        result = app(environ, start_response)
    except Exception as exc:
        served.error = exc
        return served
    try:
        for i, chunk in enumerate(result):
            if chunks is not None and i >= chunks:
                break
            served.body += chunk
    except Exception as exc:
        served.error = exc
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return served


def middleware(ledger: Ledger, app: Any = plain_app, **options: Any) -> MeteredWSGIMiddleware:
    options.setdefault(
        "rules",
        [
            Rule("/reports/*", units=0, requires="reports"),
            Rule(
                re.compile(r"/v2/sized/\d+"),
                units=lambda env: int(env["PATH_INFO"][10:]),
                feature="api_calls",
            ),
            Rule("/tokens", units=100, feature="tokens", commit_on=lambda status: status == 200),
            Rule("/*", methods=["POST"], units=2, feature="api_calls"),
        ],
    )
    return MeteredWSGIMiddleware(
        app, ledger=ledger, subject=lambda environ: environ.get("HTTP_X_SUBJECT"), **options
    )


SUBJECT = {"X-Subject": "u1"}


# --------------------------------------------------------------------------- plain WSGI


def test_a_matching_request_is_charged_once_when_its_body_was_sent_and_closed(
    ledger: Ledger,
) -> None:
    app = middleware(ledger)
    environ = EnvironBuilder(
        path="/generate", method="POST", headers=Headers(SUBJECT)
    ).get_environ()
    statuses: list[str] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        statuses.append(status)

    result = app(environ, start_response)
    assert spent(ledger) == (0, 2)  # held while the body is on its way
    assert environ[ENVIRON_TICKET].units == 2
    assert b"".join(result) == b"one two three"
    assert spent(ledger) == (0, 2)  # the commit waits for close()
    result.close()  # type: ignore[attr-defined]
    result.close()  # type: ignore[attr-defined]  # idempotent
    assert spent(ledger) == (2, 0)
    assert BODIES[-1].closed == 1


def test_rules_select_requests_by_method_and_path(ledger: Ledger) -> None:
    app = middleware(ledger)
    served = serve(app, "/generate", headers=SUBJECT)
    assert (served.status, served.headers["Metered-Remaining"]) == (200, "8")
    assert serve(app, "/generate", method="GET", headers=SUBJECT).status == 200  # no rule
    assert serve(app, WEBHOOK, headers=SUBJECT).status == 200  # exempt: never metered
    assert "Metered-Remaining" not in serve(app, WEBHOOK, headers=SUBJECT).headers
    assert serve(app, "/v2/sized/3", method="GET", headers=SUBJECT).status == 200  # regex
    assert spent(ledger) == (5, 0)
    assert serve(app, "/generate", method="GET").status == 200  # unmatched needs no subject


def test_an_entitlement_only_rule(ledger: Ledger) -> None:
    app = middleware(ledger)
    served = serve(app, "/reports/q1", method="GET", headers=SUBJECT)
    assert served.status == 403
    assert served.json()["type"] == "urn:metered:problem:no-entitlement"
    ledger.assign_plan("u1", "pro")
    assert serve(app, "/reports/q1", method="GET", headers=SUBJECT).status == 200
    assert spent(ledger) == (0, 0)


@pytest.mark.parametrize(
    ("path", "query", "status"),
    [
        ("/raise", "", None),
        ("/status/404", "", 404),
        ("/status/500", "", 500),
        ("/exc-info", "", 500),
        ("/body", "fail", 200),
    ],
    ids=["app-raises", "404", "500", "exc_info", "iteration-raises"],
)
def test_failures_charge_nothing(ledger: Ledger, path: str, query: str, status: int | None) -> None:
    app = middleware(ledger)
    served = serve(app, f"{path}?{query}" if query else path, headers=SUBJECT)
    if status is None:
        assert isinstance(served.error, RuntimeError)
    else:
        assert served.status == status
    if status not in (None, 200):  # a 200 sends its headers before the body fails
        assert "Metered-Remaining" not in served.headers
    if path == "/exc-info":
        assert len(served.calls) == 2 and served.calls[1][2] is not None
    if query == "fail":
        assert isinstance(served.error, RuntimeError)
        assert BODIES[-1].closed == 1
    assert spent(ledger) == (0, 0)


def test_a_body_closed_before_its_end_charges_nothing(ledger: Ledger) -> None:
    app = middleware(ledger)
    served = serve(app, "/body", headers=SUBJECT, chunks=1)
    assert served.body == b"one "
    assert BODIES[-1].closed == 1
    assert spent(ledger) == (0, 0)


def test_denials_are_problem_json_and_skip_the_app(ledger: Ledger) -> None:
    app = middleware(ledger)
    served = serve(app, "/raise")
    assert served.status == 401
    assert served.headers["Content-Type"] == "application/problem+json"
    assert served.json()["type"] == "urn:metered:problem:subject-required"
    assert int(served.headers["Content-Length"]) == len(served.body)

    ledger.consume("u1", 9, feature="api_calls")
    served = serve(app, "/raise", headers=SUBJECT)  # the app would raise: it is never called
    assert served.status == 402
    assert served.calls[0][0] == "402 Payment Required"
    problem = served.json()
    assert (problem["usage_remaining"], problem["units_requested"]) == (1, 2)
    assert problem["feature"] == "api_calls"

    assert serve(app, "/tokens", headers=SUBJECT).json()["feature"] == "tokens"  # 403

    ledger.reserve("u2", 2, feature="api_calls", key="busy")
    served = serve(app, "/x", headers={"X-Subject": "u2", "Idempotency-Key": "busy"})
    assert (served.status, served.json()["type"]) == (
        409,
        "urn:metered:problem:operation-in-progress",
    )


def test_settle_idempotency_and_commit_policies(ledger: Ledger) -> None:
    ledger.assign_plan("u1", "pro")
    app = middleware(ledger)
    served = serve(app, "/settle", headers=SUBJECT)
    assert served.headers["Metered-Remaining"] == "999"  # settled before start_response
    assert spent(ledger) == (1, 0)
    for _ in range(2):
        serve(app, "/y", headers={**SUBJECT, "Idempotency-Key": "once"})
    assert spent(ledger) == (3, 0)
    serve(app, "/tokens", headers=SUBJECT)  # rule commit_on: 200 only
    assert spent(ledger, feature="tokens") == (100, 0)
    app = middleware(ledger, commit_on=lambda status: status < 500, rules=[Rule("/*", units=1)])
    served = serve(app, "/status/404", headers=SUBJECT)  # two metered features: feature= needed
    assert "feature= is required" in str(served.error)
    app = middleware(
        ledger, commit_on=lambda status: status < 500, rules=[Rule("/*", feature="api_calls")]
    )
    serve(app, "/status/404", headers=SUBJECT)
    assert spent(ledger) == (4, 0)


def test_key_and_header_options(ledger: Ledger) -> None:
    app = middleware(
        ledger,
        rules=[Rule("/*", feature="api_calls", key=lambda env: env.get("HTTP_X_REQUEST_ID"))],
        remaining_header="X-Left",
    )
    for _ in range(3):
        served = serve(app, "/a", headers={**SUBJECT, "X-Request-Id": "r-1"})
    assert served.headers["X-Left"] == "9"
    assert spent(ledger) == (1, 0)
    app = middleware(ledger, idempotency_header="X-Op", remaining_header=None)
    served = serve(app, "/a", headers={**SUBJECT, "X-Op": "op-1"})
    served = serve(app, "/a", headers={**SUBJECT, "X-Op": "op-1"})
    assert "Metered-Remaining" not in served.headers
    assert spent(ledger) == (3, 0)


def test_unreachable_ledger_fails_closed_or_open(tmp_path: Path) -> None:
    with Ledger(f"sqlite:///{tmp_path / 'no-tables.db'}", plans=PLANS, default_plan="free") as down:
        served = serve(middleware(down), "/a", headers=SUBJECT)
        assert (served.status, served.json()["type"]) == (
            503,
            "urn:metered:problem:ledger-unavailable",
        )
        served = serve(middleware(down, fail_open=True), "/a", headers=SUBJECT)
        assert (served.status, served.body) == (200, b"one two three")
        assert "Metered-Remaining" not in served.headers


# --------------------------------------------------------------------------- around Flask


def flask_app(ledger: Ledger) -> Flask:
    app = Flask(__name__)
    Metered(app, ledger=ledger, subject=lambda: request.headers.get("X-Subject"))

    @app.post("/generate")
    @consumes(3, feature="api_calls")
    def generate() -> dict[str, Any]:
        ticket = current_ticket()
        assert ticket is not None
        return {"units": ticket.units}

    @app.post("/llm")
    @consumes(50, feature="tokens")
    def llm() -> str:
        return "tokens"

    @app.post("/fail")
    @consumes(3, feature="api_calls")
    def fail() -> tuple[str, int]:
        return "no", 500

    return app


def test_middleware_around_flask_decorators_charges_once(ledger: Ledger) -> None:
    ledger.assign_plan("u1", "pro")
    app = flask_app(ledger)
    app.wsgi_app = middleware(ledger, app.wsgi_app)  # type: ignore[method-assign]
    client = app.test_client()
    response = client.post("/generate", headers=SUBJECT, buffered=True)
    assert response.json == {"units": 2}  # the decorator sees the middleware's ticket
    assert response.headers.getlist("Metered-Remaining") == ["998"]
    assert spent(ledger) == (2, 0)
    assert client.post("/fail", headers=SUBJECT, buffered=True).status_code == 500
    assert spent(ledger) == (2, 0)
    # another feature is another charge: the rule's api_calls and the decorator's tokens
    assert client.post("/llm", headers=SUBJECT, buffered=True).status_code == 200
    assert spent(ledger) == (4, 0)
    assert spent(ledger, feature="tokens") == (50, 0)


def test_middleware_around_a_flask_app_without_the_extension(ledger: Ledger) -> None:
    app = Flask(__name__)

    @app.post("/plain")
    def plain() -> str:
        return "plain"

    app.wsgi_app = middleware(ledger, app.wsgi_app)  # type: ignore[method-assign]
    assert app.test_client().post("/plain", headers=SUBJECT, buffered=True).status_code == 200
    assert spent(ledger) == (2, 0)


# --------------------------------------------------------------------------- a real server


def slow_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    delay = 0.0 if environ.get("QUERY_STRING") == "all" else 0.01
    for i in range(200):
        yield f"chunk {i:04d} ".encode() + b"." * 4000 + b"\n"
        time.sleep(delay)


@pytest.mark.slow
def test_werkzeug_server_client_hanging_up_mid_stream_is_not_charged(ledger: Ledger) -> None:
    app = MeteredWSGIMiddleware(
        slow_app,
        ledger=ledger,
        subject=lambda environ: environ.get("HTTP_X_SUBJECT"),
        rules=[Rule("/stream", units=4, feature="api_calls")],
    )
    with werkzeug_server(app) as port:
        sock = raw_request(port, "/stream", {"X-Subject": "u1"})
        head = read_until(sock, b"chunk 0001")
        assert b"Metered-Remaining: 6" in head
        assert spent(ledger) == (0, 4)
        hang_up(sock)
        wait_until(lambda: spent(ledger) == (0, 0))

        sock = raw_request(port, "/stream?all", {"X-Subject": "u1"})
        assert read_all(sock).count(b"chunk ") == 200
        wait_until(lambda: spent(ledger) == (4, 0))
