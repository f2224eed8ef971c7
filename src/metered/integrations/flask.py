"""Flask adapter: the ``Metered`` extension and the ``@consumes`` / ``@requires_entitlement``
decorators.

::

    from metered import Ledger, Plan
    from metered.integrations.flask import Metered, consumes, requires_entitlement, settle

    ledger = Ledger("sqlite:///metered.db", plans=[Plan("free", features={"api_calls": 100})],
                    default_plan="free")
    metered = Metered(app, ledger=ledger, subject=lambda: request.headers.get("X-API-Key"))

    @app.post("/generate")
    @consumes(10, feature="api_calls")          # key: the Idempotency-Key header by default
    def generate():
        ...

    @app.post("/summarise")
    @requires_entitlement("reports")            # 403 unless the plan includes "reports"
    @consumes(lambda request: len(request.get_data()) // 1000 + 1)   # priced by payload size
    def summarise():
        tokens = run_model()
        settle(tokens)                          # charge what was used (less returns the rest)
        return {"tokens": tokens}

How a request is metered: before the view, the subject is resolved (``subject()`` returning
None answers 401), the entitlement checked (403) and the units reserved (402 when the balance
cannot cover them, 409 while another request with the same idempotency key is in flight, 503
when the ledger is unreachable unless ``fail_open``). After the view, the reservation is
committed if and only if no exception escaped the view and the final response status (after
``after_request`` handlers and error handlers) passes the commit policy (``status < 400`` by
default); otherwise it is released. A streamed response (a generator,
``stream_with_context``) commits only when the server has sent the last chunk and closed the
body; a client that disconnects mid-stream, or an exception while streaming, releases.
Successful metered responses carry the remaining balance in ``Metered-Remaining``.

``subject`` takes no arguments and reads ``flask.request`` or ``flask.g``; ``units`` and
``key`` callables receive the ``flask.Request``. Subject recipes::

    # An API key header, mapped to the customer it belongs to
    subject=lambda: api_keys.get(request.headers.get("X-API-Key", ""))

    # Flask-Login: the logged-in user (None for anonymous users, answered 401)
    subject=lambda: f"user_{current_user.id}" if current_user.is_authenticated else None

    # Whatever your own auth sets in a before_request hook
    subject=lambda: g.get("org_id")

Denials are werkzeug ``HTTPException`` subclasses that also derive from the framework-free
denials of :mod:`metered.integrations._policy` (``PaymentRequired`` is both a
``werkzeug.exceptions.HTTPException`` with ``code == 402`` and a
``metered.integrations._policy.PaymentRequired``). They render as RFC 9457
``application/problem+json``; ``@app.errorhandler(402)`` (or 401, 403, 409, 503) replaces
that, and ``error.problem()`` gives the body as a dict.

Testing tip: Flask's test client closes a response only when asked to, and a streamed
response commits on close: use ``client.get(..., buffered=True)`` (or ``with client.get(...)
as response:``) for streaming endpoints. Non-streamed responses commit before they are sent.

Configuration (``app.config``; arguments given to :class:`Metered` win):

==============================  ==========================================================
``METERED_SUBJECT``             the subject callable, when not passed as ``subject=``
``METERED_FAIL_OPEN``           ``True``: let requests through uncharged when the ledger is
                                unreachable (logged as ``metered.fail_open``); default
                                ``False`` answers 503; per feature: names or a mapping
``METERED_SHADOW``              shadow mode: ``True``, or feature names (or a mapping with
                                ``"*"``): denials are logged as ``metered.shadow_denied``,
                                not enforced, and nothing is charged
``METERED_ON_EVENT``            ``on_event(name, fields)`` called for every event (metrics)
``METERED_COMMIT_ON``           ``commit_on(status) -> bool``; default ``status < 400``
``METERED_REMAINING_HEADER``    balance header name, default ``"Metered-Remaining"``;
                                ``None`` sends none
``METERED_IDEMPOTENCY_HEADER``  request header with the idempotency key, default
                                ``"Idempotency-Key"``
``METERED_RESERVATION_TTL``     seconds (or a ``timedelta``) a reservation lives if the
                                worker dies; default: the ledger's (5 minutes)
``METERED_DATABASE_URL``        with ``METERED_PLANS`` (a list of ``Plan``, a ``Catalog`` or
``METERED_PLANS``               a plans file path) and optional ``METERED_DEFAULT_PLAN``,
``METERED_DEFAULT_PLAN``        builds the ``Ledger`` when none is passed; the URL defaults
                                to ``$METERED_DATABASE_URL``, else ``sqlite:///metered.db``
``METERED_CREATE_SCHEMA``       create/upgrade the tables of a ledger built from config
                                (default ``True``)
==============================  ==========================================================
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable, Mapping
from datetime import timedelta
from enum import Enum
from typing import TYPE_CHECKING, Any, TypeVar, cast
from weakref import WeakKeyDictionary

from flask import Flask, Request, Response, current_app, request, request_finished
from werkzeug import exceptions as http_exceptions

from metered.errors import ConfigurationError, MeteredError
from metered.integrations import _policy
from metered.integrations._policy import (
    DEFAULT_IDEMPOTENCY_HEADER,
    DEFAULT_REMAINING_HEADER,
    PROBLEM_CONTENT_TYPE,
    Denial,
    EventHook,
    FeatureSwitch,
    Policy,
    Ticket,
    admit_entitlement,
    admit_units,
    default_commit_on,
    finish,
    require_subject,
    run_sync,
)
from metered.integrations._rules import annotate, describe_key, describe_units
from metered.integrations.wsgi import (
    ENVIRON_METER,
    Charge,
    RequestMeter,
    SettlingBody,
    request_meter,
)
from metered.integrations.wsgi import current_ticket as _environ_ticket
from metered.ledger import Ledger

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = [
    "EntitlementRequired",
    "HTTPPaymentRequired",
    "IdempotencyKeyReused",
    "InsufficientUnits",
    "InvalidIdempotencyKey",
    "Metered",
    "MeteredHTTPException",
    "PaymentRequired",
    "RequestInProgress",
    "ServiceUnavailable",
    "SubjectRequired",
    "SubscriptionInactive",
    "consumes",
    "current_ticket",
    "requires_entitlement",
    "settle",
    "stripe_webhook_blueprint",
]

F = TypeVar("F", bound=Callable[..., Any])
Units = int | Callable[[Request], int]
KeyFunc = Callable[[Request], str | None]


# --------------------------------------------------------------------------- denials


class MeteredHTTPException(http_exceptions.HTTPException):
    """Base of the Flask denials: renders the denial as ``application/problem+json``."""

    def get_body(self, environ: Any = None, scope: dict[str, Any] | None = None) -> str:
        """The problem+json body (what Flask sends unless an errorhandler replaces it)."""
        return json.dumps(cast(Denial, self).problem(), separators=(",", ":"))

    def get_headers(
        self, environ: Any = None, scope: dict[str, Any] | None = None
    ) -> list[tuple[str, str]]:
        """The werkzeug headers, with the problem+json content type."""
        headers = super().get_headers(environ, scope)
        return [h for h in headers if h[0].lower() != "content-type"] + [
            ("Content-Type", PROBLEM_CONTENT_TYPE)
        ]


class SubjectRequired(_policy.SubjectRequired, MeteredHTTPException, http_exceptions.Unauthorized):
    """401: no subject could be resolved for the request."""

    code = 401


class EntitlementRequired(
    _policy.EntitlementRequired, MeteredHTTPException, http_exceptions.Forbidden
):
    """403: the subject's plan lacks the feature."""

    code = 403


class SubscriptionInactive(_policy.SubscriptionInactive, EntitlementRequired):
    """403: the subject's subscription is not active."""


class HTTPPaymentRequired(http_exceptions.HTTPException):
    """*402 Payment Required*, which werkzeug lacks; registered as its exception for 402, so
    that ``@app.errorhandler(402)`` and ``abort(402)`` work."""

    code = 402
    description = "Payment is required to access this resource."


class PaymentRequired(_policy.PaymentRequired, MeteredHTTPException, HTTPPaymentRequired):
    """402: no units left."""

    code = 402


class InsufficientUnits(_policy.InsufficientUnits, PaymentRequired):
    """402: fewer units left than the request asks for."""


class RequestInProgress(_policy.RequestInProgress, MeteredHTTPException, http_exceptions.Conflict):
    """409: a request with the same idempotency key is still in flight."""

    code = 409


class IdempotencyKeyReused(
    _policy.IdempotencyKeyReused, MeteredHTTPException, http_exceptions.UnprocessableEntity
):
    """422: the idempotency key was used for a different operation."""

    code = 422


class InvalidIdempotencyKey(
    _policy.InvalidIdempotencyKey, MeteredHTTPException, http_exceptions.BadRequest
):
    """400: the idempotency key header is malformed (empty, too long, NUL)."""

    code = 400


class ServiceUnavailable(
    _policy.ServiceUnavailable, MeteredHTTPException, http_exceptions.ServiceUnavailable
):
    """503: the ledger is unreachable and the extension fails closed."""

    code = 503


_FLASK_DENIALS: dict[type[Denial], type[Denial]] = {
    _policy.SubjectRequired: SubjectRequired,
    _policy.EntitlementRequired: EntitlementRequired,
    _policy.SubscriptionInactive: SubscriptionInactive,
    _policy.PaymentRequired: PaymentRequired,
    _policy.InsufficientUnits: InsufficientUnits,
    _policy.RequestInProgress: RequestInProgress,
    _policy.IdempotencyKeyReused: IdempotencyKeyReused,
    _policy.InvalidIdempotencyKey: InvalidIdempotencyKey,
    _policy.ServiceUnavailable: ServiceUnavailable,
}

http_exceptions.default_exceptions.setdefault(402, HTTPPaymentRequired)


def _http_denial(denial: Denial) -> Denial:
    """The Flask (``HTTPException``) version of a policy denial."""
    if isinstance(denial, MeteredHTTPException):
        return denial
    cls = _FLASK_DENIALS.get(type(denial))
    if cls is None:
        return denial
    return cls(denial.detail, **denial.fields)


# --------------------------------------------------------------------------- extension


class _Unset(Enum):
    UNSET = "UNSET"


_UNSET = _Unset.UNSET


class _AppState:
    """What the extension holds for one Flask app."""

    __slots__ = ("ledger", "policy", "subject")

    def __init__(self, ledger: Ledger, policy: Policy, subject: Callable[[], str | None]) -> None:
        self.ledger = ledger
        self.policy = policy
        self.subject = subject


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _as_switch(value: Any) -> FeatureSwitch:
    """A ``METERED_*`` on/off setting: a bool (or its string form), names, or a mapping."""
    if isinstance(value, (Mapping, list, tuple, set, frozenset)):
        return value
    return _as_bool(value)


def _as_seconds(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, timedelta):
        return value.total_seconds()
    return float(value)


class Metered:
    """The Flask extension: metering settings and the ledger for one or more apps.

    :param app: the app, or None to call :meth:`init_app` later.
    :param ledger: a :class:`metered.Ledger`; without one it is built from
        ``METERED_DATABASE_URL`` / ``METERED_PLANS``.
    :param subject: ``subject() -> str | None`` reading ``flask.request`` or ``flask.g``.
    :param fail_open: see ``METERED_FAIL_OPEN``; the other options map to the ``METERED_*``
        keys of the module docstring, and win over them.

    ``init_app`` stores the extension in ``app.extensions["metered"]``, where the module-level
    decorators find it.
    """

    def __init__(
        self,
        app: Flask | None = None,
        *,
        ledger: Ledger | None = None,
        subject: Callable[[], str | None] | None = None,
        fail_open: FeatureSwitch | None = None,
        commit_on: Callable[[int], bool] | None = None,
        remaining_header: str | _Unset | None = _UNSET,
        idempotency_header: str | None = None,
        reservation_ttl: float | timedelta | None = None,
        shadow: FeatureSwitch | None = None,
        on_event: EventHook | None = None,
    ) -> None:
        self._ledger = ledger
        self._subject = subject
        self._fail_open = fail_open
        self._commit_on = commit_on
        self._remaining_header = remaining_header
        self._idempotency_header = idempotency_header
        self._reservation_ttl = reservation_ttl
        self._shadow = shadow
        self._on_event = on_event
        self._apps: WeakKeyDictionary[Flask, _AppState] = WeakKeyDictionary()
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Configure metering for ``app`` (constructor arguments win over ``METERED_*``)."""
        config = app.config
        subject = self._subject or config.get("METERED_SUBJECT")
        if subject is None or not callable(subject):
            raise ConfigurationError(
                "Metered needs subject=, a callable of no arguments returning the subject "
                "reference (or METERED_SUBJECT)"
            )
        fail_open = self._fail_open
        if fail_open is None:
            fail_open = _as_switch(config.get("METERED_FAIL_OPEN", False))
        shadow = self._shadow
        if shadow is None:
            shadow = _as_switch(config.get("METERED_SHADOW", False))
        remaining = self._remaining_header
        if isinstance(remaining, _Unset):
            remaining = config.get("METERED_REMAINING_HEADER", DEFAULT_REMAINING_HEADER)
        ttl = self._reservation_ttl
        if ttl is None:
            ttl = config.get("METERED_RESERVATION_TTL")
        policy = Policy(
            fail_open=fail_open,
            commit_on=self._commit_on or config.get("METERED_COMMIT_ON") or default_commit_on,
            remaining_header=remaining or None,
            idempotency_header=self._idempotency_header
            or config.get("METERED_IDEMPOTENCY_HEADER")
            or DEFAULT_IDEMPOTENCY_HEADER,
            reservation_ttl=_as_seconds(ttl),
            shadow=shadow,
            on_event=self._on_event or config.get("METERED_ON_EVENT"),
        )
        first_time = app not in self._apps
        ledger = self._ledger or self._ledger_from_config(app)
        self._apps[app] = _AppState(ledger, policy, subject)
        app.extensions["metered"] = self
        if first_time:
            request_finished.connect(self._request_finished, app, weak=False)
            app.teardown_request(self._teardown_request)

    @staticmethod
    def _ledger_from_config(app: Flask) -> Ledger:
        config = app.config
        plans = config.get("METERED_PLANS")
        if plans is None:
            raise ConfigurationError(
                "Metered needs ledger=, or METERED_PLANS (and METERED_DATABASE_URL) to build one"
            )
        ledger = Ledger(
            config.get("METERED_DATABASE_URL"),
            plans=plans,
            default_plan=config.get("METERED_DEFAULT_PLAN"),
        )
        if _as_bool(config.get("METERED_CREATE_SCHEMA", True)):
            ledger.create_schema()
        return ledger

    def _state(self) -> _AppState:
        app = current_app._get_current_object()  # type: ignore[attr-defined]
        try:
            return self._apps[app]
        except KeyError:
            raise ConfigurationError(
                f"Metered is not initialised on app {app.name!r}; call init_app(app)"
            ) from None

    @property
    def ledger(self) -> Ledger:
        """The ledger of the current app (or the one passed to the constructor)."""
        if self._ledger is not None:
            return self._ledger
        return self._state().ledger

    @property
    def policy(self) -> Policy:
        """The metering settings of the current app."""
        return self._state().policy

    # ----------------------------------------------------------------- decorators

    def consumes(
        self,
        units: Units,
        *,
        feature: str | None = None,
        key: KeyFunc | None = None,
        commit_on: Callable[[int], bool] | None = None,
        ttl: float | timedelta | None = None,
    ) -> Callable[[F], F]:
        """:func:`consumes` bound to this extension."""
        return _consumes_decorator(lambda: self, units, feature, key, commit_on, ttl)

    def requires_entitlement(self, feature: str) -> Callable[[F], F]:
        """:func:`requires_entitlement` bound to this extension."""
        return _entitlement_decorator(lambda: self, feature)

    # ----------------------------------------------------------------- request steps

    def _check(self, feature: str) -> None:
        meter = request_meter(request.environ)
        if feature in meter.entitled:
            return
        state = self._state()
        try:
            run_sync(admit_entitlement(state.policy, state.subject(), feature), state.ledger)
        except Denial as denial:
            raise _http_denial(denial) from denial.__cause__
        meter.entitled.add(feature)

    def _reserve(
        self,
        units: Units,
        feature: str | None,
        key: KeyFunc | None,
        commit_on: Callable[[int], bool] | None,
        ttl: float | timedelta | None,
    ) -> Charge | None:
        environ = request.environ
        meter = request_meter(environ)
        if meter.charges and meter.ticket(feature) is not None:
            return None  # already charged for this feature (e.g. by the WSGI middleware)
        state = self._state()
        policy = state.policy
        try:
            subject = state.subject()
            amount = units(request) if callable(units) else units
            if amount == 0 and callable(units):
                require_subject(subject)
                return None
            if key is not None:
                idempotency_key = key(request)
            else:
                idempotency_key = request.headers.get(policy.idempotency_header)
                if idempotency_key is not None and meter.charges:
                    # a second feature charged by the same request: a key of its own
                    idempotency_key = f"{idempotency_key}:{feature}"
            ticket: Ticket = run_sync(
                admit_units(
                    policy,
                    subject,
                    amount,
                    feature=feature,
                    key=idempotency_key,
                    commit_on=commit_on,
                    ttl=_as_seconds(ttl),
                ),
                state.ledger,
            )
        except Denial as denial:
            raise _http_denial(denial) from denial.__cause__
        charge = Charge(ticket, state.ledger, self, policy.remaining_header)
        meter.add(environ, charge)
        return charge

    @staticmethod
    def _release(charge: Charge | None) -> None:
        if charge is not None:
            run_sync(finish(charge.ticket, succeeded=False), charge.ledger)

    def _request_finished(self, sender: Flask, response: Response, **extra: Any) -> None:
        """Settle (or arm, for streamed bodies) this extension's tickets on the final response."""
        meter: RequestMeter | None = request.environ.get(ENVIRON_METER)
        if meter is None:
            return
        mine = [
            c for c in meter.charges if c.owner is self and not c.armed and not c.ticket.finished
        ]
        if not mine:
            return
        status = response.status_code
        primary = mine[0]
        header = primary.remaining_header
        value = primary.ticket.remaining_header_value()
        if response.is_streamed:
            for charge in mine:
                charge.armed = True
            body = cast("Iterable[bytes]", response.response)
            response.response = SettlingBody(body, meter, self, lambda: status)
        else:
            for charge in mine:
                succeeded = charge.ticket.commit_on(status)
                result = run_sync(finish(charge.ticket, succeeded=succeeded), charge.ledger)
                if charge is primary and result is not None and not result.replayed:
                    value = str(result.usage_remaining)
        if header is not None and value is not None and primary.ticket.commit_on(status):
            response.headers[header] = value

    def _teardown_request(self, exc: BaseException | None) -> None:
        """Release tickets no response settled (e.g. an error raised past the error handlers)."""
        meter: RequestMeter | None = request.environ.get(ENVIRON_METER)
        if meter is None:
            return
        for charge in meter.charges:
            if charge.owner is self and not charge.armed and not charge.ticket.finished:
                run_sync(finish(charge.ticket, succeeded=False), charge.ledger)


# --------------------------------------------------------------------------- module-level API


def _current_extension() -> Metered:
    try:
        extension: Metered = current_app.extensions["metered"]
    except KeyError:
        raise ConfigurationError(
            "no Metered extension on this app: call Metered(app, ...) or metered.init_app(app)"
        ) from None
    return extension


def _consumes_decorator(
    find: Callable[[], Metered],
    units: Units,
    feature: str | None,
    key: KeyFunc | None,
    commit_on: Callable[[int], bool] | None,
    ttl: float | timedelta | None,
) -> Callable[[F], F]:
    if not callable(units):
        from metered.validation import units as check_units

        check_units(units)

    info = {
        "kind": "consumes",
        "feature": feature,
        "units": describe_units(units),
        "key": describe_key(key),
    }

    def decorate(view: F) -> F:
        if inspect.iscoroutinefunction(view):

            @functools.wraps(view)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                charge = find()._reserve(units, feature, key, commit_on, ttl)
                try:
                    return await view(*args, **kwargs)
                except BaseException:
                    Metered._release(charge)
                    raise

            annotate(async_wrapper, view, **info)
            return cast(F, async_wrapper)

        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            charge = find()._reserve(units, feature, key, commit_on, ttl)
            try:
                return view(*args, **kwargs)
            except BaseException:
                Metered._release(charge)
                raise

        annotate(wrapper, view, **info)
        return cast(F, wrapper)

    return decorate


def _entitlement_decorator(find: Callable[[], Metered], feature: str) -> Callable[[F], F]:
    from metered.validation import feature as check_feature

    check_feature(feature)

    def decorate(view: F) -> F:
        if inspect.iscoroutinefunction(view):

            @functools.wraps(view)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                find()._check(feature)
                return await view(*args, **kwargs)

            annotate(async_wrapper, view, kind="requires_entitlement", feature=feature)
            return cast(F, async_wrapper)

        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            find()._check(feature)
            return view(*args, **kwargs)

        annotate(wrapper, view, kind="requires_entitlement", feature=feature)
        return cast(F, wrapper)

    return decorate


def consumes(
    units: Units,
    *,
    feature: str | None = None,
    key: KeyFunc | None = None,
    commit_on: Callable[[int], bool] | None = None,
    ttl: float | timedelta | None = None,
) -> Callable[[F], F]:
    """Reserve ``units`` before the view; commit them only if the request succeeds.

    :param units: an ``int``, or ``units(request) -> int`` (0 from a callable: free request).
    :param feature: the metered feature; None when the plans define exactly one.
    :param key: ``key(request) -> str | None``, the idempotency key; default: the
        ``Idempotency-Key`` header. A key that already committed is not charged again
        (``current_ticket().replayed``); one still in flight answers 409.
    :param commit_on: ``commit_on(status) -> bool`` for this view (default: the app's).
    :param ttl: seconds the reservation lives if the worker dies (default: the app's).

    Works on sync and ``async`` views, blueprint views and ``MethodView`` methods (or in its
    ``decorators`` list). A request already charged for this feature (by the WSGI middleware
    or another decorator) is not charged again.
    """
    return _consumes_decorator(_current_extension, units, feature, key, commit_on, ttl)


def requires_entitlement(feature: str) -> Callable[[F], F]:
    """Deny the view with 403 unless the subject's plan includes ``feature`` (401: no subject)."""
    return _entitlement_decorator(_current_extension, feature)


def current_ticket(feature: str | None = None) -> Ticket | None:
    """The current request's ticket (for ``feature``, or the first), None when not metered.

    ``ticket.replayed`` tells a view that its idempotency key already committed.
    """
    return _environ_ticket(request.environ, feature)


def settle(units: int, *, feature: str | None = None) -> None:
    """Charge ``units`` instead of the reserved amount if the current request succeeds.

    Fewer units give the rest back; more succeed only if the balance allows it at commit
    time. Call it in the view, or in a ``stream_with_context`` generator before its end.
    """
    ticket = current_ticket(feature)
    if ticket is None:
        raise MeteredError("settle() needs a request metered by @consumes or the middleware")
    ticket.settle(units)


if TYPE_CHECKING:
    from metered.integrations._stripe_flask import stripe_webhook_blueprint


def __getattr__(attr: str) -> Any:
    # The Stripe webhook endpoint needs the ``stripe`` extra; import it only when asked for,
    # so the adapter works without it.
    if attr == "stripe_webhook_blueprint":
        from metered.integrations._stripe_flask import stripe_webhook_blueprint

        return stripe_webhook_blueprint
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
