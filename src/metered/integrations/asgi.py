"""Pure ASGI metering for Starlette and FastAPI: :class:`MeteredMiddleware` and :class:`Metered`.

Configure an app once, in either of two ways (both install the same pure ASGI middleware)::

    from starlette.middleware import Middleware
    from metered.integrations.asgi import Metered, MeteredMiddleware, Rule

    # 1. as middleware (the spelling of the design doc)
    app = Starlette(routes=routes, middleware=[
        Middleware(MeteredMiddleware, ledger=ledger,
                   subject=lambda request: request.headers.get("x-api-key"),
                   rules=[Rule("/v1/*", methods=["POST"], units=1, feature="api_calls")]),
    ])

    # 2. one line, like the Flask extension (also registers the problem+json exception
    #    handler, so denials raised in endpoints render inside the app's own middleware stack)
    Metered(app, ledger=ledger, subject=lambda request: request.headers.get("x-api-key"))

The middleware never buffers a body and never re-sends ``http.response.start``. Per request it

* skips non-HTTP scopes (lifespan, websocket) and exempt paths (the Stripe webhook route);
* admits the first matching :class:`~metered.integrations._rules.Rule` *before* the app runs:
  401/402/403/409/422/503 are answered as ``application/problem+json``;
* wraps ``send``: records the status, adds the remaining balance header (default
  ``Metered-Remaining``) to ``http.response.start`` when the status passes the commit policy,
  and commits every ticket of the request right after the terminal body message
  (``more_body`` false, ``http.response.pathsend``, or the last trailers) was handed to the
  server;
* releases instead when the app raised, the status fails the commit policy (default: < 400),
  the client disconnected (``http.disconnect`` received, or ``send`` raised ``OSError``) or the
  app returned without finishing the body.

Decorators (:mod:`metered.integrations.starlette`, :mod:`metered.integrations.fastapi`) and
FastAPI dependencies do not settle anything themselves: they admit their ticket into the
request's exchange (``scope["metered.exchange"]``) and this middleware settles it, so streaming
responses commit only when fully sent and a route covered by a rule *and* a decorator for the
same feature is charged once. The request's first :class:`~metered.integrations._policy.Ticket`
is ``request.state.metered`` (``scope["state"]["metered"]``); handlers may
``request.state.metered.settle(units)`` to charge a different final amount.

**Subject recipes** (``subject`` takes the Starlette ``Request``; sync or async; ``None`` = 401)::

    # an API key header, looked up in your own table
    async def subject(request):
        return await api_keys.owner(request.headers.get("x-api-key"))

    # Starlette's AuthenticationMiddleware (list it *before* the metered middleware)
    subject=lambda request: request.user.identity if request.user.is_authenticated else None

    # set by an auth dependency / middleware of your own
    subject=lambda request: getattr(request.state, "user_id", None)

For FastAPI, the subject can also come from a dependency:
``Consumes(5, subject=Depends(current_user_id))`` (see :mod:`metered.integrations.fastapi`).
Rule ``subject``/``units``/``key`` callables run before the app and must not read the body.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Any, TypeAlias, TypeVar

import anyio
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from metered.errors import ConfigurationError
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
    run_async,
)
from metered.integrations._rules import Rule, exempt_path, first_match, is_exempt
from metered.ledger import AsyncLedger, Ledger
from metered.results import CheckResult
from metered.validation import units as check_units

__all__ = [
    "EXCHANGE_KEY",
    "STATE_KEY",
    "Exchange",
    "KeyFn",
    "Metered",
    "MeteredMiddleware",
    "Rule",
    "SubjectFn",
    "UnitsFn",
    "check_entitlement",
    "current_ticket",
    "exchange_of",
    "exempt_path",
    "handle_denial",
    "problem_body",
    "problem_response",
    "reserve_units",
    "settle",
]

EXCHANGE_KEY = "metered.exchange"
"""Scope key of the per-request :class:`Exchange` (present when a MeteredMiddleware runs)."""
STATE_KEY = "metered"
"""``scope["state"]`` key of the request's first ticket: ``request.state.metered``."""

SubjectFn: TypeAlias = Callable[[Request], "str | Awaitable[str | None] | None"]
"""``subject(request) -> str | None``, plain or async."""
UnitsFn: TypeAlias = Callable[[Request], "int | Awaitable[int]"]
"""``units(request) -> int``, plain or async (e.g. priced by payload size)."""
KeyFn: TypeAlias = Callable[[Request], "str | Awaitable[str | None] | None"]
"""``key(request) -> str | None``: the idempotency key (None: the request is its own event)."""
T = TypeVar("T")


class _Unset:
    """Marker: the subject was not given by the caller (resolve it with the app's callable)."""


UNSET: Any = _Unset()


async def _maybe_await(value: T | Awaitable[T]) -> T:
    if inspect.isawaitable(value):
        return await value
    return value


def problem_body(denial: Denial) -> bytes:
    """The RFC 9457 JSON body of a denial."""
    return json.dumps(denial.problem(), separators=(",", ":")).encode()


def problem_response(denial: Denial) -> Response:
    """A Starlette ``application/problem+json`` response for ``denial``."""
    return Response(problem_body(denial), denial.status, media_type=PROBLEM_CONTENT_TYPE)


async def handle_denial(request: Request, exc: Exception) -> Response:
    """Starlette exception handler rendering any :class:`Denial` as problem+json.

    :class:`Metered` registers it; register it yourself with
    ``exception_handlers={Denial: handle_denial}``, or a handler of your own for one denial
    class (``{PaymentRequired: my_402_page}``: the most specific class wins).
    """
    if not isinstance(exc, Denial):  # pragma: no cover - registered for Denial only
        raise exc
    return problem_response(exc)


# --------------------------------------------------------------------------- configuration


class Metered:
    """How an app meters requests: the ledger, how to find the subject, and the policy.

    ``Metered(app, ...)`` (or ``init_app(app)``) adds :class:`MeteredMiddleware` configured by
    this object, registers :func:`handle_denial` for :class:`Denial` unless the app has its own,
    and sets ``app.state.metered``. Decorators and FastAPI dependencies use the configuration of
    the middleware that wraps the request.

    :param ledger: an :class:`~metered.AsyncLedger` (a sync :class:`~metered.Ledger` would
        block the event loop and is refused).
    :param subject: ``subject(request) -> str | None`` (plain or async); None answers 401.
    :param rules: route rules admitted by the middleware before the app runs.
    :param fail_open: when the ledger is unreachable, let requests through uncharged (logged as
        ``metered.fail_open``) instead of answering 503; ``True``, or per feature (a collection
        of names, or a mapping with ``"*"`` as the fallback).
    :param shadow: shadow mode, for every feature or per feature like ``fail_open``: denials
        are computed and emitted as ``metered.shadow_denied`` but not enforced; nothing is
        charged.
    :param on_event: ``on_event(name, fields)`` for every event (metrics hooks).
    :param commit_on: ``commit_on(status) -> bool``; default: status < 400.
    :param remaining_header: response header with the remaining balance (None: no header).
    :param idempotency_header: request header whose value is the default idempotency key.
    :param reservation_ttl: seconds (or a ``timedelta``) a reservation outlives a dead worker.
    """

    def __init__(
        self,
        app: Any = None,
        *,
        ledger: AsyncLedger,
        subject: SubjectFn | None = None,
        rules: Sequence[Rule] = (),
        fail_open: FeatureSwitch = False,
        commit_on: Callable[[int], bool] = default_commit_on,
        remaining_header: str | None = DEFAULT_REMAINING_HEADER,
        idempotency_header: str = DEFAULT_IDEMPOTENCY_HEADER,
        reservation_ttl: float | timedelta | None = None,
        shadow: FeatureSwitch = False,
        on_event: EventHook | None = None,
    ) -> None:
        if isinstance(ledger, Ledger) or not isinstance(ledger, AsyncLedger):
            raise ConfigurationError(
                "Starlette/FastAPI metering needs an AsyncLedger (a sync Ledger would block the"
                f" event loop), got {type(ledger).__name__}"
            )
        if subject is not None and not callable(subject):
            raise ConfigurationError("subject must be a callable of the request")
        for rule in rules:
            if not isinstance(rule, Rule):
                raise ConfigurationError(f"rules must be Rule objects, got {type(rule).__name__}")
        if rules and subject is None:
            raise ConfigurationError("rules need a subject= callable to know whom to charge")
        if isinstance(reservation_ttl, timedelta):
            reservation_ttl = reservation_ttl.total_seconds()
        self.ledger = ledger
        self.subject = subject
        self.rules: tuple[Rule, ...] = tuple(rules)
        self.policy = Policy(
            fail_open=fail_open,
            commit_on=commit_on,
            remaining_header=remaining_header,
            idempotency_header=idempotency_header,
            reservation_ttl=reservation_ttl,
            shadow=shadow,
            on_event=on_event,
        )
        self._remaining_header = remaining_header.lower().encode() if remaining_header else None
        self._default_feature = _single_metered_feature(ledger)
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Any) -> None:
        """Install on a Starlette or FastAPI app (before it starts serving)."""
        app.add_middleware(MeteredMiddleware, metered=self)
        if not any(_handles_denials(key) for key in app.exception_handlers):
            app.add_exception_handler(Denial, handle_denial)
        app.state.metered = self

    async def subject_of(self, request: Request) -> str | None:
        """Resolve the request's subject with the configured callable."""
        if self.subject is None:
            raise ConfigurationError(
                "no subject= configured: pass subject= to Metered/MeteredMiddleware (or give"
                " the FastAPI dependency a subject=Depends(...))"
            )
        return await _maybe_await(self.subject(request))

    async def key_of(self, request: Request, key: KeyFn | None) -> str | None:
        """The idempotency key: ``key(request)``, else the Idempotency-Key header, else None."""
        if key is None:
            return request.headers.get(self.policy.idempotency_header) or None
        return await _maybe_await(key(request))

    def resolve_feature(self, feature: str | None) -> str | None:
        """``feature``, or the only metered feature of the plans when None."""
        return feature if feature is not None else self._default_feature


def _handles_denials(key: object) -> bool:
    """A handler registered for Denial or one of its bases (not the catch-all Exception)."""
    return (
        isinstance(key, type) and key not in (Exception, BaseException) and issubclass(Denial, key)
    )


def _single_metered_feature(ledger: AsyncLedger) -> str | None:
    names = [name for name, metered in ledger.catalog.metered.items() if metered]
    return names[0] if len(names) == 1 else None


# --------------------------------------------------------------------------- per request


class Exchange:
    """The metering state of one request, shared by every metering layer of that request.

    Created by the outermost :class:`MeteredMiddleware` (``scope["metered.exchange"]``);
    decorators and dependencies add their tickets here and the middleware settles them.
    """

    __slots__ = ("entitled", "entries", "metered", "state")

    def __init__(self, metered: Metered, scope: Scope) -> None:
        self.metered = metered
        self.state: dict[str, Any] = scope.setdefault("state", {})
        """The request's ``scope["state"]`` (a per-request copy of the lifespan state)."""
        self.entries: list[tuple[Ticket, AsyncLedger]] = []
        self.entitled: set[str] = set()

    def ticket(self, feature: str | None = None) -> Ticket | None:
        """The ticket for ``feature`` (the first one when None)."""
        for ticket, _ in self.entries:
            if feature is None or ticket.feature == feature:
                return ticket
        return None

    def add(self, ticket: Ticket, ledger: AsyncLedger) -> None:
        self.entries.append((ticket, ledger))
        self.entitled.add(ticket.feature)
        if not isinstance(self.state.get(STATE_KEY), Ticket):  # the first ticket wins
            self.state[STATE_KEY] = ticket

    def key_in_use(self, key: str) -> bool:
        return any(t.reservation is not None and t.reservation.key == key for t, _ in self.entries)

    def remaining_header(self, status: int) -> tuple[bytes, bytes] | None:
        name = self.metered._remaining_header
        if name is None:
            return None
        for ticket, _ in self.entries:
            value = ticket.remaining_header_value()
            if value is not None and ticket.commit_on(status):
                return name, value.encode()
        return None

    async def finish(self, *, succeeded: bool, status: int | None) -> None:
        """Commit (or release) every unsettled ticket; shielded from cancellation."""
        if not self.entries:
            return
        with anyio.CancelScope(shield=True):
            for ticket, ledger in self.entries:
                if ticket.finished:
                    continue
                ok = succeeded and status is not None and ticket.commit_on(status)
                await run_async(finish(ticket, succeeded=ok), ledger)


def exchange_of(conn: HTTPConnection | Scope) -> Exchange:
    """The request's :class:`Exchange`; ConfigurationError when no MeteredMiddleware runs."""
    scope = conn.scope if isinstance(conn, HTTPConnection) else conn
    exchange: Exchange | None = scope.get(EXCHANGE_KEY)
    if exchange is None:
        raise ConfigurationError(
            "metered decorators and dependencies need the app to be configured with"
            " Metered(app, ledger=..., subject=...) or Middleware(MeteredMiddleware, ...)"
        )
    return exchange


def current_ticket(conn: HTTPConnection, feature: str | None = None) -> Ticket | None:
    """The request's ticket for ``feature`` (the first one when None), or None if unmetered."""
    exchange: Exchange | None = conn.scope.get(EXCHANGE_KEY)
    return exchange.ticket(feature) if exchange is not None else None


def settle(conn: HTTPConnection, units: int, *, feature: str | None = None) -> None:
    """Charge ``units`` instead of the reserved amount if the request succeeds.

    Fewer units give the rest back (e.g. tokens counted after the work). Raises
    ConfigurationError when the request holds no ticket (for ``feature``).
    """
    ticket = current_ticket(conn, feature)
    if ticket is None:
        raise ConfigurationError(
            "settle(): this request holds no metered ticket"
            + (f" for {feature!r}" if feature else "")
        )
    ticket.settle(units)


async def check_entitlement(
    request: Request, feature: str, *, subject: Any = UNSET
) -> CheckResult | None:
    """Deny (401/403/503) unless the request's subject may use ``feature``.

    Returns the check result, or None when skipped: the request already holds a ticket for
    ``feature`` (its reservation proved the entitlement) or the ledger is down and the policy
    fails open.
    """
    exchange = exchange_of(request)
    if feature in exchange.entitled:
        return None
    metered = exchange.metered
    if subject is UNSET:
        subject = await metered.subject_of(request)
    result: CheckResult | None = await run_async(
        admit_entitlement(metered.policy, subject, feature), metered.ledger
    )
    exchange.entitled.add(feature)
    return result


async def reserve_units(
    request: Request,
    units: int | UnitsFn,
    *,
    feature: str | None = None,
    key: KeyFn | None = None,
    commit_on: Callable[[int], bool] | None = None,
    ttl: float | None = None,
    subject: Any = UNSET,
) -> Ticket:
    """Reserve ``units`` for the request (401/402/403/409/422/503 raised as :class:`Denial`).

    The ticket joins the request's exchange, which the middleware settles after the response.
    When the request already holds a ticket for the same feature (a middleware rule, an outer
    decorator), that ticket is returned and nothing more is reserved: charged once.
    """
    exchange = exchange_of(request)
    metered = exchange.metered
    feature = metered.resolve_feature(feature)
    existing = exchange.ticket(feature) if feature is not None else None
    if existing is not None:
        return existing
    if subject is UNSET:
        subject = await metered.subject_of(request)
    amount = check_units(await _maybe_await(units(request))) if callable(units) else units
    idem = await metered.key_of(request, key)
    if idem is not None and exchange.key_in_use(idem):
        idem = f"{idem}:{feature}"  # another feature of the same request already uses it
    ticket: Ticket = await run_async(
        admit_units(
            metered.policy, subject, amount, feature=feature, key=idem, commit_on=commit_on, ttl=ttl
        ),
        metered.ledger,
    )
    exchange.add(ticket, metered.ledger)
    return ticket


# --------------------------------------------------------------------------- middleware


class _Watch:
    """Wraps ``send``/``receive`` of one request and settles its exchange at the right time."""

    __slots__ = (
        "_receive",
        "_send",
        "completed",
        "disconnected",
        "exchange",
        "started",
        "status",
        "trailers",
    )

    def __init__(self, exchange: Exchange, receive: Receive, send: Send) -> None:
        self.exchange = exchange
        self._receive = receive
        self._send = send
        self.status: int | None = None
        self.started = False
        self.trailers = False
        self.completed = False
        self.disconnected = False

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.disconnect" and not self.completed:
            self.disconnected = True
        return message

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.started = True
            self.status = message["status"]
            self.trailers = bool(message.get("trailers", False))
            header = self.exchange.remaining_header(message["status"])
            if header is not None:
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await self._send(message)
            return
        if kind == "http.response.body":
            terminal = not message.get("more_body", False) and not self.trailers
        elif kind == "http.response.trailers":
            terminal = not message.get("more_trailers", False)
        else:
            terminal = kind == "http.response.pathsend"
        await self._send(message)  # OSError / ClientDisconnect propagate: the app releases
        if terminal and not self.completed:
            self.completed = True
            await self.exchange.finish(succeeded=not self.disconnected, status=self.status)


class MeteredMiddleware:
    """Pure ASGI middleware metering a Starlette/FastAPI app (see the module docstring).

    Takes the same keyword arguments as :class:`Metered` (``ledger`` is required), or a
    ready-made ``metered=Metered(...)`` instead of them.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        ledger: AsyncLedger | None = None,
        subject: SubjectFn | None = None,
        rules: Sequence[Rule] = (),
        fail_open: FeatureSwitch = False,
        commit_on: Callable[[int], bool] = default_commit_on,
        remaining_header: str | None = DEFAULT_REMAINING_HEADER,
        idempotency_header: str = DEFAULT_IDEMPOTENCY_HEADER,
        reservation_ttl: float | timedelta | None = None,
        shadow: FeatureSwitch = False,
        on_event: EventHook | None = None,
        metered: Metered | None = None,
    ) -> None:
        if metered is None:
            if ledger is None:
                raise ConfigurationError("MeteredMiddleware needs ledger= (or metered=)")
            metered = Metered(
                ledger=ledger,
                subject=subject,
                rules=rules,
                fail_open=fail_open,
                commit_on=commit_on,
                remaining_header=remaining_header,
                idempotency_header=idempotency_header,
                reservation_ttl=reservation_ttl,
                shadow=shadow,
                on_event=on_event,
            )
        elif ledger is not None or subject is not None or rules:
            raise ConfigurationError("pass either metered= or the options, not both")
        self.app = app
        self.metered = metered

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        root = scope.get("root_path", "")
        route_path = path[len(root) :] if root and path.startswith(root) else path
        if is_exempt(route_path) or is_exempt(path):
            await self.app(scope, receive, send)
            return
        rule = (
            first_match(self.metered.rules, scope["method"], route_path)
            if self.metered.rules
            else None
        )
        outer: Exchange | None = scope.get(EXCHANGE_KEY)
        if outer is not None:
            # Nested under another MeteredMiddleware: it owns the watch; we only add our rule.
            if rule is not None:
                await self._admit_rule(rule, scope, receive, outer)
            await self.app(scope, receive, send)
            return

        exchange = scope[EXCHANGE_KEY] = Exchange(self.metered, scope)
        if rule is not None:
            try:
                await self._admit_rule(rule, scope, receive, exchange)
            except Denial as denial:
                await exchange.finish(succeeded=False, status=denial.status)
                await _send_problem(send, denial)
                return
        watch = _Watch(exchange, receive, send)
        try:
            await self.app(scope, watch.receive, watch.send)
        except Denial as denial:
            await exchange.finish(succeeded=False, status=watch.status)
            if watch.started:
                raise
            await _send_problem(send, denial)
            return
        except BaseException:
            await exchange.finish(succeeded=False, status=watch.status)
            raise
        if not watch.completed:
            await exchange.finish(succeeded=False, status=watch.status)

    async def _admit_rule(
        self, rule: Rule, scope: Scope, receive: Receive, exchange: Exchange
    ) -> None:
        metered = self.metered
        request = Request(scope, receive)
        subject = await metered.subject_of(request)
        if rule.requires is not None and rule.requires not in exchange.entitled:
            await run_async(
                admit_entitlement(metered.policy, subject, rule.requires), metered.ledger
            )
            exchange.entitled.add(rule.requires)
        units = rule.units_for(request)
        if units == 0:
            return
        feature = metered.resolve_feature(rule.feature)
        if feature is not None and exchange.ticket(feature) is not None:
            return
        key = await metered.key_of(request, rule.key)
        if key is not None and exchange.key_in_use(key):
            key = f"{key}:{feature}"
        ticket = await run_async(
            admit_units(
                metered.policy, subject, units, feature=feature, key=key, commit_on=rule.commit_on
            ),
            metered.ledger,
        )
        exchange.add(ticket, metered.ledger)


async def _send_problem(send: Send, denial: Denial) -> None:
    body = problem_body(denial)
    await send(
        {
            "type": "http.response.start",
            "status": denial.status,
            "headers": [
                (b"content-type", PROBLEM_CONTENT_TYPE.encode()),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})
