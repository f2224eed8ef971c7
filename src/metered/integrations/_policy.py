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
from collections.abc import Callable, Collection, Generator, Mapping
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
    """No subject could be resolved for the request (401)."""

    status, slug, title = 401, "subject-required", "Authentication required"


class EntitlementRequired(Denial):
    """The subject's plan lacks the feature (``no-entitlement``) or its subscription is inactive."""

    status, slug, title = 403, "no-entitlement", "Feature not included in your plan"


class SubscriptionInactive(EntitlementRequired):
    """The plan includes the feature but the subscription status grants no access (403)."""

    slug, title = "subscription-inactive", "Subscription inactive"


class PaymentRequired(Denial):
    """Not enough units left for the request."""

    status, slug, title = 402, "quota-exhausted", "Usage quota exhausted"


class InsufficientUnits(PaymentRequired):
    """Some units are left, but fewer than the request needs (402)."""

    slug, title = "insufficient-units", "Not enough units left"


class RequestInProgress(Denial):
    """A request with the same idempotency key is still in flight (409)."""

    status, slug, title = 409, "operation-in-progress", "Request with this key still in progress"


class IdempotencyKeyReused(Denial):
    """The idempotency key was already used for a different request (422)."""

    status, slug, title = 422, "idempotency-key-reused", "Idempotency key reused"


class InvalidIdempotencyKey(Denial):
    """The idempotency key is empty, too long or not text (400)."""

    status, slug, title = 400, "invalid-idempotency-key", "Invalid idempotency key"


class ServiceUnavailable(Denial):
    """The ledger is unreachable and the feature fails closed (503)."""

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


FeatureSwitch = bool | Collection[str] | Mapping[str, bool]
"""On or off for every feature (``bool``), on for the named features (a collection), or per
feature with ``"*"`` as the fallback (a mapping)."""

EventHook = Callable[[str, dict[str, Any]], None]
"""Called with every event name (``metered.committed`` ...) and its fields, e.g. for metrics."""


def _switch(value: FeatureSwitch, feature: str | None) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, Mapping):
        return bool(value.get(feature or "", value.get("*", False)))
    return (feature or "") in value


@dataclass(frozen=True)
class Policy:
    """App-wide settings of an adapter (Flask ``METERED_*`` keys map onto these)."""

    fail_open: FeatureSwitch = False
    """When the ledger is unreachable: closed answers 503, open lets the request through
    uncharged (and emits ``metered.fail_open``). Per feature with a mapping or collection."""
    commit_on: Callable[[int], bool] = default_commit_on
    remaining_header: str | None = DEFAULT_REMAINING_HEADER
    idempotency_header: str = DEFAULT_IDEMPOTENCY_HEADER
    reservation_ttl: float | None = None
    """Seconds a reservation lives if the worker dies; None uses the ledger's default."""
    shadow: FeatureSwitch = False
    """Shadow mode: decisions are computed with a read-only check and emitted as
    ``metered.shadow_denied``, but never enforced, and nothing is reserved or charged. This
    is how to switch limits on for an existing API safely."""
    on_event: EventHook | None = None
    """Receives every event the policy logs (name and fields); exceptions in it are logged
    and swallowed, never breaking a request."""

    def fails_open(self, feature: str | None) -> bool:
        return _switch(self.fail_open, feature)

    def shadows(self, feature: str | None) -> bool:
        return _switch(self.shadow, feature)

    def emit(self, level: int, event: str, **fields: Any) -> None:
        """Log ``event`` with its fields (``extra={"metered": fields}``) and call the hook."""
        logger.log(level, event, extra={"metered": fields})
        if self.on_event is not None:
            try:
                self.on_event(event, fields)
            except Exception:
                logger.exception("metered.hook_failed", extra={"metered": {"event": event}})


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
    policy: Policy | None = field(default=None, repr=False)

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
    """Raise 503, or emit ``metered.fail_open`` and return when the feature fails open."""
    if policy.fails_open(context.get("feature")):
        policy.emit(logging.WARNING, "metered.fail_open", **context, error=str(exc))
        return
    policy.emit(logging.ERROR, "metered.unavailable", **context, error=str(exc))
    raise ServiceUnavailable("The usage ledger is unreachable; try again shortly.") from exc


def _deny(policy: Policy, denial: Denial, subject: str | None) -> Denial:
    policy.emit(
        logging.INFO, "metered.denied", subject=subject, status=denial.status, **denial.fields
    )
    return denial


def require_subject(subject: str | None, policy: Policy | None = None) -> str:
    if subject is None or subject == "":
        raise _deny(
            policy or Policy(), SubjectRequired("This endpoint needs an identified subject."), None
        )
    return subject


def _shadow_decision(
    policy: Policy, subject: str | None, feature: str | None, units: int | None
) -> Step:
    """Shadow mode: what would have been denied, emitted but not enforced. Never raises."""
    if not subject:
        policy.emit(
            logging.INFO,
            "metered.shadow_denied",
            subject=None,
            feature=feature,
            status=SubjectRequired.status,
            reason="subject_required",
        )
        return None
    try:
        result = yield Call("check", (subject, feature))
    except MeteredError as exc:
        policy.emit(
            logging.WARNING,
            "metered.shadow_unavailable",
            subject=subject,
            feature=feature,
            error=str(exc),
        )
        return None
    reason = result.reason
    if (
        reason is None
        and units is not None
        and result.usage_remaining is not None
        and not result.overage_allowed
        and result.usage_remaining < units
    ):
        reason = "insufficient_units"
    if reason is not None:
        denial = denial_for(reason, result.feature)
        policy.emit(
            logging.INFO,
            "metered.shadow_denied",
            subject=subject,
            feature=result.feature,
            status=denial.status,
            reason=reason,
            units_requested=units,
            usage_remaining=result.usage_remaining,
        )
    return result


def admit_entitlement(policy: Policy, subject: str | None, feature: str) -> Step:
    """Deny unless ``subject`` may use ``feature`` (401 no subject, 403 not entitled)."""
    if policy.shadows(feature):
        return (yield from _shadow_decision(policy, subject, feature, None))
    subject = require_subject(subject, policy)
    try:
        result = yield Call("check", (subject, feature))
    except LedgerUnavailable as exc:
        _unavailable(policy, exc, subject=subject, feature=feature)
        return None
    if result.reason in ("no_entitlement", "subscription_inactive"):
        raise _deny(policy, denial_for(result.reason, feature), subject)
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
    commit_on = commit_on or policy.commit_on
    if policy.shadows(feature):
        result = yield from _shadow_decision(policy, subject, feature, units)
        remaining = result.usage_remaining if result is not None else None
        return Ticket(
            subject or "", feature or "", units, None, commit_on, remaining, policy=policy
        )
    subject = require_subject(subject, policy)
    ttl = ttl if ttl is not None else policy.reservation_ttl
    try:
        reservation = yield Call(
            "reserve", (subject, units), {"feature": feature, "key": key, "ttl": ttl}
        )
    except LedgerUnavailable as exc:
        _unavailable(policy, exc, subject=subject, feature=feature, units=units)
        return Ticket(subject, feature or "", units, None, commit_on, policy=policy)
    except OperationInProgress as exc:
        raise _deny(
            policy,
            RequestInProgress(
                "A request with this idempotency key is still being processed.", key=key
            ),
            subject,
        ) from exc
    except IdempotencyKeyMismatch as exc:
        raise _deny(policy, IdempotencyKeyReused(str(exc), key=key), subject) from exc
    except InvalidKey as exc:
        raise _deny(policy, InvalidIdempotencyKey(str(exc)), subject) from exc
    if not reservation.ok:
        raise _deny(
            policy,
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
        commit_on,
        usage_remaining=reservation.usage_remaining,
        policy=policy,
    )


def finish(ticket: Ticket, *, succeeded: bool) -> Step:
    """Commit the ticket if the request succeeded, else release it. Never raises.

    The response is already on its way, so ledger trouble here is logged, not raised: an
    unreleased reservation expires after its TTL and never charges.
    """
    if ticket.finished or ticket.reservation is None:
        return None
    ticket.finished = True
    policy = ticket.policy or Policy()
    context = {"subject": ticket.subject, "feature": ticket.feature, "units": ticket.units}
    try:
        if succeeded:
            result = yield Call("commit", (ticket.reservation, ticket.final_units))
            if not result.ok:
                policy.emit(logging.WARNING, "metered.commit_refused", **context)
                yield Call("release", (ticket.reservation,))
                return None
            policy.emit(
                logging.INFO,
                "metered.committed",
                **context,
                charged=result.consumed,
                replayed=result.replayed,
            )
            return result
        yield Call("release", (ticket.reservation,))
        policy.emit(logging.INFO, "metered.released", **context)
    except (LedgerUnavailable, ReservationError) as exc:
        policy.emit(logging.ERROR, "metered.settle_failed", **context, error=str(exc))
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
