"""The HTTP API as an ASGI app: ``create_app(ledger, billing=..., mode=...)``.

Built with FastAPI so that the OpenAPI document comes from the same pydantic models that
validate requests (no second description to keep in sync). The app is a Starlette app: mount
it inside another one (``app.mount("/metered", create_app(ledger))``) or serve it alone with
``metered serve``. Every ledger call goes through :class:`metered.AsyncLedger`, so the event
loop never waits on the database; Stripe calls of a synchronous billing object run on a
worker thread.
"""

from __future__ import annotations

import asyncio
import inspect
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, Protocol, TypeVar

from fastapi import Depends, FastAPI, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from metered import __version__
from metered._core import Op
from metered._sql import OPERATION_COLUMNS
from metered.errors import (
    ConfigurationError,
    MeteredError,
    OperationInProgress,
    ReservationSettled,
)
from metered.integrations._policy import PROBLEM_CONTENT_TYPE, Denial, RequestInProgress
from metered.ledger import AsyncLedger
from metered.plans import Catalog
from metered.results import Reservation
from metered.server import problems
from metered.server.keys import KeyLookup, Mode, check_mode
from metered.server.models import (
    LEDGER_ID,
    BalanceResponse,
    CheckoutRequest,
    CheckoutResponse,
    CheckRequest,
    CheckResponse,
    CommitRequest,
    ConsumeRequest,
    ConsumeResponse,
    FeatureBalance,
    HistoryItem,
    HistoryResponse,
    Problem,
    ReleaseRequest,
    ReleaseResponse,
    ReservationResponse,
    ReserveRequest,
    UnitsDenied,
    ValidationProblem,
    WebhookResponse,
)
from metered.validation import MAX_SUBJECT

_M = TypeVar("_M", bound=BaseModel)


class Billing(Protocol):
    """What the API needs of :class:`metered.stripe.StripeBilling` (sync or async methods)."""

    def create_checkout_session(
        self, subject: str, plan: str, *, success_url: str, cancel_url: str
    ) -> Any: ...

    def handle_webhook(self, payload: bytes, signature_header: str | None) -> Any: ...


_MAX_ID = 2**63 - 1  # BIGINT: a larger id names nothing
_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="An API key from `metered keys create`: `Authorization: Bearer mk_test_...`.",
)

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        description="Retrying with the same key returns the original result and charges "
        "nothing (keys are scoped per subject, at most 255 characters). Without one, every "
        "request is its own charge.",
    ),
]
SubjectPath = Annotated[str, Path(min_length=1, max_length=MAX_SUBJECT)]
FeatureQuery = Annotated[str | None, Query(min_length=1, max_length=100)]


def _problem(description: str, model: Any = Problem) -> dict[str, Any]:
    return {"model": model, "description": description}


Responses = dict[int | str, dict[str, Any]]

_COMMON: Responses = {
    401: _problem("Missing, unknown or revoked API key, or a key of the other mode."),
    422: _problem("Malformed request: `errors` lists the fields.", ValidationProblem),
    503: _problem("The ledger database is unreachable (fail closed)."),
}
_UNITS: Responses = {
    **_COMMON,
    422: _problem(
        "Malformed request (`errors` lists the fields), or an Idempotency-Key reused for a "
        "different request.",
        ValidationProblem | Problem,
    ),
    402: _problem("Not enough units: nothing was taken.", UnitsDenied),
    403: _problem("Feature not in the plan, or subscription inactive.", UnitsDenied),
    409: _problem(
        "A request with this idempotency key is still in flight (on reserve: the held "
        "reservation's `reservation_id` is included)."
    ),
    400: _problem("Invalid Idempotency-Key header."),
}
_SETTLE: Responses = {
    **_COMMON,
    404: _problem("No reservation with this id for this subject."),
    409: _problem("The reservation was already released (or committed, for release)."),
    410: _problem("The reservation expired; its units went back to the balance."),
}


def _json(model: BaseModel) -> Response:
    return Response(model.model_dump_json(), media_type="application/json")


def _problem_response(denial: Denial) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if denial.status == 401 else None
    return JSONResponse(
        denial.problem(),
        status_code=denial.status,
        media_type=PROBLEM_CONTENT_TYPE,
        headers=headers,
    )


async def _call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a billing method: await it if async, else run it on a worker thread."""
    if inspect.iscoroutinefunction(fn):
        return await fn(*args, **kwargs)
    result = await asyncio.to_thread(fn, *args, **kwargs)
    return await result if inspect.isawaitable(result) else result


def _field(obj: Any, name: str) -> Any:
    return obj[name] if isinstance(obj, dict) else getattr(obj, name, None)


def _out(model: type[_M], source: Any, **values: Any) -> _M:
    """``model`` from ``source``'s attributes of the same names, plus ``values``."""
    for name in model.model_fields:
        if name not in values and hasattr(source, name):
            values[name] = getattr(source, name)
    return model.model_construct(**values)


def _consumed(result: Any, entry_id: str | None) -> Response:
    return _json(
        _out(
            ConsumeResponse,
            result,
            subject_ref=result.subject,
            idempotency_key=result.key,
            entry_id=entry_id,
        )
    )


class _Api:
    """The endpoints, bound to one ledger, billing object and key lookup."""

    def __init__(self, ledger: AsyncLedger, billing: Billing | None, keys: KeyLookup) -> None:
        self.ledger, self.billing, self.keys = ledger, billing, keys
        self.metered = [name for name, metered in ledger.catalog.metered.items() if metered]
        self._operation_by_id = ledger._ctx.stmts.operation_by_id
        self._operation_by_key = ledger._ctx.stmts.operation_by_key

    # ----------------------------------------------------------------- helpers

    async def authenticate(
        self, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
    ) -> None:
        if credentials is None:
            raise problems.ApiKeyRequired("Send `Authorization: Bearer <api key>`.")
        verdict = await self.keys.verify(credentials.credentials)
        if verdict == "wrong_mode":
            mode = self.keys.mode
            raise problems.ApiKeyWrongMode(
                f"This server runs in {mode} mode; keys of the other mode are refused.", mode=mode
            )
        if verdict != "ok":
            raise problems.InvalidApiKey("The API key is unknown or revoked.")

    def _feature(self, feature: str | None) -> str:
        if feature is not None:
            return feature
        if len(self.metered) != 1:
            message = "feature is required: the plans meter more than one feature"
            raise problems.field_error("feature", message, "missing")
        return self.metered[0]

    def _read_operation(self, subject: str, op_id: int) -> Op:
        rows = yield self._operation_by_id, {"subject": subject, "id": op_id}
        return dict(zip((*OPERATION_COLUMNS, "remaining_after"), rows[0])) if rows else None

    def _read_by_key(self, subject: str, key: str | None) -> Op:
        rows = yield self._operation_by_key, {"subject": subject, "key": key}
        return dict(zip(OPERATION_COLUMNS, rows[0])) if rows else None

    async def _reservation(self, body: CommitRequest | ReleaseRequest) -> dict[str, Any]:
        """The reservation's ledger row (or the committed charge a replayed key points at)."""
        op_id = int(body.reservation_id)
        row: dict[str, Any] | None = None
        if op_id <= _MAX_ID:
            row = await self.ledger._run(self._read_operation(body.subject_ref, op_id))
        if row is None or row["kind"] not in ("reserve", "consume"):
            raise problems.NoSuchReservation("No reservation with this id for this subject.")
        return row

    @staticmethod
    def _as_reservation(row: dict[str, Any]) -> Reservation:
        return Reservation.model_construct(
            ok=True, expires_at=None, usage_remaining=0, reason=None, replayed=False, consumed=0,
            **{name: row[name] for name in ("id", "subject", "feature", "units", "key")},
        )  # fmt: skip

    @staticmethod
    def _replayed_commit(row: dict[str, Any]) -> Response:
        return _json(
            ConsumeResponse.model_construct(
                ok=True,
                consumed=row["charged"] or 0,
                usage_remaining=row["remaining_after"] or 0,
                replayed=True,
                subject_ref=row["subject"],
                feature=row["feature"],
                idempotency_key=row["key"],
                entry_id=str(row["id"]),
                overage=row["overage"],
            )
        )

    def _billing(self) -> Billing:
        if self.billing is None:
            raise problems.BillingNotConfigured(
                "This server has no Stripe billing configured (see `metered serve --help`)."
            )
        return self.billing

    # ----------------------------------------------------------------- endpoints

    async def checkout(self, body: CheckoutRequest) -> Response:
        """Create a Stripe Checkout Session for the subject to subscribe to ``plan``."""
        billing = self._billing()
        try:
            session = await _call(
                billing.create_checkout_session,
                subject=body.subject_ref,
                plan=body.plan,
                success_url=body.success_url,
                cancel_url=body.cancel_url,
            )
        except MeteredError as exc:
            if isinstance(exc, Denial) or getattr(exc, "http_status", None) is None:
                raise
            raise problems.CheckoutRefused(str(exc)) from exc
        except Exception as exc:
            problems.logger.exception("metered.checkout_failed")
            raise problems.PaymentProviderError(
                f"Stripe could not create the session ({type(exc).__name__})."
            ) from exc
        return _json(CheckoutResponse(id=_field(session, "id"), url=_field(session, "url")))

    async def check(self, body: CheckRequest) -> Response:
        """May the subject use the feature now, and how much is left? Never writes."""
        result = await self.ledger.check(body.subject_ref, self._feature(body.feature))
        return _json(_out(CheckResponse, result, subject_ref=result.subject))

    async def consume(
        self, body: ConsumeRequest, idempotency_key: IdempotencyKey = None
    ) -> Response:
        """Take units now, exactly once per Idempotency-Key."""
        feature = self._feature(body.feature)
        result = await self.ledger.consume(
            body.subject_ref, body.units, feature=feature, key=idempotency_key
        )
        if not result.ok:
            raise problems.units_denied(
                result.reason, result.feature, result.usage_remaining, body.units
            )
        return _consumed(result, str(result.entry_id))

    async def reserve(
        self, body: ReserveRequest, idempotency_key: IdempotencyKey = None
    ) -> Response:
        """Hold units for work in flight; settle with commit or release (or let it expire)."""
        feature = self._feature(body.feature)
        try:
            result = await self.ledger.reserve(
                body.subject_ref, body.units, feature=feature, key=idempotency_key,
                ttl=body.ttl_seconds,
            )  # fmt: skip
        except OperationInProgress as exc:
            # A retry whose first response was lost: name the hold so it can be settled.
            op = self._read_by_key(body.subject_ref, idempotency_key)
            row: dict[str, Any] | None = await self.ledger._run(op)
            raise RequestInProgress(
                "A reservation with this idempotency key is still held.",
                key=idempotency_key,
                reservation_id=str(row["id"]) if row else None,
            ) from exc
        if not result.ok:
            raise problems.units_denied(
                result.reason, result.feature, result.usage_remaining, body.units
            )
        return _json(
            _out(
                ReservationResponse,
                result,
                reservation_id=str(result.id),
                subject_ref=result.subject,
                idempotency_key=result.key,
            )
        )

    async def commit(self, body: CommitRequest) -> Response:
        """Charge a reservation, optionally a different final amount; the rest goes back.
        A retried commit returns the original result and charges nothing."""
        row = await self._reservation(body)
        if row["state"] == "committed":
            return self._replayed_commit(row)
        try:
            result = await self.ledger.commit(self._as_reservation(row), body.units)
        except ReservationSettled as exc:
            if exc.state != "committed":
                raise
            return self._replayed_commit(await self._reservation(body))  # a retry won the race
        if not result.ok:
            units = row["units"] if body.units is None else body.units
            raise problems.units_denied(
                result.reason, result.feature, result.usage_remaining, units
            )
        return _consumed(result, body.reservation_id)

    async def release(self, body: ReleaseRequest) -> Response:
        """Give a reservation's units back. Releasing twice, or after expiry, changes nothing."""
        row = await self._reservation(body)
        if row["kind"] != "reserve":
            raise problems.ReservationConflict(
                "This id is a committed charge, not a reservation.", state="committed"
            )
        released = await self.ledger.release(self._as_reservation(row))
        return _json(_out(ReleaseResponse, body, released=released))

    async def webhook(self, request: Request) -> Response:
        """Stripe's webhook endpoint, verified on the raw body by its Stripe-Signature."""
        billing = self._billing()
        signature = request.headers.get("stripe-signature")
        try:
            result = await _call(billing.handle_webhook, await request.body(), signature)
        except MeteredError as exc:
            if isinstance(exc, Denial) or getattr(exc, "http_status", None) is None:
                raise
            from metered.stripe._http import error_body  # the adapters' webhook bodies

            body, status, content_type = error_body(exc)  # type: ignore[arg-type]
            return JSONResponse(body, status_code=status, media_type=content_type)
        return _json(
            WebhookResponse(
                received=True,
                event_id=_field(result, "event_id"),
                outcome=_field(result, "outcome"),
            )
        )

    async def balance(self, subject_ref: SubjectPath, feature: FeatureQuery = None) -> Response:
        """Allowance, usage, credits, holds and overage of the current period."""
        balances = [
            _out(FeatureBalance, await self.ledger.balance(subject_ref, name))
            for name in ([feature] if feature is not None else self.metered)
        ]
        return _json(BalanceResponse.model_construct(subject_ref=subject_ref, balances=balances))

    async def history(
        self,
        subject_ref: SubjectPath,
        feature: FeatureQuery = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        before: Annotated[
            str | None,
            Query(pattern=LEDGER_ID, description="`next_before` of the previous page."),
        ] = None,
    ) -> Response:
        """The subject's ledger lines, newest first."""
        entries = await self.ledger.history(
            subject_ref,
            feature=feature,
            limit=limit,
            before=min(int(before), _MAX_ID) if before is not None else None,
        )
        items = [_out(HistoryItem, e, id=str(e.id), idempotency_key=e.key) for e in entries]
        next_before = str(entries[-1].id) if len(entries) == limit else None
        return _json(
            HistoryResponse.model_construct(
                subject_ref=subject_ref, entries=items, next_before=next_before
            )
        )

    # ----------------------------------------------------------------- wiring

    def routes(self, app: FastAPI) -> None:
        billing: Responses = {
            400: _problem("Stripe refused the checkout (e.g. the plan has no price)."),
            501: _problem("No Stripe billing is configured on this server."),
            502: _problem("Stripe could not be reached or failed."),
        }
        subject = "/v1/subjects/{subject_ref:path}"
        table: list[tuple[str, str, Callable[..., Any], str, type[BaseModel], Responses]] = [
            ("POST", "/v1/checkout/session", self.checkout, "createCheckoutSession",
             CheckoutResponse, {**_COMMON, **billing}),
            ("POST", "/v1/access/check", self.check, "checkAccess", CheckResponse, _COMMON),
            ("POST", "/v1/usage/consume", self.consume, "consumeUnits", ConsumeResponse, _UNITS),
            ("POST", "/v1/usage/reserve", self.reserve, "reserveUnits", ReservationResponse,
             _UNITS),
            ("POST", "/v1/usage/commit", self.commit, "commitReservation", ConsumeResponse,
             {**_SETTLE, 402: _UNITS[402], 403: _UNITS[403]}),
            ("POST", "/v1/usage/release", self.release, "releaseReservation", ReleaseResponse,
             _SETTLE),
            ("GET", f"{subject}/balance", self.balance, "getBalance", BalanceResponse, _COMMON),
            ("GET", f"{subject}/history", self.history, "getHistory", HistoryResponse, _COMMON),
        ]  # fmt: skip
        for method, path, endpoint, operation_id, model, responses in table:
            app.add_api_route(
                path,
                endpoint,
                methods=[method],
                dependencies=[Depends(self.authenticate)],
                response_model=model,
                responses=responses,
                operation_id=operation_id,
                tags=[path.split("/")[2]],
            )
        app.add_api_route(
            "/v1/webhooks/stripe",
            self.webhook,
            methods=["POST"],
            response_model=WebhookResponse,
            operation_id="stripeWebhook",
            tags=["webhooks"],
            responses={
                400: _problem("Bad or stale signature, malformed event, or the other mode."),
                500: _problem("Applying the event failed; Stripe will retry it."),
                501: billing[501],
                503: _COMMON[503],
            },
            openapi_extra={
                "security": [],
                "parameters": [
                    {"name": "Stripe-Signature", "in": "header", "required": True,
                     "schema": {"type": "string"}},
                ],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {
                        "type": "object", "description": "A Stripe event (verified raw bytes)."
                    }}},
                },
            },
        )  # fmt: skip


def _resolve_mode(mode: str | None, billing: Billing | None) -> Mode:
    livemode = getattr(billing, "livemode", None) if billing is not None else None
    from_billing: Mode | None = None if livemode is None else ("live" if livemode else "test")
    if mode is None:
        return from_billing or "test"
    chosen = check_mode(mode)
    if from_billing is not None and from_billing != chosen:
        raise ConfigurationError(
            f"mode={chosen!r} but the Stripe billing is in {from_billing} mode"
        )
    return chosen


def create_app(
    ledger: AsyncLedger,
    *,
    billing: Billing | None = None,
    mode: str | None = None,
    key_cache_seconds: float = 5.0,
    close_ledger: bool = False,
) -> FastAPI:
    """The HTTP API over ``ledger`` as an ASGI app.

    ``mode`` (``"test"`` or ``"live"``) decides which API keys are accepted; default: the
    mode of ``billing`` (its ``livemode``), else ``"test"``. ``billing`` (a
    :class:`metered.stripe.StripeBilling`) backs ``/v1/checkout/session`` and
    ``/v1/webhooks/stripe``; without it they answer 501. ``close_ledger=True`` closes the
    ledger on shutdown (when the app owns it and is not mounted in another app).
    """
    if not isinstance(ledger, AsyncLedger):
        raise ConfigurationError("create_app needs a metered.AsyncLedger")
    server_mode = _resolve_mode(mode, billing)
    api = _Api(ledger, billing, KeyLookup(ledger, server_mode, cache_seconds=key_cache_seconds))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        if close_ledger:
            await ledger.close()

    app = FastAPI(
        title="metered",
        version=__version__,
        summary="Entitlements, usage and Stripe checkout over HTTP.",
        description=f"Mode: **{server_mode}**. Authenticate with `Authorization: Bearer <key>`; "
        "errors are RFC 9457 `application/problem+json` documents.",
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.metered_mode = server_mode
    api.routes(app)

    async def on_metered_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, MeteredError)
        key = request.headers.get("idempotency-key")
        return _problem_response(problems.problem_for(exc, method=request.method, key=key))

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors)
        return _problem_response(problems.InvalidRequest(detail, errors))

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        denial = Denial(str(exc.detail))
        denial.status, denial.slug, denial.title = exc.status_code, "http-error", str(exc.detail)
        response = _problem_response(denial)
        response.headers.update(exc.headers or {})
        return response

    app.add_exception_handler(MeteredError, on_metered_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _problem_media_types(
                get_openapi(
                    title=app.title,
                    version=app.version,
                    summary=app.summary,
                    description=app.description,
                    routes=app.routes,
                )
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _problem_media_types(document: dict[str, Any]) -> dict[str, Any]:
    """Error responses are ``application/problem+json``, not the ``application/json``
    FastAPI writes for every declared model."""
    for path_item in document.get("paths", {}).values():
        for operation in path_item.values():
            for status, response in operation.get("responses", {}).items():
                content = response.get("content", {})
                if status[0] in "45" and "application/json" in content:
                    content[PROBLEM_CONTENT_TYPE] = content.pop("application/json")
    return document


def from_env() -> FastAPI:
    """The app ``metered serve`` runs (a uvicorn factory), configured from the environment.

    ``METERED_DATABASE_URL`` (default ``sqlite:///metered.db``), ``METERED_PLANS`` (the
    plans file, required), ``METERED_MODE`` (``test``/``live``), and for Stripe billing
    ``STRIPE_API_KEY`` + ``STRIPE_WEBHOOK_SECRET``.
    """
    plans = os.environ.get("METERED_PLANS")
    if not plans:
        raise ConfigurationError("METERED_PLANS (the plans file) is required")
    ledger = AsyncLedger(os.environ.get("METERED_DATABASE_URL"), plans=Catalog.load(plans))
    billing = _billing_from_env(ledger)
    return create_app(
        ledger, billing=billing, mode=os.environ.get("METERED_MODE") or None, close_ledger=True
    )


def _billing_from_env(ledger: AsyncLedger) -> Billing | None:
    api_key = os.environ.get("STRIPE_API_KEY")
    if not api_key:
        return None
    secret = os.environ.get("STRIPE_WEBHOOK_SECRET")
    if not secret:
        raise ConfigurationError("STRIPE_API_KEY is set but STRIPE_WEBHOOK_SECRET is not")
    try:
        import stripe

        from metered.stripe import AsyncStripeBilling
    except ImportError as exc:
        raise ConfigurationError(
            f"Stripe billing needs the stripe extra: pip install 'metered-billing[stripe]' ({exc})"
        ) from exc
    return AsyncStripeBilling(ledger, client=stripe.StripeClient(api_key), webhook_secret=secret)
