"""The request policy every adapter shares, independent of any web framework.

One metered request goes through three steps::

    admit (entitlement check and/or reserve)  ->  handler  ->  finish (commit or release)

The steps are generators that yield :class:`Call` objects (``ledger.<method>(*args)``) and
receive the result: :func:`run_sync` executes them on a :class:`metered.Ledger`,
:func:`run_async` on a :class:`metered.AsyncLedger`. The adapters (Flask, WSGI, ASGI,
Starlette, FastAPI) only translate between their framework and these steps; the rules
(status codes, problem bodies, fail-open, commit policy, logging) live here once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

from metered.errors import (
    IdempotencyKeyMismatch,
    InvalidKey,
    LedgerUnavailable,
    MeteredError,
    OperationInProgress,
    ReservationError,
)
from metered.results import Reservation

logger = logging.getLogger("metered")

PROBLEM_CONTENT_TYPE = "application/problem+json"
PROBLEM_BASE = "urn:metered:problem:"
DEFAULT_REMAINING_HEADER = "Metered-Remaining"
DEFAULT_IDEMPOTENCY_HEADER = "Idempotency-Key"


def default_commit_on(status: int) -> bool:
    """Charge only responses below 400."""
    return status < 400


# --------------------------------------------------------------------------- denials


class Denial(MeteredError):
    """A request the policy refuses; renders as an RFC 9457 problem (``problem()``)."""

    status: int = 400
    slug: str = "denied"
    title: str = "Request denied"

    def __init__(self, detail: str, **fields: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.fields = {k: v for k, v in fields.items() if v is not None}

    @property
    def type(self) -> str:
        return PROBLEM_BASE + self.slug

    def problem(self) -> dict[str, Any]:
        """The problem+json body."""
        return {
            "type": self.type,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            **self.fields,
        }


class SubjectRequired(Denial):
    status, slug, title = 401, "subject-required", "Authentication required"


class EntitlementRequired(Denial):
    """The subject's plan lacks the feature (``no-entitlement``) or its subscription is inactive."""

    status, slug, title = 403, "no-entitlement", "Feature not included in your plan"


class SubscriptionInactive(EntitlementRequired):
    slug, title = "subscription-inactive", "Subscription inactive"


class PaymentRequired(Denial):
    """Not enough units left for the request."""

    status, slug, title = 402, "quota-exhausted", "Usage quota exhausted"


class InsufficientUnits(PaymentRequired):
    slug, title = "insufficient-units", "Not enough units left"


class RequestInProgress(Denial):
    status, slug, title = 409, "operation-in-progress", "Request with this key still in progress"


class IdempotencyKeyReused(Denial):
    status, slug, title = 422, "idempotency-key-reused", "Idempotency key reused"


class InvalidIdempotencyKey(Denial):
    status, slug, title = 400, "invalid-idempotency-key", "Invalid idempotency key"


class ServiceUnavailable(Denial):
    status, slug, title = 503, "ledger-unavailable", "Metering temporarily unavailable"


DENIALS: tuple[type[Denial], ...] = (
    SubjectRequired,
    EntitlementRequired,
    SubscriptionInactive,
    PaymentRequired,
    InsufficientUnits,
    RequestInProgress,
    IdempotencyKeyReused,
    InvalidIdempotencyKey,
    ServiceUnavailable,
)

_BY_REASON: dict[str | None, type[Denial]] = {
    "no_entitlement": EntitlementRequired,
    "not_metered": EntitlementRequired,
    "subscription_inactive": SubscriptionInactive,
    "quota_exhausted": PaymentRequired,
    "insufficient_units": InsufficientUnits,
}


def denial_for(reason: str | None, feature: str, **fields: Any) -> Denial:
    """The denial for a ledger ``reason``."""
    cls = _BY_REASON.get(reason, EntitlementRequired)
    details = {
        EntitlementRequired: f"Your plan does not include {feature!r}.",
        SubscriptionInactive: f"Your subscription is not active, so {feature!r} is unavailable.",
        PaymentRequired: f"No {feature!r} units left in this billing period.",
        InsufficientUnits: f"Not enough {feature!r} units left for this request.",
    }
    return cls(details[cls], feature=feature, reason=reason, **fields)


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Policy:
    """App-wide settings of an adapter (Flask ``METERED_*`` keys map onto these)."""

    fail_open: bool = False
    """When the ledger is unreachable: False answers 503, True lets the request through
    uncharged (and logs ``metered.fail_open``)."""
    commit_on: Callable[[int], bool] = default_commit_on
    remaining_header: str | None = DEFAULT_REMAINING_HEADER
    idempotency_header: str = DEFAULT_IDEMPOTENCY_HEADER
    reservation_ttl: float | None = None
    """Seconds a reservation lives if the worker dies; None uses the ledger's default."""


@dataclass
class Ticket:
    """What admission decided for one request; the handler may :meth:`settle` it."""

    subject: str
    feature: str
    units: int
    reservation: Reservation | None
    """None when the ledger was unreachable and the policy fails open."""
    commit_on: Callable[[int], bool]
    usage_remaining: int | None = None
    final_units: int | None = None
    finished: bool = field(default=False, repr=False)

    @property
    def replayed(self) -> bool:
        """The idempotency key already committed: the work is not charged again."""
        return self.reservation is not None and self.reservation.replayed

    def settle(self, units: int) -> None:
        """Charge ``units`` instead of the reserved amount when the request succeeds.

        Fewer units give the rest back; more succeed only if the balance (or overage)
        allows it at commit time.
        """
        from metered.validation import units as check_units

        self.final_units = check_units(units, allow_zero=True)

    def remaining_header_value(self) -> str | None:
        if self.usage_remaining is None:
            return None
        remaining = self.usage_remaining
        if self.final_units is not None and not self.replayed:
            remaining = max(0, remaining + self.units - self.final_units)  # what settle() returns
        return str(remaining)


@dataclass(frozen=True, slots=True)
class Call:
    """``ledger.<method>(*args, **kwargs)``, to be run by a sync or async runner."""

    method: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


Step = Generator[Call, Any, Any]


# --------------------------------------------------------------------------- steps


def _unavailable(policy: Policy, exc: LedgerUnavailable, **context: Any) -> None:
    """Raise 503, or log and return when the policy fails open."""
    if policy.fail_open:
        logger.warning("metered.fail_open", extra={"metered": {**context, "error": str(exc)}})
        return
    logger.error("metered.unavailable", extra={"metered": {**context, "error": str(exc)}})
    raise ServiceUnavailable("The usage ledger is unreachable; try again shortly.") from exc


def _deny(denial: Denial, subject: str | None) -> Denial:
    logger.info(
        "metered.denied",
        extra={"metered": {"subject": subject, "status": denial.status, **denial.fields}},
    )
    return denial


def require_subject(subject: str | None) -> str:
    if subject is None or subject == "":
        raise _deny(SubjectRequired("This endpoint needs an identified subject."), None)
    return subject


def admit_entitlement(policy: Policy, subject: str | None, feature: str) -> Step:
    """Deny unless ``subject`` may use ``feature`` (401 no subject, 403 not entitled)."""
    subject = require_subject(subject)
    try:
        result = yield Call("check", (subject, feature))
    except LedgerUnavailable as exc:
        _unavailable(policy, exc, subject=subject, feature=feature)
        return None
    if result.reason in ("no_entitlement", "subscription_inactive"):
        raise _deny(denial_for(result.reason, feature), subject)
    return result


def admit_units(
    policy: Policy,
    subject: str | None,
    units: int,
    *,
    feature: str | None,
    key: str | None,
    commit_on: Callable[[int], bool] | None = None,
    ttl: float | None = None,
) -> Step:
    """Reserve ``units`` for the request; 402 when the balance cannot cover them."""
    subject = require_subject(subject)
    ttl = ttl if ttl is not None else policy.reservation_ttl
    try:
        reservation = yield Call(
            "reserve", (subject, units), {"feature": feature, "key": key, "ttl": ttl}
        )
    except LedgerUnavailable as exc:
        _unavailable(policy, exc, subject=subject, feature=feature, units=units)
        return Ticket(subject, feature or "", units, None, commit_on or policy.commit_on)
    except OperationInProgress as exc:
        raise _deny(
            RequestInProgress(
                "A request with this idempotency key is still being processed.", key=key
            ),
            subject,
        ) from exc
    except IdempotencyKeyMismatch as exc:
        raise _deny(IdempotencyKeyReused(str(exc), key=key), subject) from exc
    except InvalidKey as exc:
        raise _deny(InvalidIdempotencyKey(str(exc)), subject) from exc
    if not reservation.ok:
        raise _deny(
            denial_for(
                reservation.reason,
                reservation.feature,
                usage_remaining=reservation.usage_remaining,
                units_requested=units,
            ),
            subject,
        )
    return Ticket(
        subject,
        reservation.feature,
        units,
        reservation,
        commit_on or policy.commit_on,
        usage_remaining=reservation.usage_remaining,
    )


def finish(ticket: Ticket, *, succeeded: bool) -> Step:
    """Commit the ticket if the request succeeded, else release it. Never raises.

    The response is already on its way, so ledger trouble here is logged, not raised: an
    unreleased reservation expires after its TTL and never charges.
    """
    if ticket.finished or ticket.reservation is None:
        return None
    ticket.finished = True
    context = {"subject": ticket.subject, "feature": ticket.feature, "units": ticket.units}
    try:
        if succeeded:
            result = yield Call("commit", (ticket.reservation, ticket.final_units))
            if not result.ok:
                logger.warning("metered.commit_refused", extra={"metered": context})
                yield Call("release", (ticket.reservation,))
                return None
            logger.info(
                "metered.committed",
                extra={"metered": {**context, "charged": result.consumed}},
            )
            return result
        yield Call("release", (ticket.reservation,))
        logger.info("metered.released", extra={"metered": context})
    except (LedgerUnavailable, ReservationError) as exc:
        logger.error("metered.settle_failed", extra={"metered": {**context, "error": str(exc)}})
    return None


# --------------------------------------------------------------------------- runners


def run_sync(step: Step, ledger: Any) -> Any:
    """Run a policy step on a blocking :class:`metered.Ledger`."""
    try:
        call = next(step)
        while True:
            try:
                result = getattr(ledger, call.method)(*call.args, **call.kwargs)
            except MeteredError as exc:
                call = step.throw(exc)
            else:
                call = step.send(result)
    except StopIteration as done:
        return done.value


async def run_async(step: Step, ledger: Any) -> Any:
    """Run a policy step on a :class:`metered.AsyncLedger`."""
    try:
        call = next(step)
        while True:
            try:
                result = await getattr(ledger, call.method)(*call.args, **call.kwargs)
            except MeteredError as exc:
                call = step.throw(exc)
            else:
                call = step.send(result)
    except StopIteration as done:
        return done.value
