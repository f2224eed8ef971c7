"""FastAPI adapter: decorators for path operations, dependencies, and documented responses.

Configure once, then meter with a decorator or a dependency::

    from fastapi import Depends, FastAPI, Request
    from metered.integrations.fastapi import (
        Consumes, Metered, RequiresEntitlement, consumes, metered_responses, settle,
    )

    app = FastAPI()
    Metered(app, ledger=AsyncLedger(url, plans=plans),
            subject=lambda request: request.headers.get("x-api-key"))

    @app.post("/generate", responses=metered_responses())
    @consumes(10, feature="api_calls")
    async def generate(prompt: str, request: Request) -> dict[str, str]:
        settle(request, 7)                       # optional: charge 7 instead of 10
        return {"text": "..."}

    reports = RequiresEntitlement("reports")
    calls = Consumes(5, feature="api_calls")

    @app.get("/report", dependencies=[Depends(reports), Depends(calls)],
             responses={**reports.responses, **calls.responses})
    async def report() -> dict[str, str]: ...

**Decorators** (:func:`consumes`, :func:`requires_entitlement`) keep the endpoint's signature
(``__signature__``) so FastAPI still injects its parameters; when the endpoint has no
``Request`` parameter they add a keyword-only one (``_metered_request``, not part of the
OpenAPI schema) and drop it before calling the endpoint. Sync endpoints stay sync.

**Dependencies** (:class:`Consumes`, :class:`RequiresEntitlement`) run before the endpoint;
``Depends(Consumes(...))`` returns the :class:`Ticket` (``ticket.settle(n)``). They do *not*
settle in post-``yield`` code: FastAPI (0.118+) runs that after the response was sent and
without its status, so the :class:`MeteredMiddleware` that :class:`Metered` installs does it
from the ``send`` stream: commit only after the last body chunk of a response whose status
passes the commit policy; release on exceptions, error statuses and disconnects.

**OpenAPI**: FastAPI cannot learn responses from dependencies or decorators, so spread
``dep.responses`` or :func:`metered_responses` into the route's ``responses=``; each documents
an ``application/problem+json`` body (:class:`Problem`).

**Subject from a FastAPI dependency**: ``Consumes(5, subject=Depends(current_user_id))`` and
``RequiresEntitlement("reports", subject=Depends(current_user_id))`` take the subject from your
auth dependency instead of the app's ``subject=`` callable. For the decorators, let the auth
dependency store it (``request.state.user_id = ...``, e.g. as an app-level dependency) and
configure ``subject=lambda request: getattr(request.state, "user_id", None)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

from pydantic import BaseModel, Field
from starlette.requests import Request

from metered.integrations._policy import (
    PROBLEM_BASE,
    PROBLEM_CONTENT_TYPE,
    Denial,
    EntitlementRequired,
    IdempotencyKeyReused,
    InsufficientUnits,
    InvalidIdempotencyKey,
    PaymentRequired,
    RequestInProgress,
    ServiceUnavailable,
    SubjectRequired,
    SubscriptionInactive,
    Ticket,
)
from metered.integrations._rules import Rule, describe_key, describe_units, exempt_path
from metered.integrations.asgi import (
    UNSET,
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
from metered.integrations.starlette import _consumes_decorator, _entitlement_decorator
from metered.results import CheckResult
from metered.validation import feature as check_feature
from metered.validation import units as check_units

__all__ = [
    "Consumes",
    "Denial",
    "EntitlementRequired",
    "IdempotencyKeyReused",
    "InsufficientUnits",
    "InvalidIdempotencyKey",
    "Metered",
    "MeteredMiddleware",
    "PaymentRequired",
    "Problem",
    "RequestInProgress",
    "RequiresEntitlement",
    "Rule",
    "ServiceUnavailable",
    "SubjectRequired",
    "SubscriptionInactive",
    "Ticket",
    "consumes",
    "current_ticket",
    "exempt_path",
    "handle_denial",
    "metered_responses",
    "problem_response",
    "requires_entitlement",
    "settle",
]

F = TypeVar("F", bound=Callable[..., Any])


def consumes(
    units: int | UnitsFn,
    *,
    feature: str | None = None,
    key: KeyFn | None = None,
    commit_on: Callable[[int], bool] | None = None,
    ttl: float | timedelta | None = None,
) -> Callable[[F], F]:
    """Reserve ``units`` before the path operation; commit only if the request succeeds.

    Same arguments as :func:`metered.integrations.starlette.consumes`. Put it *below* the
    ``@app.post(...)`` decorator.
    """
    return _consumes_decorator(units, feature, key, commit_on, ttl, inject=True)


def requires_entitlement(feature: str) -> Callable[[F], F]:
    """Deny with 403 unless the subject's plan includes ``feature`` (401 without a subject)."""
    return _entitlement_decorator(feature, inject=True)


# --------------------------------------------------------------------------- OpenAPI


class Problem(BaseModel):
    """An RFC 9457 problem, as metered answers it (``application/problem+json``)."""

    type: str = Field(examples=[PROBLEM_BASE + "quota-exhausted"])
    title: str
    status: int
    detail: str
    feature: str | None = None
    reason: str | None = Field(default=None, description="The ledger's machine-readable reason.")
    usage_remaining: int | None = Field(default=None, description="Units left (402).")
    units_requested: int | None = Field(default=None, description="Units the request asked.")
    key: str | None = Field(default=None, description="The idempotency key (409).")


_DESCRIPTIONS = {
    400: "The idempotency key is invalid",
    401: "No subject could be resolved for the request",
    402: "Not enough units left for the request",
    403: "The subject's plan lacks the feature, or its subscription is inactive",
    409: "A request with the same idempotency key is still in progress",
    422: "The idempotency key was used for a different operation",
    503: "The usage ledger is unreachable (fail closed)",
}
_EXAMPLES = {
    401: SubjectRequired("This endpoint needs an identified subject."),
    402: PaymentRequired(
        "No 'api_calls' units left in this billing period.",
        feature="api_calls",
        reason="quota_exhausted",
        usage_remaining=0,
        units_requested=1,
    ),
    403: EntitlementRequired(
        "Your plan does not include 'reports'.", feature="reports", reason="no_entitlement"
    ),
    409: RequestInProgress(
        "A request with this idempotency key is still being processed.", key="req-1"
    ),
    503: ServiceUnavailable("The usage ledger is unreachable; try again shortly."),
}


def metered_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries for metered denials (default 401, 402, 403, 409, 503).

    Each documents an ``application/problem+json`` body with the :class:`Problem` schema.
    (422 and 400 are left out by default: FastAPI documents its own 422 for validation.)
    """
    schema = Problem.model_json_schema()
    responses: dict[int | str, dict[str, Any]] = {}
    for status in statuses or (401, 402, 403, 409, 503):
        if status not in _DESCRIPTIONS:
            raise ValueError(f"metered never answers {status}")
        media: dict[str, Any] = {"schema": schema}
        if status in _EXAMPLES:
            media["example"] = _EXAMPLES[status].problem()
        responses[status] = {
            "description": _DESCRIPTIONS[status],
            "content": {PROBLEM_CONTENT_TYPE: media},
        }
    return responses


# --------------------------------------------------------------------------- dependencies


def _dependency_signature(subject: Any, returns: Any) -> inspect.Signature:
    params = [inspect.Parameter("request", inspect.Parameter.KEYWORD_ONLY, annotation=Request)]
    if subject is not None:
        params.append(
            inspect.Parameter(
                "subject", inspect.Parameter.KEYWORD_ONLY, default=subject, annotation=Any
            )
        )
    return inspect.Signature(params, return_annotation=returns)


class RequiresEntitlement:
    """Dependency: 403 unless the subject's plan includes ``feature`` (401 without a subject).

    ``Depends(RequiresEntitlement("reports"))`` returns the :class:`~metered.CheckResult`
    (None when skipped: already proved by a reservation of the same request, or fail-open).

    :param subject: a ``Depends(...)`` resolving the subject (default: the app's callable).
    """

    __signature__: inspect.Signature

    def __init__(self, feature: str, *, subject: Any = None) -> None:
        self.feature = check_feature(feature)
        self.responses = metered_responses(401, 403, 503)
        """Spread into the route: ``responses={**dep.responses}``."""
        self.__signature__ = _dependency_signature(subject, CheckResult | None)
        self.__metered_info__ = {"kind": "requires_entitlement", "feature": self.feature}

    async def __call__(self, *, request: Request, subject: Any = UNSET) -> CheckResult | None:
        return await check_entitlement(request, self.feature, subject=subject)

    def __repr__(self) -> str:
        return f"RequiresEntitlement({self.feature!r})"


class Consumes:
    """Dependency: reserve ``units`` before the path operation; commit only on success.

    ``Depends(Consumes(5, feature="api_calls"))`` returns the request's :class:`Ticket`
    (``ticket.settle(n)`` charges ``n`` instead). The :class:`MeteredMiddleware` installed by
    :class:`Metered` commits it after the last body chunk was sent with a passing status, and
    releases it otherwise. Arguments as :func:`consumes`, plus ``subject=Depends(...)``.
    """

    __signature__: inspect.Signature

    def __init__(
        self,
        units: int | UnitsFn,
        *,
        feature: str | None = None,
        key: KeyFn | None = None,
        commit_on: Callable[[int], bool] | None = None,
        ttl: float | timedelta | None = None,
        subject: Any = None,
    ) -> None:
        if not callable(units):
            check_units(units)
        if key is not None and not callable(key):
            raise TypeError("key= must be a callable of the request (default: Idempotency-Key)")
        self.units = units
        self.feature = check_feature(feature) if feature is not None else None
        self.key = key
        self.commit_on = commit_on
        self.ttl = ttl.total_seconds() if isinstance(ttl, timedelta) else ttl
        self.responses = metered_responses(401, 402, 403, 409, 503)
        """Spread into the route: ``responses={**dep.responses}``."""
        self.__signature__ = _dependency_signature(subject, Ticket)
        self.__metered_info__ = {
            "kind": "consumes",
            "feature": self.feature,
            "units": describe_units(units),
            "key": describe_key(key),
        }

    async def __call__(self, *, request: Request, subject: Any = UNSET) -> Ticket:
        return await reserve_units(
            request,
            self.units,
            feature=self.feature,
            key=self.key,
            commit_on=self.commit_on,
            ttl=self.ttl,
            subject=subject,
        )

    def __repr__(self) -> str:
        return f"Consumes({self.units!r}, feature={self.feature!r})"
