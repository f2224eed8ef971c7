"""Starlette adapter: ``@consumes``/``@requires_entitlement`` for endpoints, and the middleware.

::

    from starlette.applications import Starlette
    from metered.integrations.starlette import Metered, consumes, requires_entitlement, settle

    @requires_entitlement("reports")            # 401 no subject, 403 not in the plan
    @consumes(5, feature="api_calls")           # 402 when fewer than 5 units are left
    async def report(request):
        ...
        settle(request, 3)                      # optional: charge 3 instead of 5
        return JSONResponse({...})

    app = Starlette(routes=[Route("/report", report, methods=["POST"])])
    Metered(app, ledger=AsyncLedger(url, plans=plans),
            subject=lambda request: request.headers.get("x-api-key"))

The decorators work on endpoint functions (``async def`` or plain ``def``, which Starlette runs
in its thread pool) and on :class:`~starlette.endpoints.HTTPEndpoint` methods; they keep the
signature and the coroutine-ness of the function. They reserve before the endpoint runs and
hand the ticket to :class:`MeteredMiddleware`, which commits after the last body chunk was
sent with a status that passes the commit policy, and releases otherwise (exception, 4xx/5xx,
client disconnect mid-stream). So a ``StreamingResponse`` is charged only when fully sent, and
a route also covered by a middleware :class:`Rule` for the same feature is charged once. The
app must therefore be configured with :class:`Metered` or :class:`MeteredMiddleware` (see
:mod:`metered.integrations.asgi` for the subject recipes); without it the decorators raise
:class:`~metered.ConfigurationError`.

Denials are raised as the :class:`Denial` exceptions below and rendered as
``application/problem+json`` (register your own Starlette exception handler for a class, e.g.
``PaymentRequired``, to render it differently). ``units`` and ``key`` may be callables of the
request, plain or async; ``key`` defaults to the ``Idempotency-Key`` header. A key that already
committed is not charged again (``request.state.metered.replayed``); one still in flight: 409.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Coroutine
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar, cast

import anyio.from_thread
from starlette.requests import Request

from metered.integrations._policy import (
    DENIALS,
    Denial,
    EntitlementRequired,
    IdempotencyKeyReused,
    InsufficientUnits,
    InvalidIdempotencyKey,
    PaymentRequired,
    Policy,
    RequestInProgress,
    ServiceUnavailable,
    SubjectRequired,
    SubscriptionInactive,
    Ticket,
)
from metered.integrations._rules import Rule, annotate, describe_key, describe_units, exempt_path
from metered.integrations.asgi import (
    STATE_KEY,
    KeyFn,
    Metered,
    MeteredMiddleware,
    UnitsFn,
    check_entitlement,
    current_ticket,
    handle_denial,
    problem_response,
    reserve_units,
    settle,
)
from metered.validation import feature as check_feature
from metered.validation import units as check_units

__all__ = [
    "DENIALS",
    "STATE_KEY",
    "Denial",
    "EntitlementRequired",
    "IdempotencyKeyReused",
    "InsufficientUnits",
    "InvalidIdempotencyKey",
    "Metered",
    "MeteredMiddleware",
    "PaymentRequired",
    "Policy",
    "RequestInProgress",
    "Rule",
    "ServiceUnavailable",
    "SubjectRequired",
    "SubscriptionInactive",
    "Ticket",
    "consumes",
    "current_ticket",
    "exempt_path",
    "handle_denial",
    "problem_response",
    "requires_entitlement",
    "settle",
    "stripe_webhook_route",
]

F = TypeVar("F", bound=Callable[..., Any])
Admit = Callable[[Request], Coroutine[Any, Any, object]]

INJECTED_REQUEST = "_metered_request"
"""Name of the keyword-only ``Request`` parameter the FastAPI decorators add when needed."""


def consumes(
    units: int | UnitsFn,
    *,
    feature: str | None = None,
    key: KeyFn | None = None,
    commit_on: Callable[[int], bool] | None = None,
    ttl: float | timedelta | None = None,
) -> Callable[[F], F]:
    """Reserve ``units`` of ``feature`` before the endpoint; commit only if the request succeeds.

    :param units: an int, or ``units(request) -> int`` (plain or async).
    :param feature: the metered feature; None means the plans' only metered feature.
    :param key: ``key(request) -> str | None``; default: the ``Idempotency-Key`` header.
    :param commit_on: ``commit_on(status) -> bool`` for this route (default: the app's).
    :param ttl: reservation lifetime in seconds if the worker dies (default: the app's).
    """
    return _consumes_decorator(units, feature, key, commit_on, ttl, inject=False)


def requires_entitlement(feature: str) -> Callable[[F], F]:
    """Deny with 403 unless the subject's plan includes ``feature`` (401 without a subject)."""
    return _entitlement_decorator(feature, inject=False)


# --------------------------------------------------------------------------- shared machinery
# (also used by metered.integrations.fastapi, with inject=True)


def _consumes_decorator(
    units: int | UnitsFn,
    feature: str | None,
    key: KeyFn | None,
    commit_on: Callable[[int], bool] | None,
    ttl: float | timedelta | None,
    *,
    inject: bool,
) -> Callable[[F], F]:
    if not callable(units):
        check_units(units)
    if feature is not None:
        check_feature(feature)
    if key is not None and not callable(key):
        raise TypeError("key= must be a callable of the request (default: Idempotency-Key)")
    seconds = ttl.total_seconds() if isinstance(ttl, timedelta) else ttl

    async def admit(request: Request) -> object:
        return await reserve_units(
            request, units, feature=feature, key=key, commit_on=commit_on, ttl=seconds
        )

    info = {
        "kind": "consumes",
        "feature": feature,
        "units": describe_units(units),
        "key": describe_key(key),
    }
    return functools.partial(_decorate, admit=admit, inject=inject, info=info)


def _entitlement_decorator(feature: str, *, inject: bool) -> Callable[[F], F]:
    check_feature(feature)

    async def admit(request: Request) -> object:
        return await check_entitlement(request, feature)

    info = {"kind": "requires_entitlement", "feature": feature}
    return functools.partial(_decorate, admit=admit, inject=inject, info=info)


def _decorate(func: F, *, admit: Admit, inject: bool, info: dict[str, Any]) -> F:
    """Wrap ``func`` so ``admit(request)`` runs first; same signature and coroutine-ness."""
    if inspect.isasyncgenfunction(func) or inspect.isgeneratorfunction(func):
        raise TypeError(
            f"metered decorators cannot wrap the generator {func.__qualname__}: admission must"
            " happen before the response starts. Return a StreamingResponse from a plain"
            " function, or use a dependency (fastapi: Depends(Consumes(...)))."
        )
    name, injected, signature = _request_parameter(func) if inject else (None, False, None)

    def find(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Request:
        if name is not None:
            found = kwargs.pop(name, None) if injected else kwargs.get(name)
            if isinstance(found, Request):
                return found
        for value in (*args, *kwargs.values()):
            if isinstance(value, Request):
                return value
        raise TypeError(f"{func.__qualname__} was called without a Request argument")

    if inspect.iscoroutinefunction(func):

        @functools.wraps(func)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            await admit(find(args, kwargs))
            return await func(*args, **kwargs)

    else:

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            # Starlette and FastAPI run plain endpoints on AnyIO worker threads: admission
            # runs on the event loop while this thread waits.
            anyio.from_thread.run(admit, find(args, kwargs))
            return func(*args, **kwargs)

    if signature is not None:
        wrapper.__signature__ = signature  # type: ignore[attr-defined]
    annotate(wrapper, func, **info)
    return cast(F, wrapper)


def _request_parameter(func: Callable[..., Any]) -> tuple[str, bool, inspect.Signature | None]:
    """The name of ``func``'s ``Request`` parameter, whether we add it, and the new signature."""
    try:
        signature = inspect.signature(func, eval_str=True)
    except (NameError, TypeError):  # forward references FastAPI resolves later
        signature = inspect.signature(func)
    params = list(signature.parameters.values())
    for param in params:
        annotation = param.annotation
        if isinstance(annotation, str):
            if annotation.rpartition(".")[2] == "Request":
                return param.name, False, None
        elif isinstance(annotation, type) and issubclass(annotation, Request):
            return param.name, False, None
    added = inspect.Parameter(INJECTED_REQUEST, inspect.Parameter.KEYWORD_ONLY, annotation=Request)
    position = len(params)
    if params and params[-1].kind is inspect.Parameter.VAR_KEYWORD:
        position -= 1
    params.insert(position, added)
    return INJECTED_REQUEST, True, signature.replace(parameters=params)


if TYPE_CHECKING:
    from metered.integrations._stripe_starlette import stripe_webhook_route


def __getattr__(attr: str) -> Any:
    # The Stripe webhook endpoint needs the ``stripe`` extra; import it only when asked for,
    # so the adapter works without it.
    if attr == "stripe_webhook_route":
        from metered.integrations._stripe_starlette import stripe_webhook_route

        return stripe_webhook_route
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
