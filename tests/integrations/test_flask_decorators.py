"""The Flask extension and decorators, on real Flask apps over SQLite and PostgreSQL.

Each test builds an app on a fresh ledger and drives it with Flask's test client; the ledger's
own balance and history are the proof of what was charged.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from apps.wsgi_support import PLANS, ledger_fixtures, spent
from flask import Blueprint, Flask, Response, abort, g, request, stream_with_context
from flask.testing import FlaskClient
from flask.views import MethodView

from metered import Ledger, MeteredError
from metered.errors import ConfigurationError
from metered.integrations import _policy
from metered.integrations.flask import (
    EntitlementRequired,
    Metered,
    PaymentRequired,
    consumes,
    current_ticket,
    requires_entitlement,
    settle,
)


class BufferedClient(FlaskClient):
    """Reads and closes every response, as a real server does (streamed bodies settle on close)."""

    def open(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("buffered", True)
        return super().open(*args, **kwargs)


database_url, ledger = ledger_fixtures()


def headers(subject: str | None = "u1", **extra: str) -> dict[str, str]:
    sent = {"X-Subject": subject} if subject is not None else {}
    return {**sent, **{k.replace("_", "-"): v for k, v in extra.items()}}


def make_app(ledger: Ledger, **options: Any) -> Flask:
    """An app with one route per behaviour under test."""
    app = Flask(__name__)
    app.test_client_class = BufferedClient
    metered = Metered(
        app, ledger=ledger, subject=lambda: request.headers.get("X-Subject"), **options
    )
    assert app.extensions["metered"] is metered

    @app.post("/generate")
    @consumes(3, feature="api_calls")
    def generate() -> dict[str, Any]:
        ticket = current_ticket()
        assert ticket is not None
        return {"replayed": ticket.replayed}

    @app.post("/raise")
    @consumes(3, feature="api_calls")
    def raises() -> str:
        raise RuntimeError("handler failed")

    @app.post("/status/<int:code>")
    @consumes(3, feature="api_calls")
    def status(code: int) -> tuple[str, int]:
        if code == 404:
            abort(404)
        return "status", code

    @app.post("/tokens")
    @consumes(100, feature="tokens")
    def tokens() -> dict[str, int]:
        used = int(request.args.get("used", "100"))
        settle(used, feature="tokens")
        return {"used": used}

    @app.get("/report")
    @requires_entitlement("reports")
    @consumes(2, feature="api_calls")
    def report() -> str:
        return "report"

    @app.post("/both")
    @consumes(1, feature="api_calls")
    @consumes(50, feature="tokens")
    def both() -> str:
        return "both"

    @app.post("/sized")
    @consumes(
        lambda req: len(req.get_data()), feature="api_calls", key=lambda req: req.args.get("op")
    )
    def sized() -> str:
        return "sized"

    @app.get("/free")
    def unmetered() -> dict[str, Any]:
        return {"ticket": current_ticket() is not None}

    @app.get("/settle-unmetered")
    def settle_unmetered() -> str:
        settle(1)
        return "unreachable"

    @app.get("/stream")
    @consumes(4, feature="api_calls")
    def stream() -> Response:
        fail_at = int(request.args.get("fail_at", "-1"))

        def chunks() -> Iterator[str]:
            for i in range(5):
                if i == fail_at:
                    raise RuntimeError("failed mid-stream")
                yield f"chunk {i}\n"
            settle(2)  # counted while streaming, before the last chunk is taken

        return Response(stream_with_context(chunks()), mimetype="text/plain")

    return app


# --------------------------------------------------------------------------- success


def test_success_charges_once_and_sends_the_balance(ledger: Ledger) -> None:
    app = make_app(ledger)
    response = app.test_client().post("/generate", headers=headers())
    assert response.status_code == 200
    assert response.headers["Metered-Remaining"] == "7"
    assert spent(ledger, "u1") == (3, 0)
    lines = ledger.history("u1", feature="api_calls")
    assert [(e.kind, e.state, e.charged) for e in lines if e.kind != "period"] == [
        ("reserve", "committed", 3)
    ]


def test_plain_flask_test_client_commits_non_streamed_responses(ledger: Ledger) -> None:
    """Non-streamed bodies commit before they are sent: unbuffered test clients see it too."""
    app = make_app(ledger)
    client = FlaskClient(app)  # not the buffered client: the response is never closed
    assert client.post("/generate", headers=headers()).status_code == 200
    assert spent(ledger, "u1") == (3, 0)


def test_unmetered_routes_have_no_ticket_and_settle_outside_a_metered_request_fails(
    ledger: Ledger,
) -> None:
    app = make_app(ledger)
    client = app.test_client()
    response = client.get("/free", headers=headers())
    assert response.json == {"ticket": False}
    assert "Metered-Remaining" not in response.headers
    app.testing = True  # let the exception reach the test
    with pytest.raises(MeteredError, match="settle"):
        client.get("/settle-unmetered", headers=headers())


# --------------------------------------------------------------------------- failures


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/raise", 500),
        ("/status/404", 404),
        ("/status/400", 400),
        ("/status/422", 422),
        ("/status/500", 500),
        ("/status/503", 503),
    ],
)
def test_exceptions_and_error_statuses_charge_nothing(
    ledger: Ledger, path: str, status: int
) -> None:
    app = make_app(ledger)
    response = app.test_client().post(path, headers=headers())
    assert response.status_code == status
    assert "Metered-Remaining" not in response.headers
    assert spent(ledger, "u1") == (0, 0)


def test_an_exception_propagating_to_the_server_charges_nothing(ledger: Ledger) -> None:
    app = make_app(ledger)
    app.testing = True  # PROPAGATE_EXCEPTIONS: the error escapes Flask entirely
    with pytest.raises(RuntimeError, match="handler failed"):
        app.test_client().post("/raise", headers=headers())
    assert spent(ledger, "u1") == (0, 0)


def test_after_request_turning_the_response_into_an_error_charges_nothing(ledger: Ledger) -> None:
    app = make_app(ledger)

    @app.after_request
    def break_it(response: Response) -> Response:
        response.status_code = 502
        return response

    assert app.test_client().post("/generate", headers=headers()).status_code == 502
    assert spent(ledger, "u1") == (0, 0)


def test_an_exception_in_after_request_charges_nothing(ledger: Ledger) -> None:
    app = make_app(ledger)

    @app.after_request
    def explode(response: Response) -> Response:
        raise RuntimeError("after_request failed")

    assert app.test_client().post("/generate", headers=headers()).status_code == 500
    app.testing = True  # now it propagates past every handler; teardown releases
    with pytest.raises(RuntimeError, match="after_request failed"):
        app.test_client().post("/generate", headers=headers())
    assert spent(ledger, "u1") == (0, 0)


def test_commit_policy_per_decorator_and_per_app(ledger: Ledger) -> None:
    app = make_app(ledger, commit_on=lambda status: status < 500)

    @app.post("/strict")
    @consumes(1, feature="api_calls", commit_on=lambda status: status == 201)
    def strict() -> tuple[str, int]:
        return "ok", int(request.args["status"])

    client = app.test_client()
    assert client.post("/status/404", headers=headers()).status_code == 404
    assert spent(ledger, "u1") == (0, 0)  # abort() is an exception: never charged
    assert client.post("/status/400", headers=headers()).status_code == 400
    assert spent(ledger, "u1") == (3, 0)  # the app's policy charges a returned 4xx
    assert client.post("/status/500", headers=headers()).status_code == 500
    assert spent(ledger, "u1") == (3, 0)
    client.post("/strict?status=200", headers=headers())
    assert spent(ledger, "u1") == (3, 0)
    client.post("/strict?status=201", headers=headers())
    assert spent(ledger, "u1") == (4, 0)


# --------------------------------------------------------------------------- denials


def assert_problem(response: Any, status: int, slug: str, **fields: Any) -> dict[str, Any]:
    assert response.status_code == status
    assert response.mimetype == "application/problem+json"
    body: dict[str, Any] = response.get_json(force=True)
    assert body["type"] == f"urn:metered:problem:{slug}"
    assert body["status"] == status
    assert body["title"] and body["detail"]
    for name, value in fields.items():
        assert body[name] == value, name
    assert "Metered-Remaining" not in response.headers
    return body


def test_401_without_a_subject(ledger: Ledger) -> None:
    app = make_app(ledger)
    client = app.test_client()
    assert_problem(client.post("/generate", headers=headers(None)), 401, "subject-required")
    assert_problem(client.get("/report", headers=headers("")), 401, "subject-required")
    assert ledger.history("u1") == []


def test_402_when_the_balance_cannot_cover_the_request(ledger: Ledger) -> None:
    app = make_app(ledger)
    client = app.test_client()
    ledger.consume("u1", 9, feature="api_calls")
    assert_problem(
        client.post("/generate", headers=headers()),
        402,
        "insufficient-units",
        feature="api_calls",
        usage_remaining=1,
        units_requested=3,
        reason="insufficient_units",
    )
    ledger.consume("u1", 1, feature="api_calls")
    assert_problem(
        client.post("/generate", headers=headers()),
        402,
        "quota-exhausted",
        usage_remaining=0,
        units_requested=3,
    )
    assert spent(ledger, "u1") == (10, 0)


def test_403_without_the_feature_or_with_an_inactive_subscription(ledger: Ledger) -> None:
    app = make_app(ledger)
    client = app.test_client()
    assert_problem(
        client.get("/report", headers=headers()), 403, "no-entitlement", feature="reports"
    )
    assert_problem(
        client.post("/tokens", headers=headers()), 403, "no-entitlement", feature="tokens"
    )
    ledger.assign_plan("u1", "pro", status="canceled")
    assert_problem(
        client.get("/report", headers=headers()), 403, "subscription-inactive", feature="reports"
    )
    assert spent(ledger, "u1") == (0, 0)


def test_409_while_the_same_key_is_in_flight(ledger: Ledger) -> None:
    app = make_app(ledger)
    in_flight = ledger.reserve("u1", 3, feature="api_calls", key="k-1")
    response = app.test_client().post("/generate", headers=headers(Idempotency_Key="k-1"))
    assert_problem(response, 409, "operation-in-progress", key="k-1")
    ledger.commit(in_flight)
    response = app.test_client().post("/generate", headers=headers(Idempotency_Key="k-1"))
    assert response.status_code == 200
    assert response.json == {"replayed": True}
    assert spent(ledger, "u1") == (3, 0)


def test_422_for_a_key_reused_with_another_amount_and_400_for_a_malformed_key(
    ledger: Ledger,
) -> None:
    app = make_app(ledger)
    client = app.test_client()
    assert client.post("/sized?op=k", data=b"12", headers=headers()).status_code == 200
    assert_problem(
        client.post("/sized?op=k", data=b"12345", headers=headers()), 422, "idempotency-key-reused"
    )
    assert_problem(
        client.post("/generate", headers=headers(Idempotency_Key="x" * 300)),
        400,
        "invalid-idempotency-key",
    )
    assert spent(ledger, "u1") == (2, 0)


def test_denials_are_http_exceptions_and_policy_denials(ledger: Ledger) -> None:
    from werkzeug.exceptions import Forbidden, HTTPException

    app = make_app(ledger)
    seen: list[BaseException] = []

    @app.errorhandler(402)
    def out_of_units(error: PaymentRequired) -> tuple[dict[str, Any], int]:
        seen.append(error)
        return {"upgrade": "https://example.com/pricing", **error.problem()}, 402

    @app.errorhandler(Forbidden)
    def forbidden(error: EntitlementRequired) -> tuple[str, int]:
        seen.append(error)
        return f"no {error.fields['feature']}", 403

    client = app.test_client()
    ledger.consume("u1", 10, feature="api_calls")
    response = client.post("/generate", headers=headers())
    body = response.json
    assert response.status_code == 402 and body is not None
    assert body["upgrade"] == "https://example.com/pricing"
    assert body["units_requested"] == 3
    response = client.get("/report", headers=headers())
    assert (response.status_code, response.text) == (403, "no reports")
    assert [type(e).__name__ for e in seen] == ["PaymentRequired", "EntitlementRequired"]
    for error in seen:
        assert isinstance(error, HTTPException)
        assert isinstance(error, _policy.Denial)
        assert isinstance(error, MeteredError)
    assert isinstance(seen[0], _policy.PaymentRequired)
    assert isinstance(seen[1], _policy.EntitlementRequired)
    assert [e.code for e in seen if isinstance(e, HTTPException)] == [402, 403]


def test_abort_402_still_works(ledger: Ledger) -> None:
    app = make_app(ledger)

    @app.get("/pay")
    def pay() -> str:
        abort(402)

    response = app.test_client().get("/pay")
    assert (response.status_code, response.mimetype) == (402, "text/html")


# --------------------------------------------------------------------------- idempotency, settle


def test_idempotent_replay_is_not_charged_again(ledger: Ledger) -> None:
    app = make_app(ledger)
    client = app.test_client()
    first = client.post("/generate", headers=headers(Idempotency_Key="req-1"))
    again = client.post("/generate", headers=headers(Idempotency_Key="req-1"))
    other = client.post("/generate", headers=headers(Idempotency_Key="req-2"))
    assert [r.json for r in (first, again, other)] == [
        {"replayed": False},
        {"replayed": True},
        {"replayed": False},
    ]
    assert spent(ledger, "u1") == (6, 0)
    # keys are per subject: another subject's req-1 is its own event
    assert (
        client.post("/generate", headers=headers("u2", Idempotency_Key="req-1")).status_code == 200
    )
    assert spent(ledger, "u2") == (3, 0)


def test_settle_with_fewer_units_returns_the_rest(ledger: Ledger) -> None:
    ledger.assign_plan("u1", "pro")
    app = make_app(ledger)
    response = app.test_client().post("/tokens?used=30", headers=headers())
    assert response.status_code == 200
    assert response.headers["Metered-Remaining"] == "470"
    assert spent(ledger, "u1", "tokens") == (30, 0)


def test_two_features_on_one_request_each_charged_once(ledger: Ledger) -> None:
    ledger.assign_plan("u1", "pro")
    app = make_app(ledger)
    client = app.test_client()
    for _ in range(2):
        assert client.post("/both", headers=headers(Idempotency_Key="b-1")).status_code == 200
    assert spent(ledger, "u1") == (1, 0)
    assert spent(ledger, "u1", "tokens") == (50, 0)


def test_units_and_key_callables_receive_the_request(ledger: Ledger) -> None:
    app = make_app(ledger)
    client = app.test_client()
    assert client.post("/sized?op=a", data=b"1234", headers=headers()).status_code == 200
    assert client.post("/sized?op=a", data=b"1234", headers=headers()).status_code == 200
    assert client.post("/sized", data=b"", headers=headers()).status_code == 200  # free
    assert client.post("/sized", data=b"", headers=headers(None)).status_code == 401
    assert spent(ledger, "u1") == (4, 0)


# --------------------------------------------------------------------------- stacking, views


def test_requires_entitlement_stacked_above_consumes(ledger: Ledger) -> None:
    app = make_app(ledger)
    client = app.test_client()
    assert client.get("/report", headers=headers()).status_code == 403
    assert spent(ledger, "u1") == (0, 0)  # denied before anything was reserved
    ledger.assign_plan("u1", "pro")
    response = client.get("/report", headers=headers())
    assert (response.status_code, response.headers["Metered-Remaining"]) == (200, "998")
    assert spent(ledger, "u1") == (2, 0)


def test_async_views(ledger: Ledger) -> None:
    pytest.importorskip("asgiref")
    app = make_app(ledger)

    @app.post("/async")
    @requires_entitlement("reports")
    @consumes(5, feature="api_calls")
    async def generate_async() -> dict[str, Any]:
        ticket = current_ticket()
        assert ticket is not None
        settle(4)
        return {"units": ticket.units}

    @app.post("/async-raise")
    @consumes(5, feature="api_calls")
    async def raise_async() -> str:
        raise ValueError("async failure")

    client = app.test_client()
    assert client.post("/async", headers=headers()).status_code == 403
    ledger.assign_plan("u1", "pro")
    response = client.post("/async", headers=headers())
    assert (response.status_code, response.json) == (200, {"units": 5})
    assert response.headers["Metered-Remaining"] == "996"
    assert client.post("/async-raise", headers=headers()).status_code == 500
    assert spent(ledger, "u1") == (4, 0)


def test_blueprints_with_module_and_extension_decorators(ledger: Ledger) -> None:
    app = Flask(__name__)
    app.test_client_class = BufferedClient
    metered = Metered(ledger=ledger, subject=lambda: g.get("subject"))
    api = Blueprint("api", __name__, url_prefix="/v1")

    @api.before_request
    def authenticate() -> None:
        g.subject = {"key-1": "org_1"}.get(request.headers.get("X-API-Key", ""))

    @api.post("/a")
    @consumes(1, feature="api_calls")
    def a() -> str:
        return "a"

    @api.post("/b")
    @metered.requires_entitlement("reports")
    @metered.consumes(2, feature="api_calls")
    def b() -> str:
        return "b"

    app.register_blueprint(api)
    metered.init_app(app)
    client = app.test_client()
    assert client.post("/v1/a", headers={"X-API-Key": "key-1"}).status_code == 200
    assert client.post("/v1/a", headers={"X-API-Key": "nope"}).status_code == 401
    assert client.post("/v1/b", headers={"X-API-Key": "key-1"}).status_code == 403
    ledger.assign_plan("org_1", "pro")
    assert client.post("/v1/b", headers={"X-API-Key": "key-1"}).status_code == 200
    assert spent(ledger, "org_1") == (2, 0)  # the plan change started a new period


def test_method_views(ledger: Ledger) -> None:
    app = make_app(ledger)

    class Items(MethodView):
        decorators = [consumes(1, feature="api_calls")]

        def get(self) -> str:
            return "list"

        @consumes(3, feature="api_calls")  # the class-level charge covers it: charged once
        def post(self) -> str:
            return "created"

        def delete(self) -> str:
            raise RuntimeError("cannot delete")

    class Reports(MethodView):
        @requires_entitlement("reports")
        @consumes(2, feature="api_calls")
        def get(self) -> str:
            return "report"

        @consumes(2, feature="api_calls")
        async def post(self) -> str:
            return "async report"

    app.add_url_rule("/items", view_func=Items.as_view("items"))
    app.add_url_rule("/reports", view_func=Reports.as_view("reports"))
    client = app.test_client()
    assert client.get("/items", headers=headers()).status_code == 200
    assert client.post("/items", headers=headers()).status_code == 200
    assert client.delete("/items", headers=headers()).status_code == 500
    assert spent(ledger, "u1") == (2, 0)
    assert client.get("/reports", headers=headers()).status_code == 403
    pytest.importorskip("asgiref")
    assert client.post("/reports", headers=headers()).status_code == 200
    assert spent(ledger, "u1") == (4, 0)


# --------------------------------------------------------------------------- streaming


def test_streamed_response_commits_when_fully_sent_and_closed(ledger: Ledger) -> None:
    app = make_app(ledger)
    response = app.test_client().get("/stream", headers=headers())
    assert response.status_code == 200
    assert response.text.count("chunk") == 5
    assert response.headers["Metered-Remaining"] == "6"  # sent before the body: what was held
    assert spent(ledger, "u1") == (2, 0)  # settled to 2 while streaming


def test_streamed_response_closed_early_or_failing_charges_nothing(ledger: Ledger) -> None:
    app = make_app(ledger)
    client = FlaskClient(app)
    response = client.get("/stream", headers=headers())  # unbuffered: we drive the body
    body = iter(response.response)
    assert next(body) == b"chunk 0\n"
    assert spent(ledger, "u1") == (0, 4)  # held while streaming
    response.close()  # the client went away
    assert spent(ledger, "u1") == (0, 0)

    with pytest.raises(RuntimeError, match="failed mid-stream"):
        app.test_client().get("/stream?fail_at=2", headers=headers())
    assert spent(ledger, "u1") == (0, 0)


# --------------------------------------------------------------------------- configuration


def test_init_app_with_config_keys(tmp_path: Path) -> None:
    app = Flask(__name__)
    app.test_client_class = BufferedClient
    app.config.update(
        METERED_DATABASE_URL=f"sqlite:///{tmp_path / 'config.db'}",
        METERED_PLANS=PLANS,
        METERED_DEFAULT_PLAN="free",
        METERED_SUBJECT=lambda: request.headers.get("X-Subject"),
        METERED_REMAINING_HEADER="X-Units-Left",
        METERED_IDEMPOTENCY_HEADER="X-Request-Id",
        METERED_COMMIT_ON=lambda status: status < 500,
        METERED_RESERVATION_TTL=30,
    )
    metered = Metered()

    @app.post("/go")
    @consumes(1, feature="api_calls")
    def go() -> tuple[str, int]:
        return "go", int(request.args.get("status", "200"))

    metered.init_app(app)
    assert app.extensions["metered"] is metered
    with app.app_context():
        ledger = metered.ledger
        assert metered.policy.reservation_ttl == 30.0
    client = app.test_client()
    response = client.post("/go", headers=headers(X_Request_Id="r1"))
    assert response.headers["X-Units-Left"] == "9"
    client.post("/go", headers=headers(X_Request_Id="r1"))  # replay through the custom header
    client.post("/go?status=404", headers=headers())  # charged under METERED_COMMIT_ON
    assert spent(ledger, "u1") == (2, 0)
    ledger.close()


def test_constructor_arguments_win_over_config(ledger: Ledger) -> None:
    app = Flask(__name__)
    app.config.update(METERED_REMAINING_HEADER="X-From-Config", METERED_FAIL_OPEN="true")
    metered = Metered(
        app,
        ledger=ledger,
        subject=lambda: "u1",
        remaining_header="X-From-Code",
        fail_open=False,
    )

    @app.post("/go")
    @consumes(1, feature="api_calls")
    def go() -> str:
        return "go"

    response = app.test_client().post("/go")
    assert response.headers["X-From-Code"] == "9"
    assert "X-From-Config" not in response.headers
    with app.app_context():
        assert metered.policy.fail_open is False


def test_no_header_when_disabled(ledger: Ledger) -> None:
    app = make_app(ledger, remaining_header=None)
    response = app.test_client().post("/generate", headers=headers())
    assert response.status_code == 200
    assert "Metered-Remaining" not in response.headers


def test_configuration_errors(ledger: Ledger) -> None:
    with pytest.raises(ConfigurationError, match="subject"):
        Metered(Flask(__name__), ledger=ledger)
    with pytest.raises(ConfigurationError, match="METERED_PLANS"):
        Metered(Flask(__name__), subject=lambda: "u1")
    app = Flask(__name__)
    app.testing = True

    @app.get("/x")
    @consumes(1, feature="api_calls")
    def x() -> str:
        return "x"

    with pytest.raises(ConfigurationError, match="no Metered extension"):
        app.test_client().get("/x")


# --------------------------------------------------------------------------- ledger unreachable


@pytest.mark.postgres
def test_unreachable_ledger_fails_closed_with_503_or_open_when_configured(
    caplog: pytest.LogCaptureFixture,
) -> None:
    unreachable = "postgresql://postgres@127.0.0.1:1/test"  # nothing listens on port 1
    with Ledger(unreachable, plans=PLANS, default_plan="free", timeout=0.5) as down:
        closed = make_app(down)
        assert_problem(
            closed.test_client().post("/generate", headers=headers()), 503, "ledger-unavailable"
        )
        assert_problem(
            closed.test_client().get("/report", headers=headers()), 503, "ledger-unavailable"
        )
        opened = make_app(down, fail_open=True)
        with caplog.at_level(logging.WARNING, logger="metered"):
            response = opened.test_client().post("/generate", headers=headers())
        assert response.status_code == 200
        assert "Metered-Remaining" not in response.headers
        assert "metered.fail_open" in [r.getMessage() for r in caplog.records]


def test_sqlite_ledger_without_its_tables_is_unavailable(tmp_path: Path) -> None:
    with Ledger(f"sqlite:///{tmp_path / 'empty.db'}", plans=PLANS, default_plan="free") as down:
        assert make_app(down).test_client().post("/generate", headers=headers()).status_code == 503
        response = make_app(down, fail_open=True).test_client().post("/stream", headers=headers())
        assert response.status_code == 405  # routing still answers; not a metering concern
        response = make_app(down, fail_open=True).test_client().post("/generate", headers=headers())
        assert response.status_code == 200
